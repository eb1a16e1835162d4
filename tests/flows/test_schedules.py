"""`lifelong schedule`: bad input refused before any server is touched, and — against a real Prefect
server on loopback — a served deployment whose triggered run completes into MLflow, listed,
paused, resumed, deleted, and stopped without leaving a process behind.
"""

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import prefect_server
import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings
from typer.testing import CliRunner

from lifelong.cli.schedule import app
from lifelong.config import load_config, validate_config
from lifelong.flows import schedules as sched
from lifelong.tracking import client_for, read_results

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


CRON = "0 2 * * *"
NAME = "nightly"
FULL = f"continual/{NAME}"
UNREACHABLE = "http://127.0.0.1:1/api"


def tiny_toml(tmp: Path, name: str = NAME) -> tuple[Path, str]:
    """A two-experience MLP run with one strategy, tracked in its own SQLite store."""
    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    path = tmp / f"{name}.toml"
    path.write_text(f"""\
seed = 0
flow = "continual"

[stream]
name = "split_digits"
n_experiences = 2

[model]
name = "mlp"
hidden = 16

[training]
epochs = 1

[[strategies]]
name = "naive"

[tracking]
uri = "{uri}"
experiment = "scheduled"
log_model = false
log_plots = false
""")
    return path, uri


def invoke(*args: str):
    return runner.invoke(app, ["schedule", *args])


def no_traceback(result) -> bool:
    return result.exception is None or isinstance(result.exception, SystemExit)


@pytest.fixture
def no_server(monkeypatch):
    """Fails the test if the command reaches for a server: these inputs must be refused before."""
    def touched():
        raise AssertionError("the server was contacted before the input was validated")

    monkeypatch.setattr(sched, "require_server", touched)


# --------------------------------------------------------------------------- bad input, no server


@pytest.mark.parametrize("expr", ["0 25 * * *", "every night", "H 2 * * *", "* * *"])
def test_an_invalid_cron_is_refused_quoting_it(tmp_path, no_server, expr):
    config, _ = tiny_toml(tmp_path)
    out = invoke(str(config), "--cron", expr)
    assert out.exit_code == 2 and no_traceback(out)
    assert f'error: --cron "{expr}" is not a valid cron expression' in out.output
    assert len(out.output.strip().splitlines()) == 1


@pytest.mark.parametrize("expr", ["FREQ=SOMETIMES", "nonsense", "FREQ=DAILY;BYHOUR=25"])
def test_an_invalid_rrule_is_refused_quoting_it(tmp_path, no_server, expr):
    config, _ = tiny_toml(tmp_path)
    out = invoke(str(config), "--rrule", expr)
    assert out.exit_code == 2 and no_traceback(out)
    assert f'error: --rrule "{expr}" is not a valid RRule (' in out.output


@pytest.mark.parametrize("seconds", ["0", "-5", "nan"])
def test_an_interval_that_is_not_positive_is_refused(tmp_path, no_server, seconds):
    config, _ = tiny_toml(tmp_path)
    out = invoke(str(config), "--interval", seconds)
    assert out.exit_code == 2 and no_traceback(out)
    assert "the interval must be a positive number of seconds" in out.output


@pytest.mark.parametrize("args, expected", [
    ([], "give exactly one of --cron, --interval, --rrule"),
    (["--cron", CRON, "--interval", "60"], "(got --cron, --interval)"),
    (["--cron", CRON, "--timezone", "Mars/Olympus"], '--timezone "Mars/Olympus" is not an IANA time zone'),
    (["--cron", CRON, "--name", "a/b"], "--name 'a/b'"),
    (["--cron", CRON, "--set", "stream.n_experiences=7"], "stream.n_experiences: 7 experiences"),
])
def test_bad_options_and_configs_are_refused_before_the_server(tmp_path, no_server, args, expected):
    config, _ = tiny_toml(tmp_path)
    out = invoke(str(config), *args)
    assert out.exit_code == 2 and no_traceback(out), out.output
    assert expected in out.output and out.output.startswith("error: ")


def test_a_missing_config_file_is_refused(tmp_path, no_server):
    out = invoke(str(tmp_path / "nope.toml"), "--cron", CRON)
    assert out.exit_code == 2 and "config file not found" in out.output


