"""The multi-task flow: one shared backbone, several task losses, and a gradient combiner.

For each configured combiner (plain sum, PCGrad, GCond sequential or stochastic) the same model
from the same seed is trained for ``multitask.epochs`` passes over the data (the same samples for
every combiner); MLflow gets per-task losses and the conflict statistics the combiner sees
(lowest pairwise cosine, projections) per optimizer update, test metrics every ``eval_every``
epochs, throughput, and the final model. One parent
run per ``lifelong run``, one nested run per combiner.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from lifelong import registry, tracking
from lifelong.config import CombinerSpec, Config, check_combiners, combiner_label, validate_config
from lifelong.env import default_tracking_uri
from lifelong.strategies.combiners.gcond import GCond, GCondTrainer
from lifelong.strategies.combiners.gradients import task_gradients, write_grad
from lifelong.strategies.combiners.pcgrad import PCGrad
from lifelong.tasks.multitask_problems import (
    MultiTaskData,
    MultiTaskNet,
    evaluate_tasks,
    load_problem,
    task_loss,
)


@dataclass
class CombinerResult:
    label: str
    run_id: str
    summary: dict[str, float]


@dataclass
class MultiTaskResult:
    parent_run_id: str
    tracking_uri: str
    results: list[CombinerResult] = field(default_factory=list)


def load_data(cfg: Config) -> MultiTaskData:
    m = cfg.multitask
    data = load_problem(m.problem, m.test_fraction, cfg.seed, m.path, m.tasks)
    check_combiners(m.combiners, len(data.tasks))  # npz problems: the tasks are known only now
    return data


def pairwise_min_cosine(grads: list[torch.Tensor]) -> float:
    g = torch.stack(grads)
    g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = g @ g.T
    cos.fill_diagonal_(float("inf"))
    return float(cos.min())


class Batches:
    """An endless stream of seeded, shuffled mini-batches (index tensors)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.bs = n, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self._perm, self._pos = torch.randperm(n, generator=self.gen), 0

    def next(self) -> torch.Tensor:
        if self._pos + self.bs > self.n:
            self._perm, self._pos = torch.randperm(self.n, generator=self.gen), 0
        idx = self._perm[self._pos : self._pos + self.bs]
        self._pos += self.bs
        return idx


def make_optimizer(cfg: Config, params, own_momentum: bool) -> torch.optim.Optimizer:
    """With GCond (``own_momentum``), AdamW's first moment is off (beta1 = 0), as in the GCond
    README's AdamW example: GCond already applies momentum to the arbitrated gradient."""
    m = cfg.multitask
    if m.optimizer == "sgd":
        return torch.optim.SGD(params, lr=m.lr, weight_decay=m.weight_decay)
    betas = (0.0, 0.999) if own_momentum else (0.9, 0.999)
    return torch.optim.AdamW(params, lr=m.lr, betas=betas, weight_decay=m.weight_decay)


@task(cache_policy=NO_CACHE)
def train_combiner(cfg: Config, index: int, parent_run_id: str, uri: str) -> CombinerResult:
    spec: CombinerSpec = cfg.multitask.combiners[index]
    label = combiner_label(spec)
    client = tracking.client_for(uri)
    params = {k: v for k, v in cfg.flat().items() if k.startswith(("seed", "multitask.")) and ".combiners." not in k}
    params.update({f"combiner.{k}": str(v) for k, v in spec.model_dump(mode="json").items()})
    run_id = tracking.open_run(client, label, params, {"lifelong.flow": "multitask", "lifelong.combiner": spec.name},
                               parent_run_id=parent_run_id)
    logger = tracking.MLflowLogger(run_id, client)
    with tracking.terminated(client, run_id, cleanup=logger.flush):
        t0 = time.perf_counter()
        summary = _train(cfg, spec, logger)
        # What the result cost (a sweep's budget columns): optimiser updates and wall time.
        logger.log_values({"cost/updates": summary.pop("_updates"), "cost/wall_s": time.perf_counter() - t0}, 0)
        logger.log_values({f"final/{k}": v for k, v in summary.items() if k != "_model"}, 0)
        logger.flush()
        model = summary.pop("_model")
        model_uri = tracking.log_torch_model(run_id, model, uri) if cfg.tracking.log_model else None
    registry.register_from_config(cfg, client, run_id, model_uri, flow="multitask", stream=cfg.multitask.problem,
                                  strategy=label, metrics=summary)
    return CombinerResult(label, run_id, summary)


