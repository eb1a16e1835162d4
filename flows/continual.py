"""The continual-learning flow: build the stream, then for each strategy train every experience,
evaluate, and log to MLflow.

One MLflow parent run per ``lifelong run``; one nested run per strategy, holding its parameters,
the continual-evaluation trace (every ``training.eval_every`` iterations), the accuracy matrix
(table and heatmap), the learning-curve plot and the final model. Steps pass references (run
ids, experience indices, the live learner) — never tensors to hash — and use ``NO_CACHE``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from avalanche.training.determinism.rng_manager import RNGManager
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from lifelong import registry, tracking
from lifelong.bridges.avalanche.checkpoint import NotCheckpointable, check_checkpointable, load_learner_state
from lifelong.bridges.avalanche.health import GradientNormPlugin
from lifelong.bridges.avalanche.learners import (
    SilentEvaluator,
    build_learner,
    quiet_avalanche_deprecations,
    resolve_device,
)
from lifelong.bridges.avalanche.sample_dp import sample_dp_config
from lifelong.checkpoints import ResumeError, config_fingerprint  # noqa: F401  (the CLI's too)
from lifelong.config import Config, JointSpec, strategy_label, validate_config
from lifelong.env import default_tracking_uri, in_process_flow_runs
from lifelong.flows import continuation as cont
from lifelong.flows import health
from lifelong.flows.checkpoints import checkpoint_path, load_checkpoint, save_checkpoint
from lifelong.flows.lineage import lineage_of
from lifelong.progress import EpochProgressPlugin, Progress
from lifelong.tasks.data import load_npz
from lifelong.tasks.evaluation import ContinualEvalPlugin, evaluate, evaluated_experiences
from lifelong.tasks.health import PROBE_SAMPLES, probe
from lifelong.tasks.metrics import (
    ContinualTrace,
    continual_summary,
    matrix_summary,
    worst_experience_accuracy,
)
from lifelong.tasks.models import build_model
from lifelong.tasks.pretrain import pretrain
from lifelong.tasks.standardize import stats_params
from lifelong.tasks.streams import Stream, build_stream


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
    #: A continuation that found no new experience says why here, and opened no run.
    nothing_new: str | None = None


class Learner:
    """One strategy's live state across the flow's steps (kept in memory, passed by reference)."""

    def __init__(self, cfg: Config, spec, stream: Stream, run_id: str, client):
        self.cfg, self.spec, self.stream, self.run_id = cfg, spec, stream, run_id
        self.label = strategy_label(spec)
        self.joint = isinstance(spec, JointSpec)
        self.device = resolve_device(cfg.training.device)
        RNGManager.set_random_seeds(cfg.seed)  # every strategy starts from the same weights
        self.model = build_model(cfg.model, stream.input_shape, stream.n_classes,
                                 multi_head=stream.scenario == "task", input_stats=stream.input_stats)
        if cfg.pretrain.epochs:  # the same pretrained backbone for every strategy
            self.model.load_state_dict(pretrained_state(cfg, stream))
            # Pretraining (done by the first learner only) draws from the global RNG: reseed, so
            # every learner shuffles alike whether or not it was the one that pretrained.
            RNGManager.set_random_seeds(cfg.seed)
        self.logger = tracking.MLflowLogger(run_id, client)
        self.trace = ContinualTrace()
        self.rows: list[list[float]] = []
        self.gradients = GradientNormPlugin()
        self.progress = Progress(self.label, 1 if self.joint else stream.n_experiences,
                                 cfg.training.epochs)
        # Joint training sees the whole stream as one experience: report it as the last one.
        index = (lambda s: stream.n_experiences - 1) if self.joint else (
            lambda s: s.experience.current_experience)
        plugins = [
            ContinualEvalPlugin(stream, cfg.training.eval_every, self.trace, cfg.training.eval_batch_size,
                                on_point=self._log_point, experience_index=index),
            EpochProgressPlugin(self.progress, index),
            self.gradients,
        ]
        # Avalanche computes no metric here (ContinualEvalPlugin evaluates; the steps flush the
        # logger): its evaluator stays out of the training callbacks.
        self.strategy = build_learner(spec, self.model, cfg.training, plugins, SilentEvaluator(),
                                      stream.n_classes, cfg.seed, sample_dp=sample_dp_config(cfg))
        self.start = 0  # the first experience to train (later than 0 when resumed)
        self.t0 = time.perf_counter()  # the cost row of a sweep: wall time since this process took over
        self.checkpoint: Path | None = None  # where this learner's checkpoints go
        self.attempting: Path | None = None  # set while an experience trains: the checkpoint to go back to
        self.parent_version: str | None = None  # the registered version this learner continues
        self.drift: dict[str, float] | None = None  # a continuation's drift test of the new data
        try:
            check_checkpointable(self.strategy)
        except NotCheckpointable as exc:
            print(f"[lifelong] {self.label}: {exc}; it runs without checkpoints", file=sys.stderr)

    def restore(self, state: dict, report: bool = True) -> None:
        load_learner_state(self.strategy, state)
        self.rows = [list(r) for r in state["rows"]]
        self.trace.points.clear()
        for it, exp, accs in state["trace"]:
            self.trace.add(it, exp, accs)
        self.start = state["next_experience"]
        if report:
            for i in range(self.start):
                self.progress.experience_done(i, float(np.mean(self.rows[i][: i + 1])))

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
        model = build_model(cfg.model, stream.input_shape, stream.n_classes, multi_head=False,
                            input_stats=stream.input_stats)
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


def check_resumable(client, run_id: str, uri: str):
    """The run a ``--resume`` names must be a continual pipeline's top-level run."""
    try:
        run = client.get_run(run_id)
    except Exception:  # MlflowException for an unknown id, connection errors for a bad URI
        raise ResumeError(f"--resume: no MLflow run {run_id!r} in {uri}") from None
    if run.data.tags.get("lifelong.flow") != "continual" or run.data.tags.get("mlflow.parentRunId"):
        raise ResumeError(f"--resume: run {run_id} is not a continual pipeline's run (resume is for "
                          "`lifelong run` of the continual flow; give the id it printed)")
    return run


