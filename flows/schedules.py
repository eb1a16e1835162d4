"""Scheduled pipelines: a validated config becomes a Prefect deployment, served by this process.

Why a served deployment (``flow.to_deployment`` + ``prefect.serve``) rather than a work pool:
a served process imports our flows once and runs each flow run in a fresh child process, on this
machine, with this environment — no pool, worker or code storage to set up. The runs it executes
are the deployment's scheduled runs and any run triggered by hand (``prefect deployment run``,
the UI, ``run_deployment``).

Why a real server: Prefect's ephemeral API lives only as long as the process that started it and
runs no scheduler service, so a schedule on it never fires (Prefect warns and runs nothing).
Every entry point here first checks that ``PREFECT_API_URL`` is set and that a server answers
there, and says how to start one when not.

Why the config is a deployment parameter: the validated config, as JSON, is frozen into the
deployment when it is created (with the MLflow store resolved), so a run tomorrow at 02:00 runs
what was validated today, whatever happens to the TOML file meanwhile. The flows accept a dict
and validate it again (``validate_parameters=False``: Prefect does not coerce it).

The command-line wiring is in ``cli/schedule.py``; this module raises
:class:`ScheduleError` with one line a user can act on, and never prints.
"""

from __future__ import annotations

import datetime as dt
import importlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lifelong.config import Config
from lifelong.env import default_tracking_uri

if TYPE_CHECKING:  # Prefect's client schemas are imported when a command needs them
    from prefect.client.schemas.objects import DeploymentSchedule
    from prefect.client.schemas.responses import DeploymentResponse
    from prefect.client.schemas.schedules import SCHEDULE_TYPES

# config ``flow`` -> (module, flow object). Imported lazily: the federated flow imports Flower.
FLOWS: dict[str, tuple[str, str]] = {
    "continual": ("lifelong.flows.continual", "continual_flow"),
    "federated": ("lifelong.flows.federated", "federated_flow"),
    "multitask": ("lifelong.flows.multitask", "multitask_flow"),
}
TAG = "lifelong"
HEALTH_TIMEOUT_S = 5.0
# A served deployment is polled every PREFECT_RUNNER_POLL_FREQUENCY (10 s); Prefect's server calls
# one unpolled for 60 s "not ready" (PREFECT_SERVER_SERVICES_FOREMAN_DEPLOYMENT_LAST_POLLED_TIMEOUT_SECONDS).
SERVED_WITHIN_S = 60

START_SERVER = (
    "start one with `prefect server start --host 127.0.0.1 --port 4200` (or `make stack`), then "
    "`export PREFECT_API_URL=http://127.0.0.1:4200/api`"
)


class ScheduleError(Exception):
    """A one-line, user-facing reason why a scheduling command cannot proceed.

    ``code`` is the exit status the command line gives it, as elsewhere in ``lifelong``: 2 for bad
    input (an expression, a name), 1 when the server cannot be reached or refuses.
    """

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- schedules


def build_schedule(cron: str | None = None, interval: float | None = None, rrule: str | None = None,
                   timezone: str | None = None) -> SCHEDULE_TYPES:
    """Exactly one of cron / interval (seconds) / rrule, validated by Prefect's own schedule models.

    Runs before anything touches a server, so a typo costs nothing. Prefect's cron check
    (croniter, without its random/hashed extensions) and rrule check (dateutil) are the ones the
    server applies; we only reword their errors so they quote the expression and name the option.
    """
    options = (("--cron", cron), ("--interval", interval), ("--rrule", rrule))
    given = [opt for opt, value in options if value is not None]
    if len(given) != 1:
        raise ScheduleError("give exactly one of --cron, --interval, --rrule"
                            + (f" (got {', '.join(given)})" if given else ""))
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule, RRuleSchedule

    if timezone is not None:
        _check_timezone(timezone)
    if interval is not None:
        if not interval > 0:  # also refuses NaN
            raise ScheduleError(f"--interval {interval:g}: the interval must be a positive number of seconds")
        return IntervalSchedule(interval=dt.timedelta(seconds=interval), timezone=timezone)
    if cron is not None:
        try:
            return CronSchedule(cron=cron, timezone=timezone)
        except Exception:  # pydantic's ValidationError wraps Prefect's ValueError
            raise ScheduleError(
                f'--cron "{cron}" is not a valid cron expression: five fields, minute hour day-of-month '
                'month day-of-week, e.g. "0 2 * * *" for 02:00 every day') from None
    try:
        return RRuleSchedule(rrule=rrule, timezone=timezone or "UTC")
    except Exception as exc:
        reason = _first_error(exc)
        raise ScheduleError(f'--rrule "{rrule}" is not a valid RRule ({reason}); '
                            'e.g. "FREQ=WEEKLY;BYDAY=MO;BYHOUR=2;BYMINUTE=0"') from None


