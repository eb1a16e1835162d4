"""Privacy audit of a federated config: a gradient-inversion attack on one client's update.

``run_audit(cfg)`` takes the first client's (partition 0) first ``samples`` training samples of
the first experience, in the order of its share, and the global model the federation starts
from (``lifelong.flows.federated.initial_weights``: the seeded initial model, pretrained if the config
pretrains). The client's update is one step of plain SGD with the config's ``training.lr`` on
that batch — DLG's regime, in which the attack is known to work; the config's own local training
(``training.epochs``, ``batch_size``, momentum, Adam) is not replayed. A config whose clients do
exactly this (``training.epochs = 1``, ``optimizer = "sgd"``, ``momentum = 0``,
``weight_decay = 0``, ``dropout = 0``, a share no larger than ``training.batch_size``, naive or
replay without center loss) sends this very update (checked in tests/flows/test_audit_flow.py).

Cases attacked (``privacy/gradient_inversion.py`` says what the attacker knows):

``no_dp``     the raw update, as FedAvg's server receives it;
``clip_only`` the update clipped with ``privacy.clipping``/``clip``/``allocation``, no noise
              (clipping alone is not a defence; shown for contrast);
``dp``        clipped, plus ``N(0, (z C)^2)`` per coordinate — the noise the server adds to the
              sum, here on this single client's contribution (the attacker's best case; a real
              round shows only the cohort's noised sum). ``z`` is the noise multiplier the run
              applies (``privacy.noise_multiplier``, or calibrated from ``target_epsilon``).

A config with ``privacy.clipping = "off"`` is audited in the ``no_dp`` case only (said in the
output); a config that is not federated is refused (:class:`AuditError`): there is no client
update to audit; so is a task stream's (the attack does not model a multi-head model). MLflow:
one run in the config's experiment, with the config and audit settings as parameters,
``<case>/mse|psnr|label_accuracy|observed_norm``, the gradient distance per iteration,
``audit.json`` and the side-by-side image ``audit.png``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from lifelong import tracking
from lifelong.config import Config
from lifelong.env import default_tracking_uri
from lifelong.privacy.gradient_inversion import (
    Reconstruction,
    Score,
    invert,
    private_view,
    psnr,
    score,
    sgd_update,
    update_to_gradient,
)

IMAGE_FILE = "audit.png"
RESULT_FILE = "audit.json"


class AuditError(ValueError):
    """A config that cannot be audited; the message says why and what to set."""


@dataclass
class AuditCase:
    name: str
    description: str
    observed_norm: float
    score: Score
    reconstruction: Reconstruction


@dataclass
class AuditResult:
    run_id: str
    tracking_uri: str
    cases: list[AuditCase]
    x_true: torch.Tensor
    y_true: torch.Tensor
    #: PSNR of the mean training image against the true samples: what knowing nothing gives.
    reference_psnr: float
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class AttackSettings:
    samples: int = 4
    iterations: int = 300
    labels: str = "idlg"
    distance: str = "cosine"
    optimizer: str = "adam"


def check_auditable(cfg: Config) -> list[str]:
    """Refuse what cannot be audited; return notes on what is audited and what is not."""
    if cfg.flow != "federated":
        raise AuditError(f'audit: the config\'s flow is "{cfg.flow}", not "federated": the audit attacks '
                         'a federated client\'s update; set flow = "federated" and a [privacy] section')
    if cfg.stream.resolved_scenario == "task":  # the attack's model is single-head (no task labels)
        raise AuditError("audit: a task stream's clients train a multi-head model, which the attack does "
                         "not model yet; audit the same config with a class stream "
                         "(--set 'stream.scenario=\"class\"')")
    notes = []
    if cfg.privacy.clipping == "off":
        notes.append('privacy.clipping is "off": only the no-DP case is audited; set e.g. '
                     '--set \'privacy.clipping="flat"\' --set privacy.noise_multiplier=1.0 to audit DP')
    t = cfg.training
    if (t.epochs, t.optimizer, t.momentum, t.weight_decay) != (1, "sgd", 0.0, 0.0):
        notes.append(f"the attacked update is one plain SGD step (lr {t.lr:g}) on the batch, not the config's "
                     f"local training ({t.epochs} epochs of {t.optimizer}): DLG's regime, the attacker's best case")
    return notes


def target_batch(cfg: Config, samples: int):
    """The global model and client 0's first ``samples`` samples of experience 0."""
    from lifelong.flows.federated import initial_weights
    from lifelong.tasks.models import build_model
    from lifelong.tasks.partition import client_tensors
    from lifelong.tasks.streams import build_stream

    if samples < 1:
        raise AuditError(f"--samples: at least 1 sample to reconstruct, got {samples}")
    stream = build_stream(cfg.stream, cfg.seed)
    model = build_model(cfg.model, stream.input_shape, stream.n_classes, multi_head=False,
                        input_stats=stream.input_stats)
    model.load_state_dict(initial_weights(cfg))
    model.eval()  # dropout off: the attacker's best case (it cannot know the client's masks)
    x, y, _ = client_tensors(cfg, stream, 0, 0)
    if len(y) < samples:
        raise AuditError(f"--samples: client 0 holds {len(y)} samples of experience 0, fewer than {samples}")
    return model, x[:samples], y[:samples], stream