@task(cache_policy=NO_CACHE)
def build_stream_step(cfg: Config) -> dict:
    """Build (and cache in-process) the stream; return a summary, not tensors."""
    stream = build_stream(cfg.stream, cfg.seed)
    stats = stream.input_stats if cfg.model.standardize_input else None
    return {"name": stream.name, "scenario": stream.scenario, "n_experiences": stream.n_experiences,
            "classes": stream.classes_per_experience, "input_shape": list(stream.input_shape),
            "input_stats": stats_params(stats)}


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
    """Train on experience ``index`` (joint: on the whole stream at once); returns iterations so far.

    A retry (``training.retries``) finds the learner as the failed attempt left it: it goes back
    to the last checkpoint first, and drops the attempt's unsent metrics.
    """
    if learner.attempting is not None:
        learner.logger.discard()
        learner.restore(load_checkpoint(learner.cfg, learner.attempting), report=False)
    learner.attempting = learner.checkpoint
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
    accs = evaluate(learner.model, stream, evaluated_experiences(stream, index), cfg.training.eval_batch_size,
                    learner.device)
    row = [accs.get(i, float("nan")) for i in range(stream.n_experiences)]
    learner.rows.append(row)
    step = len(learner.rows) - 1
    values = {f"matrix/acc_exp{i}": a for i, a in enumerate(row)}
    values["avg_acc_seen"] = float(np.mean(row if learner.joint else row[: index + 1]))
    from lifelong.bridges.avalanche.sample_dp import SampleDPPlugin  # Opacus' import only where DP may run

    dp = next((p for p in learner.strategy.plugins if isinstance(p, SampleDPPlugin)), None)
    if dp is not None and dp.reports:  # epsilon composed over the experiences trained so far
        values["privacy/sample_epsilon"] = dp.reports[-1].epsilon
        values["privacy/sample_epsilon_experience"] = dp.reports[-1].epsilon_experience
    learner.logger.log_values(values, step)  # sent with the next experience's batch, or on failure
    learner.progress.experience_done(step, values["avg_acc_seen"])
    health.report(learner.logger.client, learner.run_id, learner.logger, learner.label,
                  probe_health(learner, index), step, cfg.training.health_check)
    return row


