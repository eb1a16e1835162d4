"""Multi-task combiners side by side: training throughput and peak memory as tasks grow.

Throughput: samples per second of sum, PCGrad, GCond-sequential and GCond-stochastic on the same
model and data, in one process, interleaved (each combiner timed twice, best kept), for 2 tasks
(digits_recon), 3 (digits_attributes) and 4 (digits_all). GCond accumulates K = 4 batches per
update; the others take one batch per update; all process the same number of samples.

Memory: each (combiner, tasks) in a fresh process with a wide backbone (hidden 2048, ~4.5 M
parameters, so per-task gradient copies are visible), peak RSS read from the kernel.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch

COMBINERS = [("sum", {}), ("pcgrad", {}), ("gcond-sequential", {"mode": "sequential"}),
             ("gcond-stochastic", {"mode": "stochastic"})]
PROBLEMS = {2: "digits_recon", 3: "digits_attributes", 4: "digits_all"}


def _setup(n_tasks: int, hidden: int, seed: int = 0):
    from lifelong.tasks.multitask_problems import MultiTaskNet, load_problem, task_loss

    data = load_problem(PROBLEMS[n_tasks], 0.25, seed)
    torch.manual_seed(seed)
    model = MultiTaskNet(data.input_shape, data.tasks, "mlp", hidden)
    losses_of = [(t.name, task_loss(t)) for t in data.tasks]

    def task_losses(model, idx):
        out = model(data.x_train[idx])
        return [f(out[n], data.y_train[n][idx]) for n, f in losses_of]

    return data, model, task_losses


def run_combiner(name: str, opts: dict, n_tasks: int, samples: int, hidden: int = 128,
                 batch_size: int = 32, k: int = 4) -> float:
    """Train on ``samples`` samples; returns samples per second (training only)."""
    from lifelong.strategies.combiners.gcond import GCond, GCondTrainer
    from lifelong.strategies.combiners.gradients import task_gradients, write_grad
    from lifelong.strategies.combiners.pcgrad import PCGrad

    data, model, task_losses = _setup(n_tasks, hidden)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    k = k if k % n_tasks == 0 else n_tasks * max(1, k // n_tasks)
    trainer = GCondTrainer(n_tasks, GCond(), mode=opts["mode"]) if name.startswith("gcond") else None
    pcgrad = PCGrad(generator=torch.Generator().manual_seed(0)) if name == "pcgrad" else None
    idx = lambda: torch.randint(len(data.x_train), (batch_size,), generator=gen)  # noqa: E731
    done = 0
    t0 = time.perf_counter()
    while done < samples:
        if trainer is not None:
            batches = [idx() for _ in range(k)]
            trainer.step(model, params, task_losses, batches, opt)
            done += k * batch_size
            continue
        losses = task_losses(model, idx())
        if pcgrad is None:
            opt.zero_grad()
            sum(losses).backward()
        else:
            write_grad(params, pcgrad.combine(task_gradients(params, losses)))
        opt.step()
        done += batch_size
    return done / (time.perf_counter() - t0)


def throughput(samples: int = 4096) -> dict:
    out: dict = {}
    for n in (2, 3, 4):
        best = {name: 0.0 for name, _ in COMBINERS}
        for _ in range(2):  # interleaved repeats: a slow moment hits every combiner alike
            for name, opts in COMBINERS:
                best[name] = max(best[name], run_combiner(name, opts, n, samples))
        out[n] = best
    return out


def _peak_rss_child(name: str, n_tasks: int) -> None:
    import resource

    opts = dict(COMBINERS)[name]
    run_combiner(name, opts, n_tasks, samples=32 * 16, hidden=2048)
    print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def memory() -> dict:
    out: dict = {}
    for n in (2, 4):
        for name in ("sum", "pcgrad", "gcond-stochastic"):
            code = f"from bench.multitask import _peak_rss_child; _peak_rss_child({name!r}, {n})"
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            out.setdefault(n, {})[name] = json.loads(res.stdout.strip().splitlines()[-1])["maxrss_mb"]
    return out


def run() -> dict:
    return {"samples_per_s": throughput(), "peak_rss_mb": memory()}


def report(r: dict) -> str:
    names = [n for n, _ in COMBINERS]
    lines = ["multi-task combiners: training samples per second (GCond K = 4, 3 for 3 tasks; best of 2)",
             "  tasks " + "".join(f"{n:>18}" for n in names) + "   stochastic/sequential  stochastic/pcgrad"]
    for n, row in r["samples_per_s"].items():
        ratio = row["gcond-stochastic"] / row["gcond-sequential"]
        vs_pc = row["gcond-stochastic"] / row["pcgrad"]
        lines.append(f"  {n:>5} " + "".join(f"{row[x]:>18.0f}" for x in names)
                     + f"   {ratio:>21.2f}  {vs_pc:>17.2f}")
    lines.append("peak RSS (MB), fresh process, hidden 2048 backbone")
    for n, row in r["peak_rss_mb"].items():
        lines.append(f"  {n} tasks: " + ", ".join(f"{k} {v:.0f}" for k, v in row.items()))
    return "\n".join(lines)
