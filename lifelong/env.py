"""Where Lifelong keeps its state, and the process environment it needs: Prefect's and MLflow's
settings, how flows run in process, and which of Avalanche's dependencies load.

Prefect reads its settings when it is first imported, so this runs from
``lifelong/__init__.py``, before any flow module imports Prefect.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def state_dir() -> Path:
    """The project's state directory: ``$LIFELONG_HOME`` or ``./.lifelong``."""
    return Path(os.environ.get("LIFELONG_HOME", ".lifelong")).resolve()


def default_tracking_uri() -> str:
    """MLflow store: ``$MLFLOW_TRACKING_URI`` or SQLite at ``./mlruns.db``.

    SQLite rather than the file store: MLflow's file store is in maintenance mode.
    """
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlruns.db').resolve()}"


def prefect_home(home: Path) -> dict[str, str]:
    """The variables that put all of Prefect's files under ``home``. Prefect 3.7 derives its memo
    store's path from ``~/.prefect`` whatever ``PREFECT_HOME`` says (the server settings' default
    does not see the home setting), and warns at every server start where that is not writable."""
    return {"PREFECT_HOME": str(home), "PREFECT_SERVER_MEMO_STORE_PATH": str(Path(home) / "memo_store.toml")}


#: qpsolvers' backends that import JAX, and which Avalanche never calls (``hide_jax_qp_backends``).
_JAX_QP_BACKENDS = frozenset({"qpsolvers.solvers.jaxopt_osqp_", "qpsolvers.solvers.qpax_"})


class _HideJaxQpBackends(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in _JAX_QP_BACKENDS:
            raise ImportError(f"{name}: not loaded by Lifelong (lifelong.env.hide_jax_qp_backends)")
        return None  # every other module: the next finder's


def hide_jax_qp_backends() -> None:
    """Keep qpsolvers from importing JAX in every process that imports Avalanche.

    Avalanche imports qpsolvers for GEM, and qpsolvers imports every QP backend it finds
    installed. avalanche-lib requires ``qpsolvers[open_source_solvers]``, which installs two
    backends built on JAX (jaxopt's OSQP and qpax). Importing them costs about 1.2 s of CPU, out
    of ~7 s for the whole stack (``python -c "import lifelong.flows.federated"``, measured with and
    without). That cost falls on the CLI, every SuperNode's worker and every Ray actor. Avalanche
    only asks qpsolvers for ``solver="quadprog"`` (``avalanche/training/plugins/gem.py``), and pip
    cannot leave out one extra's packages. So the two backend modules are hidden from qpsolvers,
    which skips a backend whose import fails and registers the rest as before. JAX itself stays
    importable (the canary audit's jax-privacy uses it).
    """
    if not any(isinstance(f, _HideJaxQpBackends) for f in sys.meta_path):
        sys.meta_path.insert(0, _HideJaxQpBackends())


def configure_environment() -> None:
    """Set defaults that the user has not set: they always win over ours."""
    home = state_dir()
    # Prefect's ephemeral API keeps a SQLite database under PREFECT_HOME: keep it in our state dir.
    # SQLite cannot create the database in a folder that does not exist.
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    for key, value in prefect_home(Path(os.environ["PREFECT_HOME"])).items():
        os.environ.setdefault(key, value)
    # No network here but package registries: no telemetry, no update checks.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # The ephemeral API server can take longer than Prefect's default to start on 2 busy cores.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


@contextmanager
def in_process_flow_runs() -> Iterator[None]:
    """Flows Lifelong runs in its own process run without Prefect's flow-run heartbeats, unless
    the user set their frequency (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, or a Prefect profile).

    Prefect 3.7 sends a heartbeat every 180 s by default, from a thread that sleeps in 1 s steps,
    and a flow run that ends waits for that thread to wake: up to 1 s idle at the end of every
    run (0.35 s on the default pipeline, ``python -m bench overhead``), in every ``lifelong
    run``, every cell of a sweep and every test. Heartbeats let an automation on a Prefect server
    mark a run whose process died as crashed. A run Lifelong starts records its own state
    instead (its MLflow status, checkpoints, ``--resume``). Flows that a Prefect worker or a
    served deployment runs (schedules, arrivals) keep their heartbeats: this wraps direct calls only.
    """
    import prefect.settings
    from prefect.settings import get_current_settings, temporary_settings

    if "heartbeat_frequency" in get_current_settings().flows.model_fields_set:
        yield
        return
    with temporary_settings(updates={prefect.settings.PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
