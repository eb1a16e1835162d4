"""The continual-learning flow: build the stream, then for each strategy train every experience,
evaluate, and log to MLflow.

One MLflow parent run per ``lifelong run``; one nested run per strategy, holding its parameters,
the continual-evaluation trace (every ``training.eval_every`` iterations), the accuracy matrix
(table and heatmap), the learning-curve plot and the final model. Steps pass references (run
ids, experience indices, the live learner) — never tensors to hash — and use ``NO_CACHE``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from avalanche.training.determinism.rng_manager import RNGManager
from avalanche.training.plugins import EvaluationPlugin
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from lifelong import tracking
from lifelong.config import Config, JointSpec, strategy_label, validate_config
from lifelong.env import default_tracking_uri
from lifelong.progress import EpochProgressPlugin, Progress
from strategies.baselines import (
    build_learner,
    quiet_avalanche_deprecations,
    resolve_device,
)
from tasks.data import load_npz
from tasks.evaluation import ContinualEvalPlugin, evaluate
from tasks.metrics import ContinualTrace, continual_summary, matrix_summary
from tasks.models import build_model
from tasks.pretrain import pretrain
from tasks.streams import Stream, build_stream


@dataclass
class StrategyResult:
    label: str
    run_id: str
    matrix: np.ndarray
    summary: dict[str, float]
    train_iterations: int


@dataclass
class ContinualResult:
    parent_run_id: str
    tracking_uri: str
    results: list[StrategyResult] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


class Learner:
    """One strategy's live state across the flow's steps (kept in memory, passed by reference)."""

    def __init__(self, cfg: Config, spec, stream: Stream, run_id: str, client):
        self.cfg, self.spec, self.stream, self.run_id = cfg, spec, stream, run_id
        self.label = strategy_label(spec)
        self.joint = isinstance(spec, JointSpec)
        self.device = resolve_device(cfg.training.device)
        RNGManager.set_random_seeds(cfg.seed)  # every strategy starts from the same weights
        self.model = build_model(cfg.model, stream.input_shape, stream.n_classes,
                                 multi_head=stream.scenario == "task")
        if cfg.pretrain.epochs:  # the same pretrained backbone for every strategy
            self.model.load_state_dict(pretrained_state(cfg, stream))
            # Pretraining (done by the first learner only) draws from the global RNG: reseed, so
            # every learner shuffles alike whether or not it was the one that pretrained.
            RNGManager.set_random_seeds(cfg.seed)
        self.logger = tracking.MLflowLogger(run_id, client)
        self.trace = ContinualTrace()
        self.rows: list[list[float]] = []
        self.progress = Progress(self.label, 1 if self.joint else stream.n_experiences,
                                 cfg.training.epochs)
        # Joint training sees the whole stream as one experience: report it as the last one.
        index = (lambda s: stream.n_experiences - 1) if self.joint else (
            lambda s: s.experience.current_experience)
        plugins = [
            ContinualEvalPlugin(stream, cfg.training.eval_every, self.trace, cfg.training.eval_batch_size,
                                on_point=self._log_point, experience_index=index),
            EpochProgressPlugin(self.progress, index),
        ]
        self.strategy = build_learner(spec, self.model, cfg.training, plugins,
                                      EvaluationPlugin(loggers=[self.logger]), stream.n_classes, cfg.seed)

    def _log_point(self, iteration: int, experience: int, accs: dict[int, float]) -> None:
        values = {f"ceval/acc_exp{i}": a for i, a in accs.items()}
        values["ceval/avg_acc_seen"] = float(np.mean(list(accs.values())))
        if not self.joint:  # stability-gap metrics describe a learner that sees experiences in turn
            values.update({f"ceval/{k}": v for k, v in continual_summary(self.trace, experience).items()})
        self.logger.log_values(values, iteration)


_PRETRAINED: dict[str, dict] = {}


def pretrained_state(cfg: Config, stream: Stream) -> dict:
    """Pretrain once per (model, pretraining, stream, seed) in this process; a copy per learner."""
    key = repr((cfg.model, cfg.pretrain, cfg.stream, cfg.seed))
    if key not in _PRETRAINED:
        RNGManager.set_random_seeds(cfg.seed)
        model = build_model(cfg.model, stream.input_shape, stream.n_classes, multi_head=False)
        x, y = pretraining_data(cfg, stream)
        pretrain(model, x, y, cfg.pretrain, cfg.seed, resolve_device(cfg.training.device))
        _PRETRAINED[key] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {k: v.clone() for k, v in _PRETRAINED[key].items()}


def pretraining_data(cfg: Config, stream: Stream):
    if cfg.pretrain.path is None:
        return stream.holdout
    a = load_npz(cfg.pretrain.path, cfg.stream.test_fraction, cfg.seed)
    if a.input_shape != stream.input_shape:
        raise ValueError(f"pretrain.path: inputs of shape {a.input_shape}, the stream's are {stream.input_shape}")
    return torch.cat([a.x_train, a.x_test]), torch.cat([a.y_train, a.y_test])


@task(cache_policy=NO_CACHE)
def build_stream_step(cfg: Config) -> dict:
    """Build (and cache in-process) the stream; return a summary, not tensors."""
    stream = build_stream(cfg.stream, cfg.seed)
    return {"name": stream.name, "scenario": stream.scenario, "n_experiences": stream.n_experiences,
            "classes": stream.classes_per_experience, "input_shape": list(stream.input_shape)}


@task(cache_policy=NO_CACHE)
def open_strategy_run(cfg: Config, parent_run_id: str, index: int, uri: str) -> str:
    spec = cfg.strategies[index]
    params = {k: v for k, v in cfg.flat().items() if not k.startswith("strategies.")}
    params.update({f"strategy.{k}": str(v) for k, v in spec.model_dump(mode="json").items()})
    return tracking.open_run(tracking.client_for(uri), strategy_label(spec), params,
                             {"lifelong.flow": "continual", "lifelong.strategy": spec.name},
                             parent_run_id=parent_run_id)


@task(cache_policy=NO_CACHE)
def train_experience(learner: Learner, index: int) -> int:
    """Train on experience ``index`` (joint: on the whole stream at once); returns iterations so far."""
    stream = learner.stream
    experiences = stream.train_stream if learner.joint else stream.train_stream[index]
    with quiet_avalanche_deprecations():
        learner.strategy.train(experiences, eval_streams=[], num_workers=0)
    learner.logger.flush()  # nothing recorded is lost if a later step fails
    return learner.strategy.clock.train_iterations


@task(cache_policy=NO_CACHE)
def evaluate_experience(learner: Learner, index: int) -> list[float]:
    """A row of the accuracy matrix: accuracy on every experience after training ``index``.

    A task-incremental (multi-head) model has no head yet for unseen tasks: those cells are NaN.
    """
    stream, cfg = learner.stream, learner.cfg
    upto = stream.n_experiences if stream.scenario != "task" else index + 1
    accs = evaluate(learner.model, stream, range(upto), cfg.training.eval_batch_size, learner.device)
    row = [accs.get(i, float("nan")) for i in range(stream.n_experiences)]
    learner.rows.append(row)
    step = len(learner.rows) - 1
    values = {f"matrix/acc_exp{i}": a for i, a in enumerate(row)}
    values["avg_acc_seen"] = float(np.mean(row if learner.joint else row[: index + 1]))
    learner.logger.log_values(values, step)  # sent with the next experience's batch, or on failure
    learner.progress.experience_done(step, values["avg_acc_seen"])
    return row


@task(cache_policy=NO_CACHE)
def finish_strategy_run(learner: Learner, uri: str) -> StrategyResult:
    """Summary metrics, matrix table and heatmap, learning curve, model; closes the run."""
    cfg, client, run_id = learner.cfg, learner.logger.client, learner.run_id
    matrix = np.array(learner.rows)
    last = learner.stream.n_experiences - 1
    summary = matrix_summary(matrix)
    if not learner.joint:
        summary.update(continual_summary(learner.trace, last))
    learner.logger.log_values({f"final/{k}": v for k, v in summary.items()}, last)
    learner.logger.flush()
    labels = [f"exp{i}" for i in range(learner.stream.n_experiences)]
    tracking.log_matrix(client, run_id, matrix, labels)
    client.log_dict(run_id, {"points": [[p.iteration, p.experience, p.accuracies]
                                        for p in learner.trace.points]}, tracking.TRACE_FILE)
    if cfg.tracking.log_plots:
        tracking.log_figure(client, run_id, tracking.matrix_figure(matrix, labels, learner.label),
                            "accuracy_matrix.png")
        points = [(p.iteration, p.experience, p.accuracies) for p in learner.trace.points]
        tracking.log_figure(client, run_id, tracking.curve_figure(points, labels, learner.label),
                            "continual_eval.png")
    if cfg.tracking.log_model:
        tracking.log_torch_model(run_id, learner.model, uri)
    client.set_terminated(run_id, "FINISHED")
    learner.progress.close()
    return StrategyResult(learner.label, run_id, matrix, summary, learner.strategy.clock.train_iterations)


def run_strategy(cfg: Config, index: int, parent_run_id: str, uri: str) -> StrategyResult:
    spec = cfg.strategies[index]
    stream = build_stream(cfg.stream, cfg.seed)
    run_id = open_strategy_run(cfg, parent_run_id, index, uri)
    client = tracking.client_for(uri)
    learner = None
    try:
        learner = Learner(cfg, spec, stream, run_id, client)
        if learner.joint:
            train_experience(learner, stream.n_experiences - 1)
            evaluate_experience(learner, stream.n_experiences - 1)
        else:
            for i in range(stream.n_experiences):
                train_experience(learner, i)
                evaluate_experience(learner, i)
        return finish_strategy_run(learner, uri)
    except BaseException:
        if learner is not None:
            learner.logger.flush()
            learner.progress.close()
        client.set_terminated(run_id, "FAILED")
        raise


@flow(name="continual", validate_parameters=False)
def continual_flow(config: dict) -> ContinualResult:
    """Run every configured strategy on the configured stream; one MLflow run per strategy."""
    cfg = config if isinstance(config, Config) else validate_config(config)
    t0 = time.perf_counter()
    uri = cfg.tracking.uri or default_tracking_uri()
    client = tracking.client_for(uri)
    info = build_stream_step(cfg)
    name = cfg.tracking.run_name or f"{info['name']}-{'-vs-'.join(strategy_label(s) for s in cfg.strategies)}"
    parent_id = tracking.open_run(client, name, cfg.flat(), {"lifelong.flow": "continual",
                                                             "lifelong.stream": info["name"]},
                                  experiment=cfg.tracking.experiment)
    client.log_dict(parent_id, cfg.model_dump(mode="json"), "config.json")
    result = ContinualResult(parent_id, uri)
    try:
        for index in range(len(cfg.strategies)):
            result.results.append(run_strategy(cfg, index, parent_id, uri))
    except BaseException:
        client.set_terminated(parent_id, "FAILED")
        raise
    comparison = tracking.MLflowLogger(parent_id, client)
    comparison.log_values({tracking.metric_key(f"{r.label}/{k}"): v
                           for r in result.results for k, v in r.summary.items()}, 0)
    comparison.flush()
    client.set_terminated(parent_id, "FINISHED")
    result.timings["flow_s"] = time.perf_counter() - t0
    return result


def run_continual(cfg: Config) -> ContinualResult:
    """Entry point for Python users and the CLI: seeds are set per strategy inside the flow."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return continual_flow(cfg)