def _check_timezone(timezone: str) -> None:
    from prefect.client.schemas.schedules import is_valid_timezone

    if not is_valid_timezone(timezone):
        raise ScheduleError(f'--timezone "{timezone}" is not an IANA time zone (e.g. "Europe/Paris", "UTC")')


def _first_error(exc: Exception) -> str:
    """The message of a pydantic error (or any other), without pydantic's boilerplate."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            msg = str(errors()[0].get("msg", exc))
        except Exception:
            msg = str(exc)
    else:
        msg = str(exc)
    msg = msg.removeprefix("Value error, ").splitlines()[0]
    # Prefect's own message repeats the expression we already quote: keep dateutil's reason.
    return msg.rsplit('": ', 1)[-1] if msg.startswith("Invalid RRule string") else msg


def describe_schedule(schedule: SCHEDULE_TYPES) -> str:
    """One line for a schedule as a user would have written it."""
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule, RRuleSchedule

    if isinstance(schedule, CronSchedule):
        return f'cron "{schedule.cron}" ({schedule.timezone or "UTC"})'
    if isinstance(schedule, IntervalSchedule):
        seconds = schedule.interval.total_seconds()
        return f"every {seconds:g} s ({schedule.interval})"
    if isinstance(schedule, RRuleSchedule):
        # The server pins a DTSTART line in front of the rule: show the rule itself.
        lines = [ln for ln in schedule.rrule.splitlines() if not ln.startswith("DTSTART")]
        return f'rrule "{" ".join(lines) or schedule.rrule}" ({schedule.timezone or "UTC"})'
    return str(schedule)


# --------------------------------------------------------------------------- deployments


def default_name(config_path: str | Path) -> str:
    """The deployment's default name: the config file's name, ``default`` for configs/default.toml."""
    return Path(config_path).stem


def deployment_parameters(cfg: Config) -> dict[str, Any]:
    """The flow's parameters, JSON-able: the validated config, with the MLflow store resolved now.

    ``tracking.uri`` left empty means ``$MLFLOW_TRACKING_URI`` or ./mlruns.db at run time; pinning
    it here makes every scheduled run log where the person who scheduled it expects.
    """
    data = cfg.model_dump(mode="json", by_alias=True)
    if data["stream"].get("path"):  # read where it was meant, whatever directory serves the runs
        data["stream"]["path"] = str(Path(data["stream"]["path"]).resolve())
    if not data["tracking"].get("uri"):
        data["tracking"]["uri"] = default_tracking_uri()
    return {"config": data}


def flow_for(cfg: Config):
    """The Prefect flow object that runs this config (by its ``flow`` key)."""
    module, attr = FLOWS[cfg.flow]
    return getattr(importlib.import_module(module), attr)


def require_server() -> str:
    """The API URL of a Prefect server that answers; :class:`ScheduleError` otherwise.

    Checked before any deployment call: without ``PREFECT_API_URL``, Prefect's client would start
    an ephemeral API in this process, accept the deployment, and never run it.
    """
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ScheduleError(
            "schedules need a Prefect server: PREFECT_API_URL is not set, and Prefect's ephemeral API "
            f"(what `lifelong run` uses) cannot run schedules; {START_SERVER}", code=1)
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    # One bounded attempt: Prefect's client would retry a silent address with growing back-off.
    try:
        with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0}), \
                get_client(httpx_settings={"timeout": HEALTH_TIMEOUT_S}, sync_client=True) as client:
            problem = client.api_healthcheck()
    except Exception as exc:  # a malformed URL fails before any request
        problem = exc
    if problem is not None:
        raise ScheduleError(f"no Prefect server answers at PREFECT_API_URL={url} "
                            f"({_short(problem)}); {START_SERVER}", code=1)
    return url


def _short(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if response is not None and getattr(response, "status_code", None):
        return f"HTTP {response.status_code} from {response.request.url}"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def make_deployment(cfg: Config, name: str, schedule: SCHEDULE_TYPES, source: str | None = None):
    """The runner deployment for ``cfg``: its flow, the schedule, the config as its parameter.

    The entrypoint is the flow's module path (``lifelong.flows.continual.continual_flow``), importable
    wherever the package is installed, rather than a file path relative to today's directory.
    """
    from prefect.exceptions import InvalidNameError
    from prefect.types.entrypoint import EntrypointType

    flow = flow_for(cfg)
    about = f"Lifelong {cfg.flow} pipeline" + (f" from {source}" if source else "")
    limit = None
    if cfg.tracking.continue_from is not None:
        # A continuation checks for new data and learns it: two runs at once would both continue the
        # same champion from the same new file. One at a time; a run due while one works is cancelled
        # (the next one finds whatever is still new).
        from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

        limit = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
        about += ": continues the lineage when new experience files land, does nothing when none did"
    try:
        return flow.to_deployment(
            name=name,
            schedules=[schedule],
            parameters=deployment_parameters(cfg),
            description=about,
            tags=[TAG],
            entrypoint_type=EntrypointType.MODULE_PATH,
            concurrency_limit=limit,
        )
    except InvalidNameError as exc:
        raise ScheduleError(f"--name {name!r}: {exc}") from None


def apply(deployment) -> str:
    """Create or update the deployment on the server; returns its full ``flow/deployment`` name."""
    import httpx
    from prefect.deployments.runner import DeploymentApplyError

    try:
        deployment.apply()
    except (DeploymentApplyError, httpx.HTTPError) as exc:  # the server refused it, or went away
        raise ScheduleError(f"the Prefect server refused the deployment {deployment.full_name!r}: "
                            f"{_short(exc)}", code=1) from None
    return deployment.full_name


def serve(deployment) -> bool:
    """Serve the deployment until interrupted: scheduled and triggered runs execute here.

    Prefect's runner pauses the deployment when it stops (Ctrl-C, SIGTERM), so a schedule that
    nobody serves does not pile up late runs; serving it again resumes it. Returns False when the
    deployment was deleted meanwhile (``--delete`` from another shell): the runner's pause on the
    way out then finds nothing, which Prefect raises as ``ObjectNotFound``.
    """
    from prefect import serve as prefect_serve
    from prefect.exceptions import ObjectNotFound

    try:
        prefect_serve(deployment, print_starting_message=False)
    except ObjectNotFound:
        return False
    return True


# --------------------------------------------------------------------------- management


@dataclass
class ScheduledDeployment:
    """One row of ``lifelong schedule --list``."""

    name: str  # flow/deployment
    schedules: list[str]
    state: str  # active, paused, or inactive (every schedule switched off)
    served: bool  # whether a process polls for its runs
    next_run: dt.datetime | None


def _flow_names(client) -> dict[Any, str]:
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    flows = client.read_flows(flow_filter=FlowFilter(name=FlowFilterName(any_=list(FLOWS))))
    return {f.id: f.name for f in flows}


def _our_deployments(client, names: list[str] | None = None) -> tuple[list[DeploymentResponse], dict]:
    """Deployments of our flows (optionally only those named ``names``), and the flow-id -> name map."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowFilter,
        FlowFilterName,
    )
    from prefect.client.schemas.sorting import DeploymentSort

    flows = _flow_names(client)
    if not flows:
        return [], flows
    dfilter = DeploymentFilter(name=DeploymentFilterName(any_=names)) if names else None
    deployments = client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=list(FLOWS))),
                                          deployment_filter=dfilter, sort=DeploymentSort.NAME_ASC)
    return deployments, flows


