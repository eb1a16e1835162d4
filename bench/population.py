"""Federation at population scale: 10^3, 10^4 and 10^5 virtual clients, 100 sampled a round.

Each size runs ``configs/federated_population.toml`` (a generated population: every client's data
drawn from its id when sampled, heavy-tailed sizes, a replay memory per client kept in the
sharded client state store) on the in-process backend, in a fresh process of its own so that
peaks do not mix. Reported per size: the process's peak RSS (imports included: the target is
the whole process), the median seconds a round takes (from one round's messages to the next's,
so evaluation and aggregation count), the state store's size at the end and the bytes it wrote
and read per round, and the most client Contexts the grid held after a round's messages.

Targets (issue 19): peak RSS <= 1.5 GB at every size; a round at 10^5 within 1.2x of 10^3.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.setup import bench_config, out_folder, rss_mb, store

SIZES = (1_000, 10_000, 100_000)
COHORT = 100
OVERRIDES = ["federated.rounds=2", "tracking.log_plots=false", "tracking.log_model=false"]


def run(out_dir: Path | None = None) -> dict:
    out = out_folder(out_dir, "bench-population-")
    rows = {}
    for n in SIZES:
        res = subprocess.run([sys.executable, "-m", "bench.population", str(n), str(out)], capture_output=True,
                             text=True, check=False, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if res.returncode:
            raise RuntimeError(f"population bench at {n} clients failed:\n{res.stderr[-3000:]}")
        rows[str(n)] = json.loads(res.stdout.strip().splitlines()[-1])
    small, large = rows[str(SIZES[0])], rows[str(SIZES[-1])]
    return {"sizes": rows, "cohort": COHORT,
            "round_s_ratio_100000_over_1000": large["round_s_median"] / small["round_s_median"],
            **{f"rss_mb_at_{n}": rows[str(n)]["peak_rss_mb"] for n in SIZES}}


def _child(n: int, out_dir: Path) -> dict:
    os.environ["LIFELONG_CLIENT_STATE_DIR"] = str(out_dir / f"client-state-{n}")
    os.environ["LIFELONG_HOME"] = str(out_dir / f"home-{n}")  # the server's checkpoints
    import lifelong  # noqa: F401
    from lifelong.clients import state_store
    from lifelong.clients.inprocess import InProcessGrid
    from lifelong.clients.launch import inprocess_grid
    from lifelong.flows.checkpoints import checkpoint_file
    from lifelong.flows.federated import open_federated_run, serve

    io = {"written": 0, "read": 0}
    to_bytes, from_bytes = state_store.checkpoint_bytes, state_store.read_checkpoint_bytes

    def counted_write(state):
        data = to_bytes(state)
        io["written"] += len(data)
        return data

    def counted_read(data, *args, **kwargs):
        io["read"] += len(data)
        return from_bytes(data, *args, **kwargs)

    state_store.checkpoint_bytes, state_store.read_checkpoint_bytes = counted_write, counted_read
    starts, held = [], [0]
    send = InProcessGrid.send_and_receive

    def timed_send(self, messages, *, timeout=None):
        messages = list(messages)
        if messages:  # a round's train messages (Flower also asks for an evaluation round with none)
            starts.append(time.perf_counter())
        replies = send(self, messages, timeout=timeout)
        held[0] = max(held[0], len(self.contexts))
        return replies

    InProcessGrid.send_and_receive = timed_send
    uri = store(out_dir, f"population{n}.db")
    cfg = bench_config("configs/federated_population.toml",
                       [*OVERRIDES, f"federated.clients={n}", f"federated.fraction={COHORT / n}"], uri)
    run_id = open_federated_run(cfg, uri)
    before = rss_mb("VmRSS")
    t = time.perf_counter()
    # Checkpointed after every round, as every federated run is: clients save their state then.
    result = serve(inprocess_grid(cfg), cfg, run_id, uri, checkpoint=checkpoint_file(run_id))
    total = time.perf_counter() - t
    rounds = len(starts)
    folder = Path(os.environ["LIFELONG_CLIENT_STATE_DIR"]) / run_id
    return {"clients": n, "rounds": rounds, "seconds": total,
            # From one round's messages to the next's (the first round's start-up left out).
            "round_s_median": statistics.median(b - a for a, b in zip(starts[1:], starts[2:])),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_rounds_mb": before,
            "store_mb": sum(f.stat().st_size for f in folder.glob("*.sqlite")) / 2**20,
            "store_files": len(list(folder.glob("*.sqlite"))),
            # SQLite's write-ahead logs beside the shards (folded back into them as they fill).
            "store_wal_mb": sum(f.stat().st_size for f in folder.glob("*.sqlite-wal")) / 2**20,
            "written_mb_per_round": io["written"] / rounds / 2**20, "read_mb_per_round": io["read"] / rounds / 2**20,
            "contexts_held_max": held[0], "release_states": cfg.federated.release_states,
            "final_avg_acc": float(result.matrix[-1].mean())}


def report(r: dict) -> str:
    lines = [f"Population scale (generated population, {r['cohort']} clients a round, replay per client)",
             (f"  {'clients':>8} {'peak RSS':>9} {'s/round':>8} {'store (+log)':>15} {'shards':>6} {'write/rd':>9} "
              f"{'read/rd':>8} {'in memory':>9} {'avg acc':>7}")]
    for row in r["sizes"].values():
        lines.append(f"  {row['clients']:>8} {row['peak_rss_mb']:>6.0f} MB {row['round_s_median']:>8.2f} "
                     f"{row['store_mb']:>5.1f} (+{row['store_wal_mb']:>4.1f}) MB {row['store_files']:>6} "
                     f"{row['written_mb_per_round']:>6.2f} MB {row['read_mb_per_round']:>5.2f} MB "
                     f"{row['contexts_held_max']:>9} {row['final_avg_acc']:>7.3f}")
    worst = max(row["peak_rss_mb"] for row in r["sizes"].values())
    lines.append(f"  round at 10^5 / round at 10^3: {r['round_s_ratio_100000_over_1000']:.2f} (target <= 1.2); "
                 f"peak RSS at most {worst:.0f} MB (target <= 1536)")
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(_child(int(sys.argv[1]), Path(sys.argv[2]))))
