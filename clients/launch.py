"""Launchers for simulated clients: our in-process grid, or Flower's Ray simulation engine.

``run_simulation`` is deprecated in flwr 1.42 (in favour of ``flwr run`` with a local simulation
federation) but still the only way to run a ServerApp whose main is a closure of this process —
it is called here and nowhere else.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from lifelong.clients import state_store
from lifelong.clients.inprocess import InProcessGrid
from lifelong.config import Config


def default_client_app() -> ClientApp:
    from lifelong.clients.app import app

    return app


def inprocess_grid(cfg: Config, client_app: ClientApp | None = None) -> InProcessGrid:
    quiet_flower()
    return InProcessGrid(client_app or default_client_app(), cfg.federated.clients,
                         release_states=cfg.federated.release_states)


def simulate_with_ray(cfg: Config, serve: Callable[[Grid], object], client_app: ClientApp | None = None):
    """Run ``serve(grid)`` as the ServerApp of a Flower simulation with one SuperNode per client."""
    import warnings

    from flwr.simulation import run_simulation

    outcome: dict[str, object] = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            outcome["result"] = serve(grid)
        except BaseException as exc:  # Flower only logs it: kept to raise here (e.g. a refused resume)
            outcome["error"] = exc
            raise

    quiet_flower()
    backend_config = {
        "client_resources": {"num_cpus": cfg.federated.ray_cpus_per_client, "num_gpus": 0.0},
        "init_args": ray_init_args(cfg.federated.ray_address),
    }
    # Clients save their state where this process would: its state root resolved here, as an
    # actor's working directory need not be ours (Ray's processes inherit the environment).
    before = os.environ.get(state_store.ENV_VAR)
    os.environ[state_store.ENV_VAR] = str(state_store.state_root())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            run_simulation(server_app=server_app, client_app=client_app or default_client_app(),
                           num_supernodes=cfg.federated.clients, backend_config=backend_config)
    finally:
        if before is None:
            os.environ.pop(state_store.ENV_VAR, None)
        else:
            os.environ[state_store.ENV_VAR] = before
    if "error" in outcome:
        raise outcome["error"]
    if "result" not in outcome:  # Flower logs the ServerApp's exception and returns
        raise RuntimeError("the Ray simulation ended without a result; see Flower's log above")
    return outcome["result"]


def ray_init_args(address: str | None) -> dict:
    """``ray.init``'s arguments: a running cluster's address, or a Ray instance of this run's own."""
    common = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    if address is not None:
        check_ray_address(address)
        return {"address": address, **common}
    # address="local": a Ray instance of its own, never one that another process on this
    # machine started (ray.init looks for the latest one; it would then refuse num_cpus).
    return {"address": "local", "num_cpus": os.cpu_count() or 1, **common}


def check_ray_address(address: str, timeout: float = 3.0) -> None:
    """Refuse an address where no Ray cluster answers, before any work starts (``ray.init`` would
    otherwise retry for a minute and then fail deep in Flower's engine)."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return
    except OSError as exc:
        raise ValueError(f"federated.ray_address: no Ray cluster answers at {address} ({exc.strerror or exc}); "
                         "start one with `ray start --head --port PORT` and give its address") from None


def quiet_flower() -> None:
    """Flower logs every round at INFO; Lifelong reports progress itself."""
    logging.getLogger("flwr").setLevel(logging.WARNING)
