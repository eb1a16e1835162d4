"""Test session set-up: Lifelong's state (Prefect's home) goes to a temporary folder.

This runs before any test imports ``lifelong``, whose import configures Prefect from it.
"""

import atexit
import os
import shutil
import tempfile

if "LIFELONG_HOME" not in os.environ:
    # Made by the process that starts the session (xdist's workers inherit it), removed when it exits.
    _HOME = tempfile.mkdtemp(prefix="lifelong-test-home-")
    os.environ["LIFELONG_HOME"] = _HOME
    atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
os.environ.pop("PREFECT_API_URL", None)  # tests start their own API (ephemeral or a real server)
# xdist's workers share the cores: one compute thread each. Torch's default (a thread per core)
# oversubscribed them — the 28×28 training tests ran 2-4× slower side by side. Set before torch
# is imported; the servers and clients the tests start inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# Prefect and MLflow configure logging with dictConfig when first imported, which closes every
# handler that exists then. absl's (imported with dp_accounting) closes the stream it was made
# with unless that stream is sys.stderr *now*: a test importing dp_accounting under pytest's
# capture, then a CliRunner test importing Prefect first, closed pytest's own capture stream and
# every later test in that worker failed. Configured here, once, before any test runs.
# --------------------------------------------------------------------------- the working tree stays clean
# Tests write only into temporary folders: a suite that leaves a file in the checkout (an MLflow
# store, artifacts, state) fails, naming what it left. Checked once, by the process that runs the
# session (xdist's controller, or the only process).
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import mlflow  # noqa: E402, F401
import prefect.main  # noqa: E402, F401  (prefect's own __init__ defers its logging set-up to this)

import lifelong  # noqa: E402, F401  (first: it sets Prefect's environment from LIFELONG_HOME)

_ROOT = Path(__file__).resolve().parents[1]
#: Tool caches that a test run legitimately writes (and the venv the suite runs from).
_TOOL_CACHES = (".venv", ".pytest_cache", ".hypothesis", "__pycache__", ".egg-info", ".ruff_cache")


def _tree_state() -> dict[str, tuple[int, float]] | None:
    """Every untracked or ignored path of the checkout but tool caches: files, and folders with
    their file count and newest modification, so a file added inside a folder counts too."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--ignored", "-z"], cwd=_ROOT,
                             capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None  # not a git checkout: nothing to compare against
    state = {}
    for entry in filter(None, out.split("\0")):
        status, path = entry[:2], entry[3:]
        if status not in ("??", "!!") or any(part.endswith(_TOOL_CACHES) for part in Path(path).parts):
            continue
        full = _ROOT / path
        files = [f for f in full.rglob("*") if f.is_file()] if full.is_dir() else [full]
        files = [f for f in files if not any(p.endswith(_TOOL_CACHES) for p in f.relative_to(_ROOT).parts)]
        state[path] = (len(files), max((f.stat().st_mtime for f in files if f.exists()), default=0.0))
    return state


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput"):
        session.config._tree_before = _tree_state()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_tree_before", None)
    if before is None or hasattr(session.config, "workerinput"):
        return
    after = _tree_state() or {}
    left = sorted(p for p, s in after.items() if before.get(p) != s)
    if left:
        session.config.get_terminal_writer().line(
            "the test suite left these in the working tree (tests write only into temporary folders): "
            + ", ".join(left), red=True)
        session.exitstatus = 1


def pytest_collection_modifyitems(config, items):
    """Heaviest files first, then the other integration files, then the rest — the order in which
    `make test` (``--no-loadscope-reorder``) hands whole files to its workers, so that the long
    ones start early and the short ones fill in at the end. Stable: a file keeps its tests' order."""
    def rank(item) -> int:
        return 0 if item.get_closest_marker("heavy") else 1 if item.get_closest_marker("integration") else 2

    items.sort(key=rank)
