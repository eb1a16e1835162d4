"""How Lifelong runs its flows in process: without Prefect's flow-run heartbeats, unless the user set them."""

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
