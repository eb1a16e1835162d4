"""The process environment Lifelong sets: flows in process without Prefect's flow-run heartbeats
(unless the user set them), and Avalanche without qpsolvers' JAX backends."""

import subprocess
import sys

import prefect.settings
from prefect import flow
from prefect.settings import get_current_settings, temporary_settings

from lifelong.env import in_process_flow_runs


@flow(name="heartbeat-probe")
def heartbeat_in_the_run() -> int | None:
    # What Prefect's engine reads when it starts the run's heartbeat thread (None: no thread).
    return get_current_settings().flows.heartbeat_frequency


def test_a_flow_run_in_process_has_no_heartbeat_thread_to_wait_for():
    assert heartbeat_in_the_run() == 180  # Prefect 3.7's default: a thread the run's end waits on
    with in_process_flow_runs():
        assert heartbeat_in_the_run() is None
    assert get_current_settings().flows.heartbeat_frequency == 180  # only inside


def test_a_frequency_the_user_set_is_kept():
    with temporary_settings(updates={prefect.settings.PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 60}):
        with in_process_flow_runs():
            assert heartbeat_in_the_run() == 60


def test_avalanche_loads_without_jax_and_keeps_the_solver_it_uses():
    # A fresh process, as the CLI, a SuperNode's worker or a Ray actor starts: the suite's own has
    # JAX from other tests (the canary audit's jax-privacy).
    out = subprocess.run([sys.executable, "-c", "; ".join([
        "import sys, lifelong.bridges.avalanche.learners, avalanche.training.plugins.gem, qpsolvers",
        "s = qpsolvers.available_solvers",
        "print('jax' in sys.modules, 'quadprog' in s, 'jaxopt_osqp' in s, 'osqp' in s)",
        "import jax_privacy.auditing",  # JAX itself stays importable: the canary audit's library loads it
        "print('jax' in sys.modules)"])], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split() == ["False", "True", "False", "True", "True"], out.stdout + out.stderr