@pytest.mark.parametrize("args", [["--list", "--pause", "x"], ["--delete", "x", "--cron", CRON],
                                  ["--list", "c.toml"]])
def test_management_options_do_not_mix(no_server, args):
    out = invoke(*args)
    assert out.exit_code == 2 and "do not go together" in out.output


def test_no_config_and_no_action_says_what_to_give(no_server):
    out = invoke()
    assert out.exit_code == 2 and "give a CONFIG.toml and a schedule" in out.output


def test_without_prefect_api_url_it_refuses_and_says_how_to_start_a_server(tmp_path):
    config, _ = tiny_toml(tmp_path)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        for args in ([str(config), "--cron", CRON], ["--list"], ["--pause", NAME]):
            out = invoke(*args)
            assert out.exit_code == 1 and no_traceback(out), out.output
            assert "PREFECT_API_URL is not set" in out.output and "ephemeral API" in out.output
            assert "prefect server start --host 127.0.0.1 --port 4200" in out.output
            assert "export PREFECT_API_URL=http://127.0.0.1:4200/api" in out.output
            assert "make stack" in out.output


def test_an_unreachable_server_is_named_with_its_url(tmp_path):
    config, _ = tiny_toml(tmp_path)
    with temporary_settings({PREFECT_API_URL: UNREACHABLE}):
        for args in ([str(config), "--cron", CRON], ["--resume", NAME]):
            out = invoke(*args)
            assert out.exit_code == 1 and no_traceback(out), out.output
            assert f"no Prefect server answers at PREFECT_API_URL={UNREACHABLE}" in out.output
            assert "prefect server start" in out.output


def test_every_example_config_survives_the_trip_through_a_deployment_parameter():
    for path in sorted((REPO / "configs").glob("*.toml")):
        cfg = load_config(path)
        params = sched.deployment_parameters(cfg)
        back = validate_config(json.loads(json.dumps(params["config"])))  # what a run receives
        # The data path is pinned too, so a run reads it wherever the deployment is served from.
        stream = cfg.stream if cfg.stream.path is None else \
            cfg.stream.model_copy(update={"path": cfg.stream.path.resolve()})
        assert back.model_copy(update={"tracking": cfg.tracking}) == cfg.model_copy(update={"stream": stream}), path
        assert back.stream.path is None or back.stream.path.is_absolute()
        assert back.tracking.uri  # the MLflow store is pinned when the schedule is made
    assert sched.default_name("configs/default.toml") == "default"


def test_schedules_are_prefects_own():
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule, RRuleSchedule

    assert isinstance(sched.build_schedule(cron=CRON, timezone="Europe/Paris"), CronSchedule)
    every = sched.build_schedule(interval=90)
    assert isinstance(every, IntervalSchedule) and every.interval.total_seconds() == 90
    assert isinstance(sched.build_schedule(rrule="FREQ=WEEKLY;BYDAY=MO;BYHOUR=2"), RRuleSchedule)


def test_the_lifelong_command_registers_schedule():
    from lifelong.cli.main import app as main_app

    if not any((c.name or c.callback.__name__) == "schedule" for c in main_app.registered_commands):
        pytest.skip("cli/main.py does not register `schedule` yet (hook in cli/schedule.py)")
    out = runner.invoke(main_app, ["schedule", "--help"])
    assert out.exit_code == 0 and "--cron" in out.output and "--list" in out.output


# --------------------------------------------------------------------------- a real server


@dataclass
class Served:
    process: "prefect_server.Background"
    config: Path
    uri: str
    created_at: float


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with prefect_server.PrefectServer(tmp_path_factory.mktemp("prefect-server")) as srv:
        yield srv


@pytest.fixture
def api(server):
    """This process's Prefect client talks to the test server."""
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        yield server


