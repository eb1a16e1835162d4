"""Pipeline overhead: `lifelong run` on a config vs a bare PyTorch loop doing the same work.

Measured bare / pipeline / bare in one process, after imports, the Prefect API's start and the
MLflow store's creation (each reported separately). Both sides do the same optimizer steps
(counted by a global optimizer step hook) with the same batch sizes on the same data, and the
same evaluations (every ``eval_every`` iterations on the experiences seen so far, and a row of
the accuracy matrix after each experience). The bare loop has no Prefect, no Avalanche, no MLflow.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from bench.setup import bench_config, create_store, out_folder, start_prefect_api, store

COUNT = {"steps": 0}


def count_step(optimizer, args, kwargs) -> None:
    COUNT["steps"] += 1


def bare_loop(cfg) -> dict:
    """Naive / replay / joint as plain PyTorch, with the pipeline's evaluations."""
    from lifelong.bridges.avalanche.learners import make_optimizer
    from lifelong.config import JointSpec, ReplaySpec
    from lifelong.tasks.models import build_model
    from lifelong.tasks.streams import load_arrays

    t0 = time.perf_counter()
    a = load_arrays(cfg.stream, cfg.seed)  # the stream's dataset, before the pipeline's own split
    n_exp = cfg.stream.n_experiences
    per = a.n_classes // n_exp
    exps = []
    for e in range(n_exp):
        cls = torch.arange(e * per, (e + 1) * per)
        tr, te = torch.isin(a.y_train, cls), torch.isin(a.y_test, cls)
        exps.append((a.x_train[tr], a.y_train[tr], a.x_test[te], a.y_test[te]))
    bs, tcfg = cfg.training.batch_size, cfg.training
    gen = torch.Generator().manual_seed(cfg.seed)

    @torch.no_grad()
    def acc(model, i):
        model.eval()
        x, y = exps[i][2], exps[i][3]
        r = float((model(x).argmax(1) == y).float().mean())
        model.train()
        return r

    for spec in cfg.strategies:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, a.input_shape, a.n_classes, multi_head=False)
        opt = make_optimizer(tcfg, model)
        it = 0
        memory: list[tuple[torch.Tensor, torch.Tensor]] = []
        order = [list(range(n_exp))] if isinstance(spec, JointSpec) else [[e] for e in range(n_exp)]
        for group in order:
            x = torch.cat([exps[e][0] for e in group])
            y = torch.cat([exps[e][1] for e in group])
            seen = group[-1] + 1
            [acc(model, i) for i in range(seen)]  # the point before the first update
            mx = torch.cat([m[0] for m in memory]) if memory else None
            my = torch.cat([m[1] for m in memory]) if memory else None
            for _ in range(tcfg.epochs):
                perm = torch.randperm(len(x), generator=gen)
                for b in range(math.ceil(len(x) / bs)):
                    idx = perm[b * bs:(b + 1) * bs]
                    xb, yb = x[idx], y[idx]
                    if mx is not None:
                        midx = torch.randint(len(mx), (bs,), generator=gen)
                        xb, yb = torch.cat([xb, mx[midx]]), torch.cat([yb, my[midx]])
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(model(xb), yb).backward()
                    opt.step()
                    it += 1
                    if tcfg.eval_every and it % tcfg.eval_every == 0:
                        [acc(model, i) for i in range(seen)]
            [acc(model, i) for i in range(seen)]  # the point after the last update
            [acc(model, i) for i in range(n_exp)]  # the accuracy-matrix row
            if isinstance(spec, ReplaySpec):  # experience-balanced memory of mem_size samples
                share = spec.mem_size // seen
                memory = []
                for e in range(seen):
                    sel = torch.randperm(len(exps[e][0]), generator=gen)[:share]
                    memory.append((exps[e][0][sel], exps[e][1][sel]))
    return {"seconds": time.perf_counter() - t0}


def prefect_share(cfg) -> dict:
    """The same flow with and without Prefect (its steps called as plain functions), no model or
    plot logging, alternated twice in one process: what Prefect's orchestration costs."""
    import lifelong.flows.continual as fc
    from lifelong.config import load_config
    from lifelong.env import in_process_flow_runs

    cfg = load_config(None, []).model_validate({**cfg.model_dump(mode="json", by_alias=True),
                                                "tracking": {**cfg.tracking.model_dump(mode="json"),
                                                             "log_model": False, "log_plots": False}})
    steps = ["build_stream_step", "open_strategy_run", "train_experience", "evaluate_experience",
             "finish_strategy_run"]
    tasks = {n: getattr(fc, n) for n in steps}
    calls = {"n": 0}

    def counted(fn):
        def call(*args, **kwargs):
            calls["n"] += 1
            return fn(*args, **kwargs)
        return call

    times: dict[str, list[float]] = {"prefect": [], "plain": []}
    for mode in ("prefect", "plain", "prefect", "plain"):
        for n in steps:
            setattr(fc, n, tasks[n] if mode == "prefect" else counted(tasks[n].fn))
        calls["n"] = 0
        t = time.perf_counter()
        if mode == "prefect":
            with in_process_flow_runs():  # as run_continual calls it
                fc.continual_flow(cfg)
        else:
            fc.continual_flow.fn(cfg)
        times[mode].append(time.perf_counter() - t)
    for n in steps:
        setattr(fc, n, tasks[n])
    return {**{k: min(v) for k, v in times.items()}, "task_runs": calls["n"]}