def _train(cfg: Config, spec: CombinerSpec, logger: tracking.MLflowLogger) -> dict:
    m = cfg.multitask
    data = load_data(cfg)
    torch.manual_seed(cfg.seed)
    model = MultiTaskNet(data.input_shape, data.tasks, m.backbone, m.hidden)
    params = list(model.parameters())
    optimizer = make_optimizer(cfg, params, own_momentum=spec.name == "gcond")
    weights = spec.weights or [1.0] * len(data.tasks)
    losses_of = [task_loss(t) for t in data.tasks]
    names = [t.name for t in data.tasks]
    batches = Batches(len(data.x_train), m.batch_size, cfg.seed)

    def task_losses(model, idx):
        out = model(data.x_train[idx])
        return [w * f(out[n], data.y_train[n][idx]) for w, f, n in zip(weights, losses_of, names)]

    gcond = None
    if spec.name == "gcond":
        gcond = GCondTrainer(len(names), GCond(dominance="readme" if spec.dominance == "paper" else "code"),
                             mode=spec.mode)
    pcgrad = PCGrad(generator=torch.Generator().manual_seed(cfg.seed)) if spec.name == "pcgrad" else None
    samples, train_s, projections = 0, 0.0, []
    # The same batches for every combiner: GCond takes K of them per update.
    per_update = spec.accumulation if gcond is not None else 1
    batches_per_epoch = max(1, len(data.x_train) // m.batch_size)
    # budget "updates": as many optimizer updates as a one-batch-per-update combiner makes
    total = max(1, batches_per_epoch * m.epochs // (per_update if spec.budget == "data" else 1))
    probe = torch.arange(min(256, len(data.x_train)))  # a fixed batch for the logged training losses
    model.train()
    for update in range(1, total + 1):
        t0 = time.perf_counter()
        values: dict[str, float] = {}
        if gcond is not None:
            idxs = [batches.next() for _ in range(spec.accumulation)]
            stats = gcond.step(model, params, task_losses, idxs, optimizer)
            samples += sum(len(i) for i in idxs)
            values["conflict/min_cos"] = float(stats.get("min_cos", 1.0))
            values["conflict/projections"] = float(stats.get("projections", 0))
            projections.append(values["conflict/projections"])
        else:
            idx = batches.next()
            losses = task_losses(model, idx)
            samples += len(idx)
            if pcgrad is None:
                optimizer.zero_grad()
                sum(losses).backward()
            else:
                grads = task_gradients(params, losses)
                values["conflict/min_cos"] = pairwise_min_cosine(grads)
                write_grad(params, pcgrad.combine(grads))
                values["conflict/projections"] = float(pcgrad.last_stats.get("projections", 0))
                projections.append(values["conflict/projections"])
            optimizer.step()
        train_s += time.perf_counter() - t0
        epoch_end = (update * per_update) // (batches_per_epoch * m.eval_every) > \
            ((update - 1) * per_update) // (batches_per_epoch * m.eval_every)
        if epoch_end or update == total:
            with torch.no_grad():
                train_losses = [float(x) for x in task_losses(model, probe)]
            values.update({f"train_loss/{n}": v for n, v in zip(names, train_losses)})
            values.update({f"test/{k}": v for k, v in evaluate_tasks(model, data).items()})
        logger.log_values(values, update)
    final = evaluate_tasks(model, data)
    summary: dict = {**final, "samples_per_s": samples / max(train_s, 1e-9),
                     "mean_projections": float(np.mean(projections)) if projections else 0.0}
    summary["_model"], summary["_updates"] = model, total
    return summary


@flow(name="multitask", validate_parameters=False)
def multitask_flow(config: dict) -> MultiTaskResult:
    cfg = config if isinstance(config, Config) else validate_config(config)
    uri = cfg.tracking.uri or default_tracking_uri()
    client = tracking.client_for(uri)
    load_data(cfg)  # bad data or an impossible K is refused before any training
    labels = [combiner_label(c) for c in cfg.multitask.combiners]
    name = cfg.tracking.run_name or f"{cfg.multitask.problem}-{'-vs-'.join(labels)}"
    parent_id = tracking.open_run(client, name, cfg.flat(), {"lifelong.flow": "multitask"},
                                  experiment=cfg.tracking.experiment)
    result = MultiTaskResult(parent_id, uri)
    with tracking.terminated(client, parent_id):
        for i in range(len(cfg.multitask.combiners)):
            result.results.append(train_combiner(cfg, i, parent_id, uri))
    return result