@pytest.fixture(scope="module")
def served(server, tmp_path_factory):
    """`lifelong schedule tiny.toml --cron ...` in its own process, serving, until the module ends."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    tmp = tmp_path_factory.mktemp("served")
    config, uri = tiny_toml(tmp)
    env = {**os.environ, "PREFECT_API_URL": server.api_url, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    proc = prefect_server.Background(
        [sys.executable, "-m", "lifelong.cli.schedule", "schedule", str(config), "--cron", CRON],
        env, tmp / "serve.log", cwd=REPO)
    deadline = time.monotonic() + 90
    with temporary_settings({PREFECT_API_URL: server.api_url}), get_client(sync_client=True) as client:
        while True:
            try:
                client.read_deployment_by_name(FULL)
                break
            except ObjectNotFound:
                pass
            if not proc.alive() or time.monotonic() > deadline:
                proc.stop()
                pytest.fail(f"the served process did not create {FULL}:\n{proc.log_tail()}")
            time.sleep(0.5)
    try:
        yield Served(proc, config, uri, time.monotonic())
    finally:
        proc.stop(signal.SIGINT)  # raises if a flow-run process were left behind


@pytest.mark.integration
def test_the_deployment_carries_the_validated_config(api, served):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(FULL)
    assert dep.entrypoint == "lifelong.flows.continual.continual_flow"
    assert "lifelong" in dep.tags and not dep.paused
    assert [s.schedule.cron for s in dep.schedules] == [CRON]
    cfg = validate_config(dep.parameters["config"])
    assert cfg.tracking.uri == served.uri and cfg.stream.n_experiences == 2
    assert "serving" in served.process.log_tail()


@pytest.mark.integration
def test_a_triggered_run_is_executed_by_the_served_process_into_mlflow(api, served):
    from prefect.deployments import run_deployment

    run = run_deployment(FULL, timeout=150, poll_interval=1)
    assert run.state is not None and run.state.is_completed(), (run.state, served.process.log_tail())
    assert run.parameters["config"]["training"]["epochs"] == 1
    client = client_for(served.uri)
    exp = client.get_experiment_by_name("scheduled")
    parents = [r for r in client.search_runs([exp.experiment_id], "tags.`lifelong.flow` = 'continual'")
               if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    res = read_results(parents[0].info.run_id, served.uri)
    assert [c.name for c in res.children] == ["naive"]
    assert res.children[0].status == "FINISHED" and res.children[0].matrix.shape == (2, 2)
    assert 0.0 <= res.children[0].metrics["final/avg_accuracy"] <= 1.0


@pytest.mark.integration
def test_the_server_schedules_the_next_cron_run(api, served, server):
    import datetime as dt

    deadline = served.created_at + 30  # the server's recent-deployments loop runs every 5 s
    while True:
        row = next(r for r in sched.list_deployments() if r.name == FULL)
        if row.next_run is not None:
            break
        assert "Can't evaluate bulk DML" not in server.log_tail(50_000), "the server's scheduler fails"
        assert time.monotonic() < deadline, "no scheduled run after 30 s"
        time.sleep(1)
    now = dt.datetime.now(dt.UTC)
    expected = now.replace(hour=2, minute=0, second=0, microsecond=0)
    if expected <= now:
        expected += dt.timedelta(days=1)
    assert row.next_run == expected


@pytest.mark.integration
def test_list_shows_schedule_state_and_whether_served(api, served):
    out = invoke("--list")
    assert out.exit_code == 0, out.output
    line = next(ln for ln in out.output.splitlines() if ln.startswith(FULL))
    assert line.split()[1:3] == ["active", "yes"] and f'cron "{CRON}" (UTC)' in line


@pytest.mark.integration
def test_pause_and_resume_by_name_or_flow_slash_name(api, served):
    from prefect.client.orchestration import get_client

    out = invoke("--pause", NAME)
    assert out.exit_code == 0 and f"{FULL}: paused" in out.output, out.output
    assert " paused " in next(ln for ln in invoke("--list").output.splitlines() if ln.startswith(FULL))
    with get_client(sync_client=True) as client:
        assert client.read_deployment_by_name(FULL).paused
    out = invoke("--resume", FULL)
    assert out.exit_code == 0 and f"{FULL}: resumed" in out.output, out.output
    with get_client(sync_client=True) as client:
        assert not client.read_deployment_by_name(FULL).paused


@pytest.mark.integration
def test_a_name_two_flows_share_needs_the_flow_and_delete_removes_one(api, served):
    other = load_config(None, ['flow="multitask"', "multitask.epochs=1"])
    sched.apply(sched.make_deployment(other, NAME, sched.build_schedule(interval=3600)))

    out = invoke("--pause", NAME)
    assert out.exit_code == 2 and no_traceback(out)
    assert f"'{NAME}' names 2 deployments (continual/{NAME}, multitask/{NAME}); give it as flow/deployment" \
        in out.output
    listed = invoke("--list").output
    line = next(ln for ln in listed.splitlines() if ln.startswith(f"multitask/{NAME}"))
    assert line.split()[1:3] == ["active", "no"] and "every 3600 s" in line  # nobody serves it
    assert "a deployment nobody serves gets late runs" in listed

    out = invoke("--resume", f"multitask/{NAME}")
    assert out.exit_code == 0 and "nobody serves it" in out.output, out.output
    out = invoke("--delete", f"multitask/{NAME}")
    assert out.exit_code == 0 and f"multitask/{NAME}: deleted" in out.output, out.output
    assert "keeps running" not in out.output
    assert f"multitask/{NAME}" not in invoke("--list").output
    out = invoke("--delete", f"multitask/{NAME}")
    assert out.exit_code == 2 and no_traceback(out)
    assert f"no deployment named 'multitask/{NAME}' (known: {FULL};" in out.output


@pytest.mark.integration
@pytest.mark.parametrize("option", ["--pause", "--resume", "--delete"])
def test_an_unknown_name_is_refused(api, served, option):
    out = invoke(option, "no-such-schedule")
    assert out.exit_code == 2 and no_traceback(out)
    assert "no deployment named 'no-such-schedule'" in out.output and "lifelong schedule --list" in out.output


@pytest.mark.integration
def test_stopping_the_served_process_pauses_it_and_leaves_no_process(api, served):
    from prefect.client.orchestration import get_client

    # Let the finished run's process exit first: stopped in that window, Prefect's runner logs a
    # harmless "Failed to kill process" traceback for the run it has not yet reaped.
    deadline = time.monotonic() + 30
    while any("spawn_main" in p for p in prefect_server.group_members(served.process.pgid)):
        assert time.monotonic() < deadline, prefect_server.group_members(served.process.pgid)
        time.sleep(0.2)
    time.sleep(1)
    code = served.process.stop(signal.SIGINT)  # Ctrl-C; raises if any process of its group survives
    assert code == 0, served.process.log_tail()
    with get_client(sync_client=True) as client:
        assert client.read_deployment_by_name(FULL).paused  # Prefect's runner pauses on shutdown
    log = served.process.log_tail(50_000)
    assert not unexpected_tracebacks(log), log
    assert log.rstrip().endswith(f"stopped serving {FULL} (Prefect paused it; serving it again resumes it)")


def unexpected_tracebacks(log: str) -> list[str]:
    """The log's tracebacks, less Prefect's "Failed to kill process for flow run ... during
    shutdown": a race in Prefect 3.7's runner (the run's process has exited, the runner has not
    yet dropped it) that the wait above makes rare but cannot rule out on a loaded machine."""
    parts = log.split("Traceback (most recent call last):")
    return [block for before, block in zip(parts, parts[1:])
            if not ("Failed to kill process for flow run" in before[-300:] and "during shutdown" in before[-300:])]


@pytest.mark.integration
def test_deleting_a_served_deployment_then_stopping_its_process_is_clean(api, tmp_path):
    config, _ = tiny_toml(tmp_path, "hourly")
    env = {**os.environ, "PREFECT_API_URL": api.api_url, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    proc = prefect_server.Background(
        [sys.executable, "-m", "lifelong.cli.schedule", "schedule", str(config), "--interval", "3600"],
        env, tmp_path / "serve.log", cwd=REPO)
    try:
        deadline = time.monotonic() + 90
        while "serving:" not in proc.log_tail():
            assert proc.alive() and time.monotonic() < deadline, proc.log_tail()
            time.sleep(0.5)
        # Wait until it counts as served (polled at least once): on a loaded machine the first
        # poll can come later than the 1 s poll frequency promises (a fixed 2 s sleep flaked).
        while not any(r.name == "continual/hourly" and r.served for r in sched.list_deployments()):
            assert proc.alive() and time.monotonic() < deadline + 60, proc.log_tail()
            time.sleep(0.5)
        out = invoke("--delete", "hourly")
        assert out.exit_code == 0, out.output
        assert "continual/hourly: deleted" in out.output
        assert "the process serving it keeps running" in out.output
    finally:
        code = proc.stop(signal.SIGINT)
    log = proc.log_tail(50_000)
    assert code == 0 and "Traceback" not in log, log
    assert log.rstrip().endswith("stopped serving continual/hourly (it had been deleted)")
