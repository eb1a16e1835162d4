"""The continual loop in production, end to end on a real Prefect server: a served deployment whose
schedule checks a folder for new experience files; while none lands its runs do nothing, and when
one lands a run continues the champion and the registry gains its child version."""

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import prefect_server
import pytest
from sklearn.datasets import load_digits

from lifelong import registry
from lifelong.config import load_config
from lifelong.flows.continual import run_continual

pytestmark = [pytest.mark.integration, pytest.mark.heavy]
REPO = Path(__file__).resolve().parents[2]
NAME = "arrivals"
GATES = ["avg_accuracy >= champion - 0.5"]


def write(folder: Path, i: int, classes) -> None:
    d = load_digits()
    m = np.isin(d.target, classes)
    np.savez(folder / f"exp{i}.npz", x=(d.data[m].reshape(-1, 8, 8) / 16).astype(np.float32), y=d.target[m])


def overrides(tmp: Path) -> list[str]:
    return ['stream.name="folder"', f'stream.path="{tmp / "data"}"', "stream.n_classes=10",
            'model.name="mlp"', "model.hidden=32", "training.epochs=1", 'training.health_check="off"',
            'strategies=[{name="replay", mem_size=60}]', f'tracking.uri="sqlite:///{tmp / "mlruns.db"}"',
            "tracking.log_plots=false", f'tracking.model_name="{NAME}"', f"tracking.gates={json.dumps(GATES)}"]


def flow_runs(api_url: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return client.read_flow_runs()


def wait_for(what: str, check, proc, api_url: str, timeout_s: float = 150):
    deadline = time.monotonic() + timeout_s
    while not (got := check()):
        failed = [r for r in flow_runs(api_url) if r.state and (r.state.is_failed() or r.state.is_crashed())]
        if failed or time.monotonic() > deadline or not proc.alive():
            pytest.fail(f"{what} ({len(failed)} failed flow runs):\n{proc.log_tail()}")
        time.sleep(1)
    return got


def test_a_landed_file_is_learned_by_the_scheduled_continuation(tmp_path):
    (tmp_path / "data").mkdir()
    write(tmp_path / "data", 0, (0, 1, 2, 3, 4))
    run_continual(load_config(None, overrides(tmp_path)))  # the lineage starts: v1, champion
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    toml = tmp_path / "loop.toml"
    toml.write_text("\n".join(["[tracking]", 'continue_from = "champion"']) + "\n")
    with prefect_server.PrefectServer(tmp_path / "prefect") as server:
        env = {**os.environ, "PREFECT_API_URL": server.api_url, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
        args = [sys.executable, "-m", "lifelong.cli.schedule", "schedule", str(toml), "--interval", "5",
                "--name", "loop", *[a for o in overrides(tmp_path) for a in ("--set", o)]]
        proc = prefect_server.Background(args, env, tmp_path / "serve.log", cwd=REPO)
        try:
            # Nothing has landed: a scheduled run completes and the registry is as it was.
            wait_for("no completed run", lambda: any(r.state and r.state.is_completed()
                                                      for r in flow_runs(server.api_url)), proc,
                     server.api_url)
            assert [v.version for v in registry.lineage(uri, NAME)] == ["1"]
            write(tmp_path / "data", 1, (5, 6, 7, 8, 9))
            v2 = wait_for("no version 2", lambda: next(
                (v for v in registry.lineage(uri, NAME) if v.version == "2"), None), proc, server.api_url)
            # Registered first, then judged by the gates, then made champion: wait for the last step
            # (reading it at once raced the run's promotion).
            v2 = wait_for("version 2 never became champion", lambda: next(
                (v for v in registry.lineage(uri, NAME) if v.version == "2" and "champion" in v.aliases), None),
                proc, server.api_url)
        finally:
            proc.stop(signal.SIGINT)
    fields = registry.lineage_fields(v2)
    assert fields["parent"] == "1" and fields["experiences"] == ["exp0.npz", "exp1.npz"]
    assert "champion" in v2.aliases
    # One continuation for the one arrival: no run raced another to the same file.
    assert [v.version for v in registry.lineage(uri, NAME)] == ["1", "2"]
