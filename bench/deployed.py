"""A deployed round against an in-process round, side by side in one run (issue 19, item 1).

Workload: configs/federated.toml (10 clients, IID, replay, 2 local epochs), 5 experiences of
one round each. Deployed: a SuperLink and 10 SuperNodes on loopback (``cli/deploy.py``), the app
submitted with ``flwr run``; in-process: the same config through our in-process backend. A
round's time is the interval between two consecutive rounds' ``round/clients_ok`` metrics in
MLflow (written by the server after it aggregated the round), so both sides are timed by the same
clock at the same point; the first round is left out (it starts the node workers, and in-process
it builds the stream), and the figure is the median of the others.

Flower's floor (``bench/flower_floor.py``): a round of a ClientApp that replies at once, on the
same kind of deployment with as many SuperNodes, in the same run: what no client code can go below.

The per-message ClientApp processes write their start-up time and peak RSS
(``LIFELONG_CLIENTAPP_PROFILE``, ``clients/app.py``); the bench compares that peak with a bare
``python -c "import torch"`` measured in the same run. ``LIFELONG_NODE_WORKER=off`` (each message
imports the learning stack itself, as before the warm path) is measured over 2 rounds only: at
10 nodes on 2 cores such a round takes minutes.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

from bench import flower_floor
from bench.setup import bench_config, create_store, out_folder, store

CONFIG = "configs/federated.toml"
SETS = ["stream.n_experiences=5", "federated.rounds=1", "tracking.log_model=false", "tracking.log_plots=false"]


def round_seconds(uri: str, run_id: str) -> list[float]:
    from lifelong.tracking import client_for

    history = sorted(client_for(uri).get_metric_history(run_id, "round/clients_ok"), key=lambda m: m.step)
    stamps = [m.timestamp / 1e3 for m in history]
    return [b - a for a, b in pairwise(stamps)]


def deployed(out_dir: Path, uri: str, sets: list[str], worker: bool, nodes: int) -> dict:
    from lifelong.cli.deploy import LocalDeployment, app_dir
    from lifelong.tracking import client_for

    profile = out_dir / f"clientapp-{'warm' if worker else 'cold'}.jsonl"
    profile.unlink(missing_ok=True)
    env = {"LIFELONG_CLIENTAPP_PROFILE": str(profile), "LIFELONG_NODE_WORKER": "auto" if worker else "off"}
    experiment = f"deployed-{'warm' if worker else 'cold'}"
    run_config = {"config": str(Path(CONFIG).resolve()), "tracking-uri": uri,
                  "set": ";".join([*sets, f'tracking.uri="{uri}"', f'tracking.experiment="{experiment}"'])}
    t = time.perf_counter()
    with LocalDeployment(out_dir / f"flower-{experiment}", num_nodes=nodes, env=env) as dep:
        started = time.perf_counter() - t
        run = dep.run_app(app_dir(), run_config, timeout=3600)
    if run["status"] != "finished:completed":
        raise RuntimeError(f"the deployed run ended {run['status']}; see {run['log']}")
    client = client_for(uri)
    run_id = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])[0].info.run_id
    messages = [json.loads(line) for line in profile.read_text().splitlines()]
    return {"deployment_start_s": started, "run_s": time.perf_counter() - t - started,
            "round_s": round_seconds(uri, run_id), "messages": len(messages),
            "clientapp_startup_s": [m["startup_s"] for m in messages],
            "clientapp_handle_s": [m["handle_s"] for m in messages],
            "clientapp_peak_rss_mb": max(m["peak_rss_mb"] for m in messages)}


def bare_torch_rss_mb() -> float:
    """Peak RSS of a fresh ``python -c "import torch"``, read as the ClientApp reads its own."""
    out = subprocess.run([sys.executable, "-c", "import torch; print([int(l.split()[1]) / 1024 for l in "
                          "open('/proc/self/status') if l.startswith('VmHWM:')][0])"],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def run(out_dir: Path | None = None) -> dict:
    from lifelong.flows.federated import run_federated

    out_dir = out_folder(out_dir, "lifelong-bench-deployed-")
    uri = store(out_dir)
    create_store(uri)
    cfg = bench_config(CONFIG, SETS, uri, "inprocess")
    nodes = cfg.federated.clients
    inprocess = run_federated(cfg)
    warm = deployed(out_dir, uri, SETS, worker=True, nodes=nodes)
    floor = flower_floor.run(out_dir, nodes)
    cold = deployed(out_dir, uri, ["stream.n_experiences=2", *SETS[1:]], worker=False, nodes=nodes)
    inproc_rounds = round_seconds(uri, inprocess.run_id)
    torch_rss = bare_torch_rss_mb()
    median = statistics.median
    return {
        "workload": f"{CONFIG}: {nodes} clients (IID), replay, 2 local epochs; 1 round per experience",
        "inprocess_round_s": inproc_rounds, "deployed": warm, "deployed_without_worker": cold,
        "deployed_round_median_s": median(warm["round_s"][1:] or warm["round_s"]),
        "inprocess_round_median_s": median(inproc_rounds[1:] or inproc_rounds),
        "deployed_over_inprocess": median(warm["round_s"][1:] or warm["round_s"])
        / median(inproc_rounds[1:] or inproc_rounds),
        "deployed_without_worker_over_inprocess": median(cold["round_s"]) / median(inproc_rounds[1:] or inproc_rounds),
        "flower_floor": floor,
        "flower_floor_round_median_s": floor["round_median_s"],
        "flower_floor_over_inprocess": floor["round_median_s"] / median(inproc_rounds[1:] or inproc_rounds),
        "clientapp_startup_median_s": median(warm["clientapp_startup_s"]),
        "bare_torch_rss_mb": torch_rss,
        "clientapp_rss_over_bare_torch": warm["clientapp_peak_rss_mb"] / torch_rss,
        "clientapp_without_worker_rss_over_bare_torch": cold["clientapp_peak_rss_mb"] / torch_rss,
    }


def report(r: dict) -> str:
    w, c = r["deployed"], r["deployed_without_worker"]
    return "\n".join([
        f"Deployed rounds ({r['workload']})",
        f"  in-process round           {r['inprocess_round_median_s']:6.2f} s  (rounds "
        f"{', '.join(f'{s:.2f}' for s in r['inprocess_round_s'])})",
        f"  deployed round, warm nodes {r['deployed_round_median_s']:6.2f} s  (rounds "
        f"{', '.join(f'{s:.2f}' for s in w['round_s'])}; first left out)",
        f"    deployed / in-process {r['deployed_over_inprocess']:.1f} (target <= 1.5)",
        f"  Flower's floor: a round whose ClientApp does nothing, same deployment "
        f"{r['flower_floor_round_median_s']:6.2f} s  = {r['flower_floor_over_inprocess']:.1f} x in-process",
        f"  deployed round, no worker  {statistics.median(c['round_s']):6.2f} s  "
        f"({r['deployed_without_worker_over_inprocess']:.1f} x in-process; each message imports the stack)",
        f"  ClientApp message process: start-up {r['clientapp_startup_median_s']:.2f} s (median of {w['messages']}), "
        f"handling {statistics.median(w['clientapp_handle_s']):.2f} s, peak RSS {w['clientapp_peak_rss_mb']:.0f} MB = "
        f"{r['clientapp_rss_over_bare_torch']:.2f} x bare `import torch` ({r['bare_torch_rss_mb']:.0f} MB; target <= 1.3); "
        f"without the worker {c['clientapp_peak_rss_mb']:.0f} MB = {r['clientapp_without_worker_rss_over_bare_torch']:.2f} x",
    ])