def attack_cases(cfg: Config) -> list[tuple[str, str, dict | None]]:
    """(name, description, DP view settings) for each case the config allows."""
    cases: list[tuple[str, str, dict | None]] = [("no_dp", "no DP (raw update)", None)]
    p = cfg.privacy
    if p.clipping == "off":
        return cases
    from lifelong.flows.federated import privacy_plan

    # The noise the server adds to the update: z, or z_delta with adaptive clipping (whose first
    # round clips at the configured starting bound, the one audited here).
    z = privacy_plan(cfg).update_noise_multiplier
    view = {"mode": p.clipping, "clip": p.clip, "allocation": p.allocation}
    cases.append(("clip_only", f"clipped only ({p.clipping}, C={p.clip:g}, z=0)", {**view, "noise_multiplier": 0.0}))
    cases.append(("dp", f"DP ({p.clipping}, C={p.clip:g}, z={z:.3g})", {**view, "noise_multiplier": z}))
    return cases


def run_audit(cfg: Config, settings: AttackSettings = AttackSettings(), log=sys.stderr) -> AuditResult:
    """Attack every case, log one MLflow run, return the numbers (seeded by ``cfg.seed``)."""
    notes = check_auditable(cfg)
    model, x, y, stream = target_batch(cfg, settings.samples)
    update = sgd_update(model, x, y, cfg.training.lr)
    reference = psnr(float(((x - stream.train_tensors(0)[0].mean(0)) ** 2).mean()))
    cases = []
    for i, (name, description, view) in enumerate(attack_cases(cfg)):
        seen = update if view is None else private_view(
            update, generator=torch.Generator().manual_seed(cfg.seed * 1000 + 1), **view)
        norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in seen)))
        print(f"[{name}] attacking: {description}, observed update norm {norm:.4g}", file=log, flush=True)
        every = max(1, settings.iterations // 10)

        def progress(step: int, d: float, name=name, every=every) -> None:
            if (step + 1) % every == 0 or step + 1 == settings.iterations:
                print(f"[{name}] iteration {step + 1}/{settings.iterations}  gradient distance {d:.4g}",
                      file=log, flush=True)

        rec = invert(model, update_to_gradient(seen, cfg.training.lr), settings.samples, stream.input_shape,
                     stream.n_classes, labels=settings.labels, distance=settings.distance,
                     optimizer=settings.optimizer, iterations=settings.iterations,
                     generator=torch.Generator().manual_seed(cfg.seed), callback=progress)
        cases.append(AuditCase(name, description, norm, score(x, y, rec.x, rec.y), rec))
    run_id, uri = log_audit(cfg, settings, cases, x, y, reference, notes)
    return AuditResult(run_id, uri, cases, x, y, reference, notes)


# --------------------------------------------------------------------------- MLflow


def log_audit(cfg: Config, settings: AttackSettings, cases: list[AuditCase], x, y, reference: float,
              notes: list[str]) -> tuple[str, str]:
    from mlflow.entities import Metric

    uri = cfg.tracking.uri or default_tracking_uri()
    client = tracking.client_for(uri)
    params = {**cfg.flat(), **{f"audit.{k}": v for k, v in vars(settings).items()}}
    run_id = tracking.open_run(client, cfg.tracking.run_name or "audit", params,
                               {"lifelong.flow": "audit", "audit.cases": ",".join(c.name for c in cases)},
                               experiment=cfg.tracking.experiment)
    now = 0
    metrics = [Metric("reference/psnr_mean_image", reference, now, 0)]
    for c in cases:
        for key, value in (("mse", c.score.mse), ("psnr", c.score.psnr), ("label_accuracy", c.score.label_accuracy),
                           ("observed_norm", c.observed_norm)):
            metrics.append(Metric(f"{c.name}/{key}", float(min(value, 1e9)), now, 0))
        metrics += [Metric(f"{c.name}/gradient_distance", float(d), now, i)
                    for i, d in enumerate(c.reconstruction.history) if np.isfinite(d)]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    client.log_dict(run_id, {
        "true_labels": y.tolist(), "reference_psnr_mean_image": reference, "notes": notes,
        "cases": [{"name": c.name, "description": c.description, "mse": c.score.mse, "psnr": c.score.psnr,
                   "label_accuracy": c.score.label_accuracy, "per_sample_mse": c.score.per_sample_mse,
                   "labels": c.reconstruction.y.tolist(), "observed_norm": c.observed_norm} for c in cases],
    }, RESULT_FILE)
    tracking.log_figure(client, run_id, audit_figure(x, y, cases), IMAGE_FILE)
    client.set_terminated(run_id)
    return run_id, uri


def audit_figure(x: torch.Tensor, y: torch.Tensor, cases: list[AuditCase]):
    """True samples (top row) and each case's reconstructions, each under the true sample it matched."""
    plt = tracking.pyplot()

    n, rows = len(x), 1 + len(cases)
    fig, axes = plt.subplots(rows, n, figsize=(1.6 * n + 1.4, 1.7 * rows), squeeze=False)
    panels = [("true", x, [f"y={int(v)}" for v in y])]
    for c in cases:
        order = c.score.order
        panels.append((f"{c.name}\nPSNR {c.score.psnr:.1f} dB", c.reconstruction.x[order],
                       [f"y={int(c.reconstruction.y[j])}  {psnr(m):.1f}"
                        for j, m in zip(order, c.score.per_sample_mse)]))
    for r, (label, images, titles) in enumerate(panels):
        for i in range(n):
            ax = axes[r][i]
            ax.imshow(_image(images[i]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(titles[i], fontsize=7)
        axes[r][0].set_ylabel(label, fontsize=7)
    fig.suptitle("gradient inversion (DLG/iDLG) of one client's update", fontsize=9)
    fig.tight_layout()
    return fig


def _image(t: torch.Tensor) -> np.ndarray:
    a = t.detach().cpu().clamp(0, 1)
    if a.dim() == 3 and a.shape[0] == 1:
        return a[0].numpy()
    if a.dim() == 3 and a.shape[0] == 3:
        return a.permute(1, 2, 0).numpy()
    flat = a.flatten()
    side = int(np.ceil(np.sqrt(flat.numel())))
    return torch.nn.functional.pad(flat, (0, side * side - flat.numel())).reshape(side, side).numpy()
