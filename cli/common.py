"""What every command shares: one ``error:`` line and an exit code for a refusal, and the checks
a config passes before any work starts."""

from __future__ import annotations

from typing import NoReturn

import typer


def fail(message: str, code: int = 2) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def check_before_work(cfg) -> None:
    """Read the data and build the model once, and open the MLflow store: missing or bad data, an
    unreachable server or a foreign database fails here, before any work."""
    if cfg.flow == "multitask":
        from lifelong.flows.multitask import load_data

        load_data(cfg)
        check_tracking_store(cfg)
        return
    from lifelong.bridges.avalanche.learners import resolve_device
    from lifelong.flows.continual import pretraining_data
    from lifelong.tasks.models import build_model
    from lifelong.tasks.streams import build_stream

    resolve_device(cfg.training.device)
    stream = build_stream(cfg.stream, cfg.seed)
    build_model(cfg.model, stream.input_shape, stream.n_classes, multi_head=stream.scenario == "task")
    if cfg.pretrain.epochs:
        pretraining_data(cfg, stream)
    if cfg.flow == "federated":
        from lifelong.flows.federated import privacy_plan, split_report

        split_report(cfg)  # more clients than samples, too many shards: refused here
        if cfg.federated.ray_address is not None:
            from lifelong.clients.launch import check_ray_address

            check_ray_address(cfg.federated.ray_address)  # no cluster there: refused here
        privacy_plan(cfg)  # an unreachable target epsilon or an exceeded budget: refused here
    check_tracking_store(cfg)


def check_tracking_store(cfg) -> None:
    """Last of the checks: opening a SQLite store that does not exist yet creates it."""
    from lifelong.config import ConfigError
    from lifelong.registry import StoreUnavailable, check_store

    try:
        check_store(cfg.tracking.uri)
    except StoreUnavailable as exc:
        raise ConfigError(str(exc)) from None
