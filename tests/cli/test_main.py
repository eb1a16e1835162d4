"""The `lifelong` command: help, listings, and clear errors before any work starts."""

import subprocess
import sys

from typer.testing import CliRunner

from lifelong.cli.main import app

runner = CliRunner()


def test_help_documents_every_command():
    out = runner.invoke(app, ["--help"])
    assert out.exit_code == 0
    for cmd in ("run", "strategies", "streams", "results", "sweep", "clients", "registry", "schedule", "audit"):
        assert cmd in out.output


def test_strategies_lists_names_and_papers():
    out = runner.invoke(app, ["strategies"])
    assert out.exit_code == 0
    for name in ("naive", "replay", "joint"):
        assert name in out.output
    assert "paper:" in out.output and "Chaudhry" in out.output


def test_streams_lists_builtin_and_byo():
    out = runner.invoke(app, ["streams"])
    assert out.exit_code == 0
    for name in ("split_digits", "permuted_digits", "rotated_digits", "split_mnist", "npz"):
        assert name in out.output


def test_bad_config_is_refused_with_exit_2_and_no_traceback(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[[strategies]]\nname = "nope"\n')
    out = runner.invoke(app, ["run", str(cfg)])
    assert out.exit_code == 2
    assert "strategies.0" in out.output and "'nope'" in out.output
    assert "Traceback" not in out.output


def test_missing_benchmark_files_say_where_to_put_them(tmp_path):
    out = runner.invoke(app, ["run", "--set", 'stream.name="split_mnist"',
                              "--set", f'stream.data_dir="{tmp_path}"'])
    assert out.exit_code == 2
    assert "MNIST not found" in out.output and str(tmp_path) in out.output
    assert "Nothing is downloaded" in out.output


def test_results_of_an_unknown_run(tmp_path):
    out = runner.invoke(app, ["results", "0123abc", "--tracking-uri", f"sqlite:///{tmp_path / 'x.db'}"])
    assert out.exit_code == 2 and "no MLflow run '0123abc'" in out.output


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "lifelong.cli.main", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "results" in out.stdout


def test_an_unreachable_or_foreign_tracking_store_is_refused_before_any_work(tmp_path):
    import sqlite3

    foreign = tmp_path / "prefect.db"  # another tool's database: alembic at a revision MLflow does not know
    with sqlite3.connect(foreign) as db:
        db.execute("create table alembic_version (version_num varchar(32))")
        db.execute("insert into alembic_version values ('deadbeef1234')")
    for uri, expected in (("http://127.0.0.1:9", "cannot reach the MLflow tracking server at http://127.0.0.1:9"),
                          (f"sqlite:///{foreign}", "Can't locate revision identified by 'deadbeef1234'")):
        result = runner.invoke(app, ["run", "--set", f'tracking.uri="{uri}"', "--set", "training.epochs=1"])
        assert result.exit_code == 2, result.output
        assert "error: tracking.uri:" in result.output and expected in result.output
        assert "Traceback" not in result.output