def _state(deployment: DeploymentResponse) -> str:
    if deployment.paused:
        return "paused"
    if deployment.schedules and not any(s.active for s in deployment.schedules):
        return "inactive"
    return "active"


def list_deployments() -> list[ScheduledDeployment]:
    """Our flows' deployments with their schedules, state, whether served, and next scheduled run."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    require_server()
    with _client() as client:
        deployments, flows = _our_deployments(client)
        next_runs: dict[Any, dt.datetime] = {}
        if deployments:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    deployment_id=FlowRunFilterDeploymentId(any_=[d.id for d in deployments]),
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=200)
            for run in runs:  # earliest first: keep the first per deployment
                if run.deployment_id not in next_runs and run.expected_start_time is not None:
                    next_runs[run.deployment_id] = run.expected_start_time
    rows = []
    for d in deployments:
        schedules: list[DeploymentSchedule] = d.schedules
        rows.append(ScheduledDeployment(
            name=f"{flows.get(d.flow_id, '?')}/{d.name}",
            schedules=[describe_schedule(s.schedule) + ("" if s.active else " [off]") for s in schedules]
            or ["no schedule"],
            state=_state(d), served=_served(d),
            next_run=None if d.paused else next_runs.get(d.id)))
    return rows


def _served(deployment: DeploymentResponse) -> bool:
    """Whether a process polls for the deployment's runs: polled within the last minute.

    Prefect's own ``status`` says the same but lags: the server marks a deployment NOT_READY only
    on a later pass of its foreman service, so a stopped ``lifelong schedule`` would still read READY.
    """
    if deployment.last_polled is None:
        return False
    age = dt.datetime.now(dt.UTC) - deployment.last_polled
    return age.total_seconds() < SERVED_WITHIN_S


def find_deployment(client, name: str) -> tuple[str, DeploymentResponse]:
    """Resolve ``deployment`` or ``flow/deployment`` to exactly one deployment of our flows."""
    from prefect.exceptions import ObjectNotFound

    if "/" in name:
        flow_name, _, dep_name = name.partition("/")
        if flow_name and dep_name and "/" not in dep_name:
            try:
                return name, client.read_deployment_by_name(name)
            except ObjectNotFound:
                pass
        found = []
    else:
        deployments, flows = _our_deployments(client, [name])
        found = [(f"{flows.get(d.flow_id, '?')}/{d.name}", d) for d in deployments]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise ScheduleError(f"{name!r} names {len(found)} deployments ({', '.join(n for n, _ in found)}); "
                            "give it as flow/deployment")
    known = _known(client)
    hint = f"known: {', '.join(known)}" if known else "there are no Lifelong deployments on this server"
    raise ScheduleError(f"no deployment named {name!r} ({hint}; see `lifelong schedule --list`)")


def _known(client) -> list[str]:
    deployments, flows = _our_deployments(client)
    return [f"{flows.get(d.flow_id, '?')}/{d.name}" for d in deployments]


def pause(name: str) -> tuple[str, bool]:
    """Pause a deployment: no new scheduled runs; its future scheduled runs are deleted (Prefect)."""
    return _manage(name, "pause")


def resume(name: str) -> tuple[str, bool]:
    """Resume a paused deployment: the server schedules its runs again within seconds."""
    return _manage(name, "resume")


def delete(name: str) -> tuple[str, bool]:
    """Delete a deployment and its scheduled runs; finished runs (and MLflow's records) stay."""
    return _manage(name, "delete")


def _manage(name: str, action: str) -> tuple[str, bool]:
    """Returns the deployment's full name, and whether a process serves it."""
    require_server()
    with _client() as client:
        full, deployment = find_deployment(client, name)
        if action == "pause":
            client.pause_deployment(deployment.id)
        elif action == "resume":
            client.resume_deployment(deployment.id)
        else:
            client.delete_deployment(deployment.id)
    return full, _served(deployment)


@contextmanager
def _client():
    """Prefect's sync client; a server that fails mid-command becomes one line, not a traceback."""
    import httpx
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            yield client
    except httpx.HTTPError as exc:  # includes PrefectHTTPStatusError
        raise ScheduleError(f"the Prefect server failed: {_short(exc)}", code=1) from None
