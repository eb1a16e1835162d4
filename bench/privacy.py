"""The cost of differential privacy, measured side by side in one run.

* User-level DP in federated rounds: the in-process rounds of the default federated config
  (10 clients, 5 rounds per experience, replay) with flat and per-layer clipping + noise vs
  without, alternated (off, flat, per-layer, off, flat, per-layer); the ratio to the mean of the
  runs without DP, with and without the run's privacy accounting (timed apart). Target: <= 1.1.
* Sample-level DP with Opacus: median seconds per training step of the same model and batch,
  non-private vs flat per-sample hooks, per-layer hooks and ghost clipping
  (:func:`opacus_steps`: modes interleaved step by step).
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from bench.setup import bench_config, out_folder, store

PRIVATE = {"flat": ['privacy.clipping="flat"'], "per_layer": ['privacy.clipping="per_layer"']}
COMMON = ["privacy.clip=1.0", "privacy.noise_multiplier=0.5", "privacy.delta=1e-3"]


def federated_rounds(out_dir: Path) -> dict:
    import lifelong  # noqa: F401
    from lifelong.clients.launch import inprocess_grid
    from lifelong.flows.federated import open_federated_run, privacy_plan, serve

    uri = store(out_dir, "privacy.db")
    base = ['tracking.log_model=false', 'tracking.log_plots=false']
    cfgs = {"off": bench_config("configs/federated.toml", base, uri)}
    for name, keys in PRIVATE.items():
        cfgs[name] = bench_config("configs/federated.toml", [*base, *keys, *COMMON], uri)

    def rounds(cfg) -> float:
        run_id = open_federated_run(cfg, uri)
        t = time.perf_counter()
        serve(inprocess_grid(cfg), cfg, run_id, uri)
        return time.perf_counter() - t

    def accounting(cfg) -> float:
        """The run's per-round epsilons (PLD), which ``serve`` computes before its first round."""
        t = time.perf_counter()
        list(privacy_plan(cfg).epsilon_per_round())
        return time.perf_counter() - t

    rounds(cfgs["off"])  # warm-up
    times: dict[str, list[float]] = {k: [] for k in cfgs}
    for _ in range(2):
        for name, cfg in cfgs.items():
            times[name].append(rounds(cfg))
    acct = accounting(cfgs["flat"])
    off = sum(times["off"]) / len(times["off"])
    mean = {k: sum(v) / len(v) for k, v in times.items()}
    return {"seconds": times, "accounting_s": acct,
            "ratio": {k: m / off for k, m in mean.items() if k != "off"},
            "ratio_clip_and_noise": {k: (m - acct) / off for k, m in mean.items() if k != "off"}}


def run(out_dir: Path | None = None) -> dict:

    out_dir = out_folder(out_dir, "lifelong-bench-privacy-")
    sample = {m: opacus_steps(model=m) for m in ("mlp", "cnn")}
    return {"user_level": federated_rounds(out_dir),
            "sample_level_s_per_step": sample,
            "sample_level_ratio": {m: {k: v / r["non_private"] for k, v in r.items() if k != "non_private"}
                                   for m, r in sample.items()}}


def report(r: dict) -> str:
    u = r["user_level"]
    lines = ["User-level DP, federated rounds (configs/federated.toml, in-process; clip 1, z 0.5)"]
    for name, secs in u["seconds"].items():
        ratio = (f"  ratio {u['ratio'][name]:.3f}; clipping + noise alone {u['ratio_clip_and_noise'][name]:.3f} "
                 "(target <= 1.1)") if name in u["ratio"] else ""
        lines.append(f"  {name:<10} {', '.join(f'{s:.2f}' for s in secs)} s{ratio}")
    lines.append(f"  (the rest is accounting: {u['accounting_s']:.2f} s for the run's 25 per-round "
                 "epsilons with dp-accounting's PLD, once per run)")
    lines.append("Sample-level DP (Opacus), median s/step, batch 64, ratio to non-private")
    for model, times in r["sample_level_s_per_step"].items():
        ratios = r["sample_level_ratio"][model]
        lines.append(f"  {model}: non-private {times['non_private'] * 1e3:.1f} ms; " + ", ".join(
            f"{k} {times[k] * 1e3:.1f} ms ({ratios[k]:.1f}x)" for k in ratios))
    return "\n".join(lines)


# ------------------------------------------------------------------------------ Opacus steps

def _bench_model(name: str, in_shape, n_classes: int) -> nn.Module:
    from lifelong.tasks.models import cnn_backbone, mlp_backbone

    if name == "cnn":
        return nn.Sequential(cnn_backbone(in_shape, (32, 64), 256, 0.0), nn.Linear(256, n_classes))
    return nn.Sequential(mlp_backbone(in_shape, 256, 0.0), nn.Linear(256, n_classes))


def _bench_setup(mode: str, model: nn.Module, batch_size: int, noise_multiplier: float, max_grad_norm: float):
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping, DPPerLayerOptimizer
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01)
    kw = {"noise_multiplier": noise_multiplier, "expected_batch_size": batch_size}
    if mode == "non_private":
        return model, opt, nn.CrossEntropyLoss()
    if mode == "flat":
        return GradSampleModule(model), DPOptimizer(opt, max_grad_norm=max_grad_norm, **kw), nn.CrossEntropyLoss()
    if mode == "per_layer":
        bounds = [max_grad_norm / math.sqrt(len(params))] * len(params)
        return GradSampleModule(model), DPPerLayerOptimizer(opt, max_grad_norm=bounds, **kw), nn.CrossEntropyLoss()
    gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=max_grad_norm, use_ghost_clipping=True)
    opt = DPOptimizerFastGradientClipping(opt, max_grad_norm=max_grad_norm, **kw)
    return gsm, opt, DPLossFastGradientClipping(gsm, opt, nn.CrossEntropyLoss())


MODES = ("non_private", "flat", "per_layer", "ghost")


def opacus_steps(model: str = "cnn", batch_size: int = 64, steps: int = 10, warmup: int = 2,
              in_shape=(1, 8, 8), n_classes: int = 10, noise_multiplier: float = 1.0,
              max_grad_norm: float = 1.0, seed: int = 0) -> dict[str, float]:
    """Median seconds per training step (forward, backward, clip, noise, step) on the same model
    and batch: non-private, Opacus flat hooks, per-layer hooks, ghost. Not asserted on; for
    ``make bench``. ``model``: "cnn" (the project's CNN, channels (32, 64), hidden 256) or "mlp"
    (hidden 256), on 8×8 digit-shaped input. A fixed batch (no Poisson sampling) so every mode does
    the same work; the modes are interleaved step by step so machine drift hits all of them alike.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, *in_shape, generator=gen)
    y = torch.randint(0, n_classes, (batch_size,), generator=gen)
    setups = {}
    for mode in MODES:
        torch.manual_seed(seed)
        setups[mode] = _bench_setup(mode, _bench_model(model, in_shape, n_classes), batch_size,
                                    noise_multiplier, max_grad_norm)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Full backward hook.*")
        for i in range(warmup + steps):
            for mode, (net, opt, crit) in setups.items():
                t0 = time.perf_counter()
                opt.zero_grad()
                crit(net(x), y).backward()
                opt.step()
                if i >= warmup:
                    times[mode].append(time.perf_counter() - t0)
    return {m: sorted(t)[len(t) // 2] for m, t in times.items()}
