"""`lifelong prune`: the resume state of finished runs goes; every other run's stays."""

import torch
from flwr.app import RecordDict
from typer.testing import CliRunner

from lifelong.cli.main import app as cli
from lifelong.clients import privacy_record
from lifelong.clients import state as st
from lifelong.clients import state_store as ss
from lifelong.config import load_config
from lifelong.tracking import client_for


def test_finished_runs_lose_their_checkpoints_and_client_state_and_the_others_keep_theirs(tmp_path, monkeypatch):
    home, uri = tmp_path / "home", f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("LIFELONG_HOME", str(home))
    monkeypatch.delenv(ss.ENV_VAR, raising=False)
    client = client_for(uri)
    exp = client.create_experiment("prune")
    runs = {}
    for status in ("FINISHED", "FAILED", "RUNNING"):
        run_id = client.create_run(exp).info.run_id
        if status != "RUNNING":
            client.set_terminated(run_id, status)
        runs[status] = run_id
    cfg = load_config(None, ['flow="federated"', 'model.name="mlp"', "federated.clients=2"])
    state = RecordDict()
    st.write_tensors(state, st.REPLAY, {"0/x": torch.ones(100, 10)})
    for run_id in [*runs.values(), "0123456789abcdef0123456789abcdef"]:  # the last: no run of this store
        (home / "checkpoints" / run_id).mkdir(parents=True)
        (home / "checkpoints" / run_id / "federated.pt").write_bytes(b"x" * 2**20)
        ss.save(state, cfg, ss.client_slot(ss.state_root(), run_id, 0), rnd=1, checkpointed=0)
    ledger = ss.state_root() / privacy_record.FILE
    ledger.write_bytes(b"the clients' own DP records")

    dry = CliRunner().invoke(cli, ["prune", "--tracking-uri", uri, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would remove" in dry.output and (home / "checkpoints" / runs["FINISHED"]).exists()

    out = CliRunner().invoke(cli, ["prune", "--tracking-uri", uri])
    assert out.exit_code == 0, out.output
    assert not (home / "checkpoints" / runs["FINISHED"]).exists()
    assert not (ss.state_root() / runs["FINISHED"]).exists()
    for kept in (runs["FAILED"], runs["RUNNING"], "0123456789abcdef0123456789abcdef"):
        assert (home / "checkpoints" / kept / "federated.pt").exists()
        assert ss.saved_rounds(ss.client_slot(ss.state_root(), kept, 0)) == [1]
    assert ledger.read_bytes() == b"the clients' own DP records"
    assert f"{runs['FAILED']}  FAILED" in out.output and "kept: resumable" in out.output
    assert "not in" in out.output
    freed = float(out.output.rsplit("freed ", 1)[1].split()[0])
    assert 1.0 <= freed < 1.5  # the finished run's 1 MB checkpoint and its client-state shard


def test_an_unreachable_store_removes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFELONG_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "checkpoints" / "abc").mkdir(parents=True)
    out = CliRunner().invoke(cli, ["prune", "--tracking-uri", "http://127.0.0.1:9"])
    assert out.exit_code == 1 and "error:" in out.output
    assert (tmp_path / "home" / "checkpoints" / "abc").exists()


def test_a_store_that_does_not_exist_is_not_created(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFELONG_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "checkpoints" / "abc").mkdir(parents=True)
    out = CliRunner().invoke(cli, ["prune", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"])
    assert out.exit_code == 1 and "no MLflow store" in out.output
    assert not (tmp_path / "none.db").exists() and (tmp_path / "home" / "checkpoints" / "abc").exists()