def package_scan_s() -> float:
    """What MLflow's first ``log_model`` in a process spends mapping every installed file to its
    package (``importlib_metadata.packages_distributions``), explicit requirements or not: it checks
    them against the environment (``mlflow.utils.requirements_utils``). The same call, timed alone."""
    import importlib_metadata

    t = time.perf_counter()
    importlib_metadata.packages_distributions()
    return time.perf_counter() - t


def run(config_path: str = "configs/default.toml", out_dir: Path | None = None, breakdown: bool = True) -> dict:
    """Bare / pipeline / bare on ``config_path``; ``breakdown``: also where the overhead goes (the
    flow four more times, with and without Prefect), which a long config can do without."""
    t = time.perf_counter()
    import lifelong  # noqa: F401
    from lifelong.flows.continual import run_continual
    from lifelong.tasks.streams import _build_stream_cached
    imports_s = time.perf_counter() - t

    out_dir = out_folder(out_dir, "lifelong-bench-")
    uri = store(out_dir)
    cfg = bench_config(config_path, [], uri, "bench")
    prefect_start_s = start_prefect_api()
    store_init_s = create_store(uri)

    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(count_step)
    try:
        COUNT["steps"] = 0
        bare1 = bare_loop(cfg)["seconds"]
        bare_steps = COUNT["steps"]
        COUNT["steps"] = 0
        _build_stream_cached.cache_clear()  # the pipeline builds its stream inside the timing
        t = time.perf_counter()
        result = run_continual(cfg)
        pipeline_s = time.perf_counter() - t
        pipe_steps = COUNT["steps"]
        COUNT["steps"] = 0
        bare2 = bare_loop(cfg)["seconds"]
    finally:
        handle.remove()
    bare_s = (bare1 + bare2) / 2
    out = {}
    if breakdown:
        share = prefect_share(cfg)
        scan_s = package_scan_s()
        # What the libraries alone add to the bare loop, whatever the pipeline around them does: one
        # Prefect task run per step (the per-run cost measured above), and MLflow's package scan.
        prefect_s = share["prefect"] - share["plain"]
        out = {
            "library_floor": {"prefect_task_runs": share["task_runs"], "prefect_s": prefect_s,
                              "prefect_ms_per_task_run": 1000 * prefect_s / max(1, share["task_runs"]),
                              "mlflow_package_scan_s": scan_s,
                              "ratio": (bare_s + prefect_s + scan_s) / bare_s},
            "ratio_without_model_and_plots": share["prefect"] / bare_s,
            "without_model_and_plots_s": share,
        }
    return {
        **out,
        "config": config_path,
        "imports_s": imports_s,
        "prefect_api_start_s": prefect_start_s,
        "mlflow_store_init_s": store_init_s,
        "bare_s": [bare1, bare2],
        "pipeline_s": pipeline_s,
        "ratio": pipeline_s / bare_s,
        "optimizer_steps": {"bare": bare_steps, "pipeline": pipe_steps,
                            "pipeline_by_strategy": {r.label: r.train_iterations for r in result.results}},
        "same_steps": bare_steps == pipe_steps,
    }


def report(r: dict, scan_s: float | None = None) -> str:
    """``scan_s``: MLflow's package scan measured by an earlier run in this process, which this
    one therefore did not pay: what a fresh process's ratio would be with it is shown too."""
    lines = [
        f"pipeline overhead on {r['config']}",
        f"  bare PyTorch loop      {r['bare_s'][0]:7.2f} s, {r['bare_s'][1]:.2f} s (before / after)",
        f"  lifelong pipeline      {r['pipeline_s']:7.2f} s  ({r['pipeline_s'] - sum(r['bare_s']) / 2:+.2f} s)",
        f"  ratio pipeline / bare  {r['ratio']:7.2f}   (target <= 1.3), with all tracking (metrics, matrix, "
        "plots, model, registry)",
    ]
    if scan_s is not None:
        bare = sum(r["bare_s"]) / 2
        lines.append(f"                         {(r['pipeline_s'] + scan_s) / bare:7.2f}   in a fresh process "
                     f"(adding MLflow's package scan, {scan_s:.2f} s, paid by the run above)")
    if "library_floor" not in r:
        lines.append(f"  optimizer steps        bare {r['optimizer_steps']['bare']}, pipeline "
                     f"{r['optimizer_steps']['pipeline']} -> {'same' if r['same_steps'] else 'DIFFERENT'}")
        return "\n".join(lines)
    fl = r["library_floor"]
    lines += [
        f"                         {r['ratio_without_model_and_plots']:7.2f}   without model and plot logging "
        "(metrics and matrix only)",
        f"  optimizer steps        bare {r['optimizer_steps']['bare']}, pipeline "
        f"{r['optimizer_steps']['pipeline']} {r['optimizer_steps']['pipeline_by_strategy']}"
        f" -> {'same' if r['same_steps'] else 'DIFFERENT'}",
        f"  not in the ratio: imports {r['imports_s']:.2f} s, Prefect API start "
        f"{r['prefect_api_start_s']:.2f} s, MLflow store init {r['mlflow_store_init_s']:.2f} s",
        f"  without model/plot logging: with Prefect {r['without_model_and_plots_s']['prefect']:.2f} s, "
        f"steps as plain functions {r['without_model_and_plots_s']['plain']:.2f} s",
        f"  libraries' own share: Prefect {fl['prefect_s']:.2f} s ({fl['prefect_task_runs']} task runs, "
        f"{fl['prefect_ms_per_task_run']:.0f} ms each), MLflow's package scan before the first model "
        f"{fl['mlflow_package_scan_s']:.2f} s -> bare + these alone {fl['ratio']:.2f}",
    ]
    return "\n".join(lines)
