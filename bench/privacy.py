"""The cost of differential privacy, measured side by side in one run.

* User-level DP in federated rounds: the in-process rounds of the default federated config
  (10 clients, 5 rounds per experience, replay) with flat and per-layer clipping + noise vs
  without, alternated (off, flat, per-layer, off, flat, per-layer); the ratio to the mean of the
  runs without DP, with and without the run's privacy accounting (timed apart). Target: <= 1.1.
* Sample-level DP with Opacus: median seconds per training step of the same model and batch,
  non-private vs flat per-sample hooks, per-layer hooks and ghost clipping
  (``strategies.sample_dp.benchmark``: modes interleaved step by step).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

PRIVATE = {"flat": ['privacy.clipping="flat"'], "per_layer": ['privacy.clipping="per_layer"']}
COMMON = ["privacy.clip=1.0", "privacy.noise_multiplier=0.5", "privacy.delta=1e-3"]


def federated_rounds(out_dir: Path) -> dict:
    import lifelong  # noqa: F401
    from lifelong.clients.launch import inprocess_grid
    from lifelong.flows.federated import open_federated_run, privacy_plan, serve
    from lifelong.config import load_config

    uri = f"sqlite:///{(out_dir / 'privacy.db').resolve()}"
    base = ['tracking.log_model=false', 'tracking.log_plots=false', f'tracking.uri="{uri}"']
    cfgs = {"off": load_config("configs/federated.toml", base)}
    for name, keys in PRIVATE.items():
        cfgs[name] = load_config("configs/federated.toml", [*base, *keys, *COMMON])

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
    from lifelong.strategies.sample_dp import benchmark

    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="lifelong-bench-privacy-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    sample = {m: benchmark(model=m) for m in ("mlp", "cnn")}
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