def probe_health(learner: Learner, index: int):
    """Did the learner learn what it just trained on: experience ``index`` (joint: every one)?"""
    from avalanche.models.utils import avalanche_forward

    stream = learner.stream
    if learner.joint:  # a share of every experience, judged over all classes
        share = max(1, PROBE_SAMPLES // stream.n_experiences)
        parts = [[a[:share] for a in stream.train_tensors(i)] for i in range(stream.n_experiences)]
        x, y, t = (torch.cat(p) for p in zip(*parts))
        classes, where = sorted({c for cs in stream.classes_per_experience for c in cs}), "all experiences"
    else:
        (x, y, t), classes, where = stream.train_tensors(index), stream.classes_per_experience[index], f"exp{index}"
    return probe(learner.model, avalanche_forward, x, y, t, classes, where, learner.gradients.mean_norm,
                 learner.device)


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
    # What the result cost, beside (not among) the final metrics, which a resumed run reproduces exactly.
    learner.logger.log_values({"cost/updates": learner.strategy.clock.train_iterations,
                               "cost/wall_s": time.perf_counter() - learner.t0}, last)
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
    model_uri = tracking.log_torch_model(run_id, learner.model, uri) if cfg.tracking.log_model else None
    if model_uri is not None and cfg.tracking.register_model:
        cont.save_state(learner, client)  # what the next arrival continues from (folder streams)
    healthy = health.conclude(client, run_id, cfg.training.health_check)
    client.set_terminated(run_id, "FINISHED")
    if not healthy and not learner.joint and model_uri is not None and cfg.tracking.register_model:
        print(f"[{learner.label}] not registered: the model was unhealthy (`lifelong results {run_id}`)",
              file=sys.stderr, flush=True)
    elif not learner.joint:  # joint training is the upper-bound baseline, not a model to promote
        registry.register_from_config(cfg, client, run_id, model_uri, flow="continual", stream=learner.stream.name,
                                      strategy=learner.label,
                                      metrics={**summary, "worst_exp_accuracy": worst_experience_accuracy(matrix),
                                               **{f"drift_{k}": v for k, v in (learner.drift or {}).items()}},
                                      lineage=lineage_of(cfg, learner.stream, matrix, learner.parent_version))
    learner.progress.close()
    return StrategyResult(learner.label, run_id, matrix, summary, learner.strategy.clock.train_iterations)


def run_strategy(cfg: Config, index: int, parent_run_id: str, uri: str,
                 resume_run_id: str | None = None, continuation: cont.Continuation | None = None) -> StrategyResult:
    """Train and evaluate one strategy; checkpoint after every experience. ``resume_run_id``: the
    strategy's run of an interrupted run, continued from its last checkpoint. ``continuation``: a
    registered version to go on from (flows/continuation.py)."""
    spec = cfg.strategies[index]
    stream = build_stream(cfg.stream, cfg.seed)
    client = tracking.client_for(uri)
    run_id = resume_run_id or open_strategy_run(cfg, parent_run_id, index, uri)
    path = checkpoint_path(parent_run_id, index)
    learner = None
    try:
        learner = Learner(cfg, spec, stream, run_id, client)
        learner.checkpoint = path
        if continuation is not None:
            start_from_version(learner, continuation)
        if resume_run_id is not None and path.exists():
            learner.restore(load_checkpoint(cfg, path))
        elif not learner.joint:  # the starting point a retry of the first experience goes back to
            save_checkpoint(learner, learner.start - 1, path)
        train = train_experience
        if cfg.training.retries:
            if learner.joint or not path.exists():
                raise ValueError(f"training.retries: {learner.label} cannot go back to a checkpoint "
                                 "(joint training, or a plugin whose state is not checkpointed)")
            train = train_experience.with_options(retries=cfg.training.retries)
        if learner.joint:
            train(learner, stream.n_experiences - 1)
            evaluate_experience(learner, stream.n_experiences - 1)
        else:
            for i in range(learner.start, stream.n_experiences):
                train(learner, i)
                learner.attempting = None
                evaluate_experience(learner, i)
                learner.logger.flush()
                save_checkpoint(learner, i, path)
        return finish_strategy_run(learner, uri)
    except BaseException:
        if learner is not None:
            learner.logger.flush()
            learner.progress.close()
        client.set_terminated(run_id, "FAILED")
        raise


def start_from_version(learner: Learner, continuation: cont.Continuation) -> None:
    """The learner takes the version's weights and continual state; the new data's drift is measured
    on the version's own features before it learns anything, and logged."""
    learner.restore(continuation.learner_state(learner.stream.n_experiences))
    learner.parent_version = continuation.version
    learner.drift = cont.drift(learner.model, learner.stream, continuation.n_learned, learner.device)
    learner.logger.log_values({f"drift/{k}": v for k, v in learner.drift.items()}, continuation.n_learned)
    learner.logger.flush()
    new = [f.name for f in learner.stream.files[continuation.n_learned:]]
    print(f"[lifelong] {continuation.name} v{continuation.version} continues on {', '.join(new)}; drift "
          f"p = {learner.drift['p_value']:.3g} (KS on its features, {learner.drift['features_drifted']:.0%} of "
          "them drifted)", file=sys.stderr, flush=True)


@flow(name="continual", validate_parameters=False)
def continual_flow(config: dict, resume: str | None = None) -> ContinualResult:
    """Run every configured strategy on the configured stream; one MLflow run per strategy.

    ``resume``: the parent run id of an interrupted run; finished strategies are read back, the
    interrupted one continues from its last checkpoint into its own run, the rest run.
    """
    cfg = config if isinstance(config, Config) else validate_config(config)
    t0 = time.perf_counter()
    uri = cfg.tracking.uri or default_tracking_uri()
    client = tracking.client_for(uri)
    info = build_stream_step(cfg)
    continuation = None
    if cfg.tracking.continue_from is not None:  # every check before a run is opened
        try:
            continuation = cont.plan(cfg, uri, build_stream(cfg.stream, cfg.seed))
        except cont.NothingNew as exc:
            print(f"[lifelong] {exc}", file=sys.stderr, flush=True)
            return ContinualResult("", uri, nothing_new=str(exc))
    children: dict[str, object] = {}
    if resume is None:
        name = cfg.tracking.run_name or f"{info['name']}-{'-vs-'.join(strategy_label(s) for s in cfg.strategies)}"
        parent_id = tracking.open_run(client, name, {**cfg.flat(), **info["input_stats"]},
                                      {"lifelong.flow": "continual", "lifelong.stream": info["name"]},
                                      experiment=cfg.tracking.experiment)
        client.log_dict(parent_id, cfg.model_dump(mode="json"), "config.json")
    else:
        parent_id = resume
        check_resumable(client, parent_id, uri)
        children = {r.info.run_name: r for r in tracking.child_runs(client, parent_id)}
        client.update_run(parent_id, status="RUNNING")
    print(f"[lifelong] MLflow run {parent_id}; if interrupted: lifelong run --resume {parent_id}",
          file=sys.stderr, flush=True)
    result = ContinualResult(parent_id, uri)
    with tracking.terminated(client, parent_id):
        for index, spec in enumerate(cfg.strategies):
            child = children.get(strategy_label(spec))
            if child is not None and child.info.status == "FINISHED":
                result.results.append(finished_result(child, uri))
                continue
            result.results.append(run_strategy(cfg, index, parent_id, uri,
                                               child.info.run_id if child is not None else None, continuation))
        comparison = tracking.MLflowLogger(parent_id, client)
        comparison.log_values({tracking.metric_key(f"{r.label}/{k}"): v
                               for r in result.results for k, v in r.summary.items()}, 0)
        comparison.flush()
    result.timings["flow_s"] = time.perf_counter() - t0
    return result


def finished_result(run, uri: str) -> StrategyResult:
    """A strategy that finished before the run was interrupted, read back from MLflow."""
    back = tracking.read_results(run.info.run_id, uri)
    summary = {k.removeprefix("final/"): v for k, v in back.metrics.items() if k.startswith("final/")}
    return StrategyResult(back.name, run.info.run_id, back.matrix, summary, 0)


def run_continual(cfg: Config, resume: str | None = None) -> ContinualResult:
    """Entry point for Python users and the CLI: seeds are set per strategy inside the flow.
    ``resume``: an interrupted run's id (see :func:`continual_flow`)."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with in_process_flow_runs():
        return continual_flow(cfg, resume)
