"""The virtual clock at 1,000 clients: 24 virtual hours, wall time, and the in-process cost per
applied update against the synchronous flow's, side by side in one run.

Workload: Permuted-Digits (1,437 training samples per experience, so 1,000 IID clients hold one
or two each), 5 experiences, the MLP, replay 200, 1 local epoch.

* **clock**: ``configs/federated_async.toml``'s fleet at 1,000 clients — Markov availability
  (2 h on, 2 h off), log-normal speeds, drop-outs 5%, experiences 4 h apart — FedBuff with 50
  clients training at once and K = 10, for 24 virtual hours, evaluated (pooled and per client,
  all 1,000) every virtual hour.
* **sync**: the synchronous in-process flow on the same clients, 50 sampled a round
  (``fraction = 0.05``), 14 rounds per experience, evaluated every round (per client at each
  experience's end), checkpointed every round, as ``lifelong run`` does.

Each side's figure is its event loop or rounds alone (``VirtualClock.run`` / ``serve``, after
the MLflow run is open), over the local rounds that reached the model. The target: the clock's
cost per applied update ≤ 1.3 × the synchronous flow's.

Per-client evaluation's cost (issue 20's target: ≤ 25% of a 1,000-client run's time): on each
side, the time spent in what per-client evaluation adds to the global evaluation — the clients'
test shares, reading each client's accuracy off the shared pass, the spreads — timed by wrapping
those functions during the run, as a share of that side's wall time. The model's pass over the
test splits is the global evaluation's and is not counted.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

from bench.setup import bench_config, create_store, out_folder, start_prefect_api, store

COMMON = ['flow="federated"', 'stream.name="permuted_digits"', "stream.n_experiences=5", 'model.name="mlp"',
          "training.epochs=1", "federated.clients=1000", 'strategies=[{name="replay", mem_size=200}]',
          "tracking.log_model=false", "tracking.log_plots=false"]
CLOCK = ['clock={mode="fedbuff", hours=24, concurrency=50, buffer=10, round_minutes=20, experience_hours=4, '
         'on_hours=2, off_hours=2}']
SYNC = ["federated.fraction=0.05", "federated.rounds=14"]


@contextmanager
def per_client_eval_timer():
    """Seconds spent in per-client evaluation's own functions while the block runs."""
    import lifelong.flows.federated as fed
    import lifelong.flows.virtual_clock as vcm
    from lifelong.tasks import client_eval

    spent = defaultdict(float)
    targets = [(client_eval, n) for n in ("client_accuracies", "seen_accuracy", "spread", "client_forgetting",
                                          "matrix_table")]
    targets += [(fed, "client_test_indices"), (vcm, "client_test_indices")]
    originals = [(m, n, getattr(m, n)) for m, n in targets]

    def wrap(f):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent["s"] += time.perf_counter() - t
        return timed

    for m, n, f in originals:
        setattr(m, n, wrap(f))
    try:
        yield spent
    finally:
        for m, n, f in originals:
            setattr(m, n, f)


def run(out_dir: Path | None = None) -> dict:
    import lifelong  # noqa: F401
    from lifelong.clients.launch import inprocess_grid
    from lifelong.flows.federated import open_federated_run, serve
    from lifelong.flows.virtual_clock import VirtualClock

    out_dir = out_folder(out_dir, "lifelong-bench-clock-")
    uri = store(out_dir)
    start_prefect_api()
    create_store(uri)
    clock_cfg = bench_config("configs/federated_async.toml", [*COMMON, *CLOCK], uri, "bench-clock")
    sync_cfg = bench_config("configs/federated.toml", [*COMMON, *SYNC], uri, "bench-clock")

    run_id = open_federated_run(clock_cfg, uri)
    with open("/dev/null", "w") as quiet:
        # Checkpointed after every hourly evaluation, as the flow does (the synchronous side
        # below checkpoints every round).
        vc = VirtualClock(clock_cfg, run_id, uri, log=quiet, checkpoint=out_dir / "checkpoints" / run_id / "clock.pt")
        t = time.perf_counter()
        with per_client_eval_timer() as clock_eval:
            vc.run()
        clock_s = time.perf_counter() - t
    clock_updates = vc.total.applied

    run_id = open_federated_run(sync_cfg, uri)
    t = time.perf_counter()
    with per_client_eval_timer() as sync_eval:
        result = serve(inprocess_grid(sync_cfg), sync_cfg, run_id, uri,
                       checkpoint=out_dir / "checkpoints" / run_id / "federated.pt")
    sync_s = time.perf_counter() - t
    sync_updates = result.rounds * sync_cfg.federated.sampled
    per_clock, per_sync = clock_s / clock_updates, sync_s / sync_updates
    return {
        "workload": "Permuted-Digits, 1,000 IID clients, MLP, replay 200, 1 local epoch",
        "clock": {"virtual_hours": 24, "wall_s": clock_s, "updates_applied": clock_updates,
                  "updates_dropped": vc.total.dropped, "server_versions": vc.version,
                  "clients_participated": int((vc.participations > 0).sum()),
                  "online_fraction": vc.fleet.online_fraction(24.0)},
        "sync": {"rounds": result.rounds, "wall_s": sync_s, "updates_applied": sync_updates},
        "clock_s_per_update": per_clock, "sync_s_per_update": per_sync,
        "clock_over_sync_per_update": per_clock / per_sync,
        "per_client_eval_s": {"clock": clock_eval["s"], "sync": sync_eval["s"]},
        "per_client_eval_share": {"clock": clock_eval["s"] / clock_s, "sync": sync_eval["s"] / sync_s},
    }


def report(r: dict) -> str:
    c, s = r["clock"], r["sync"]
    ratio = r["clock_over_sync_per_update"]
    return "\n".join([
        f"\n== virtual clock at 1,000 clients ({r['workload']})",
        f"  clock (FedBuff, 50 at a time): {c['virtual_hours']} virtual hours in {c['wall_s']:.1f} s wall; "
        f"{c['updates_applied']} updates applied, {c['updates_dropped']} dropped, {c['server_versions']} server "
        f"versions; {c['clients_participated']} clients took part (online {c['online_fraction']:.0%} of the time)",
        f"  sync (50 sampled a round): {s['rounds']} rounds in {s['wall_s']:.1f} s; {s['updates_applied']} updates",
        f"  per applied update: clock {1000 * r['clock_s_per_update']:.1f} ms, sync "
        f"{1000 * r['sync_s_per_update']:.1f} ms  -> {ratio:.2f}x (target <= 1.3x: "
        f"{'met' if ratio <= 1.3 else 'NOT met'})",
        f"  per-client evaluation (1,000 clients; shares, accuracies, spreads): clock "
        f"{r['per_client_eval_s']['clock']:.2f} s = {r['per_client_eval_share']['clock']:.1%} of its wall, sync "
        f"{r['per_client_eval_s']['sync']:.2f} s = {r['per_client_eval_share']['sync']:.1%} (target <= 25%: "
        f"{'met' if max(r['per_client_eval_share'].values()) <= 0.25 else 'NOT met'})",
    ])
