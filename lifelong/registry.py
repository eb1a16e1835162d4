"""The MLflow model registry: every finished run's model as a version, with aliases and promotion.

Why: a run logs its final model, but "which model do we use?" is a question across runs. The
registry answers it with versions of one registered model per lineage and two aliases:
``candidate`` (the newest version, always) and ``champion`` (the one to use: moved by the
run's gates, by hand with ``promote``, or by a rule). Everything goes through ``MlflowClient``'s registry API, so the embedded SQLite store
and a tracking server behave the same. A flow calls :func:`register_from_config` once a run has
finished; ``lifelong registry`` (cli/registry.py) reads and promotes.

**Names.** One per lineage, ``lifelong-<flow>-<stream>-<strategy>`` (e.g.
``lifelong-continual-split_digits-replay``; for multi-task runs the problem and the combiner)
unless ``tracking.model_name`` names it. Not ``lifelong/<flow>``: MLflow 3.17 refuses ``/`` and
``:`` in registered model names, and references below use ``/`` and ``@`` as separators, so
:func:`check_model_name` refuses those three.

**A version holds** the run's logged model (``models:/m-…``, its run id is the lineage) and tags:

* ``metric.<name>`` — a headline metric, e.g. ``metric.avg_accuracy = "0.938"`` (NaN is left out);
* ``lifelong.config`` — the run's flat config as JSON, for ``compare``: by default the run's
  MLflow parameters, which is the config as that run saw it (a strategy's nested run holds the
  shared keys and its own strategy's, not its siblings');
* the flow's own tags as given (``flow``, ``stream``, ``strategy``, ...);
* ``lifelong.promotion`` — what the promotion rule decided and why, when there is a rule.

**Promotion rules** (``tracking.promote_if``): ``METRIC OP ALIAS``, with OP one of ``>``, ``>=``,
``<``, ``<=``::

    avg_accuracy>champion       higher is better
    avg_forgetting<champion     lower is better
    class/accuracy>=production  any alias; ">=" promotes on ties too

After a new version is registered (and given ``candidate``), it also gets ALIAS when no version
holds ALIAS yet, or when ``new OP current`` holds for METRIC read from both versions' tags. The
rule is conservative otherwise: a new version without METRIC, a current holder without it, or a
NaN is not promoted. ALIAS cannot be ``candidate`` (it moves to every new version anyway),
``latest`` or ``v<N>`` (reserved by MLflow); thresholds (``avg_accuracy>0.9``) are not part of
the syntax. :func:`parse_rule` refuses anything else with a message that shows the syntax.

**Gates** (``tracking.gates``, lifelong/gates.py) decide ``champion`` instead of a rule: a new
version takes it only when every gate passes against the current champion; each verdict and its
reason are kept on the version (``lifelong.gates``), the gates themselves too (``lifelong.gate_spec``),
so :func:`check_promotion` can re-judge a version later without acting, and :func:`promote` by hand
of a version whose gates fail is recorded as a manual override. :func:`lineage` reads a registered
model's versions in order with their parents, experiences, verdicts and final accuracy rows.

**References** (``show``, ``load``): ``NAME`` (the latest version, as MLflow's
``models:/NAME/latest``), ``NAME@ALIAS`` or ``NAME/VERSION``. Where a single version is asked
for (``promote``, ``compare``), a version number or an alias is accepted.

**Aliases are read from calls that return them** (``get_registered_model(...).aliases``,
``get_model_version``): MLflow 3.17's ``search_model_versions`` returns every version with an
empty alias list (its SQL store does not fill them in), and a tracking server's
``RegisteredModel.aliases`` maps aliases to versions as strings where SQLite gives integers.

**Errors** are one line naming the store and the model: :class:`RegistryInputError` (a malformed
reference, rule, name or alias), :class:`RegistryLookupError` (an unknown model, version or
alias; a SQLite store that does not exist — a read does not create one), and
:class:`StoreUnavailable` (a tracking server that cannot be reached, or an HTTP server that is not
MLflow's: its HTML error page is not repeated). ``MlflowClient`` retries a
refused connection for minutes (7 retries with exponential backoff, 120 s timeouts);
:func:`fail_fast` makes one attempt with a 10 s timeout, for interactive commands only: runs keep
MLflow's patient defaults.

**Loading** (:func:`load`) resolves the reference with the client, downloads the version's files
and hands the local folder to ``mlflow.pytorch.load_model``. Not ``load_model("models:/…")``
directly: MLflow 3.17 resolves ``models:/`` URIs with the process-wide registry URI and ignores
the ``registry_uri`` given to ``mlflow.artifacts.download_artifacts`` (it then searches — and
creates — ``./mlflow.db``), so the store named by ``uri`` would not be the one searched.

**Models registered before the one namespace** (when ``tasks``, ``strategies``, ``flows`` and
``clients`` were installed as top-level packages) are pickled with those module paths; ``load``
reads them with an unpickler that maps ``tasks.models`` to ``lifelong.tasks.models`` and so on
(:data:`RENAMED_MODULES`), so they load as the classes of today's code.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import requests
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from lifelong import gates
from lifelong.env import default_tracking_uri
from lifelong.gates import parse_gate

CANDIDATE, CHAMPION = "candidate", "champion"
METRIC_PREFIX = "metric."
CONFIG_TAG = "lifelong.config"
PROMOTION_TAG = "lifelong.promotion"
#: The gates the run declared (JSON list of strings) and each one's verdict (JSON list).
GATE_SPEC_TAG, GATES_TAG = "lifelong.gate_spec", "lifelong.gates"
#: The lineage: the version this one continued from, the experiences it has learned (JSON list),
#: the final row of its accuracy matrix (JSON list) and its data's hashes (JSON object).
PARENT_TAG, EXPERIENCES_TAG, FINAL_ROW_TAG, DATA_TAG = ("lifelong.parent_version", "lifelong.experiences",
                                                        "lifelong.final_row", "lifelong.data")
#: Metrics shown first in tables, when a version has them.
HEADLINE = ("avg_accuracy", "avg_forgetting", "bwt")
_NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"
_ALIAS = re.compile(r"[\w\-]+")
_RULE = re.compile(r"\s*(?P<metric>[\w.\-/]+)\s*(?P<op>>=|<=|>|<)\s*(?P<alias>\S+)\s*")
_OPS = {">": float.__gt__, ">=": float.__ge__, "<": float.__lt__, "<=": float.__le__}
_FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


class RegistryError(Exception):
    """A registry operation that could not be done; the message is one line for the user."""


class RegistryInputError(RegistryError, ValueError):
    """A malformed reference, rule, model name or alias."""


class RegistryLookupError(RegistryError, LookupError):
    """An unknown model, version or alias, or a store that does not exist."""


class StoreUnavailable(RegistryError, ConnectionError):
    """The tracking server cannot be reached, or what answers there is not MLflow's API."""


@dataclass
class VersionInfo:
    """One registered version: what it is, where it came from, what it scored."""

    name: str
    version: str
    aliases: list[str]
    run_id: str | None
    source: str
    created: datetime | None
    metrics: dict[str, float]
    config: dict[str, str]
    tags: dict[str, str]
    promotion: str | None = None
    #: Lineage, filled in by :func:`show` (one more call per version).
    run_name: str | None = None
    run_status: str | None = None


@dataclass
class Comparison:
    a: VersionInfo
    b: VersionInfo
    #: Every metric of either version: (a's, b's), None where one lacks it.
    metrics: dict[str, tuple[float | None, float | None]]
    #: Only the config keys whose values differ: (a's, b's), None where one lacks the key.
    config: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)


@dataclass(frozen=True)
class PromotionRule:
    metric: str
    op: str
    alias: str

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.alias}"

    def decide(self, new: Mapping[str, float], current: VersionInfo | None) -> tuple[bool, str]:
        """Whether a version with metrics ``new`` takes the alias from ``current``, and why."""
        to = f"to {self.alias}"
        if current is None:
            return True, f"promoted {to}: no version held {self.alias!r}"
        held = f"{self.alias} v{current.version}"
        mine, theirs = new.get(self.metric), current.metrics.get(self.metric)
        if mine is None or math.isnan(mine):
            return False, f"not promoted {to}: this version has no {self.metric}"
        if theirs is None or math.isnan(theirs):
            return False, f"not promoted {to}: {held} has no {self.metric} to compare with"
        if _OPS[self.op](mine, theirs):
            return True, f"promoted {to}: {self.metric} {mine:.4g} {self.op} {theirs:.4g} ({held})"
        return False, f"not promoted {to}: {self.metric} {mine:.4g} is not {self.op} {theirs:.4g} ({held})"


# --------------------------------------------------------------------------- validation


def model_name(flow: str, configured: str | None = None, stream: str | None = None,
               strategy: str | None = None) -> str:
    """The registered model of a lineage: ``configured``, or ``lifelong-<flow>-<stream>-<strategy>``
    (``lifelong-<flow>`` when neither is known), characters MLflow or references refuse as '-'."""
    if configured:
        return check_model_name(configured)
    parts = ["lifelong", flow, *(x for x in (stream, strategy) if x)]
    return check_model_name("-".join(re.sub(r"[^\w.+-]+", "-", x).strip("-") for x in parts))


def check_model_name(name: str, key: str = "model name") -> str:
    """``name`` if it can be registered and referred to; ``key`` starts the message (a config key)."""
    if not name or not name.strip():
        raise RegistryInputError(f"{key}: empty")
    bad = sorted({c for c in name if c in "/:@"})
    if bad:
        raise RegistryInputError(f"{key} {name!r}: {' '.join(bad)} not allowed (MLflow refuses '/' and ':'; "
                                 "'/' and '@' separate versions and aliases), e.g. 'lifelong-continual-split_digits-replay'")
    return name


def check_alias(alias: str, what: str = "alias") -> str:
    """``alias`` if MLflow accepts it (checked here to name the problem before any request)."""
    if not _ALIAS.fullmatch(alias or ""):
        raise RegistryInputError(f"{what} {alias!r}: only letters, digits, '_' and '-' (e.g. 'champion')")
    if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise RegistryInputError(f"{what} {alias!r} is reserved by MLflow; choose another (e.g. 'champion')")
    return alias


def parse_rule(text: str, key: str = "promote_if") -> PromotionRule:
    """Read ``METRIC OP ALIAS`` (e.g. ``avg_accuracy>champion``); see the module docstring.

    ``key`` starts the message (the config key, e.g. ``tracking.promote_if``).
    """
    m = _RULE.fullmatch(text or "")
    syntax = "expected METRIC OP ALIAS with OP one of > >= < <=, e.g. 'avg_accuracy>champion'"
    if not m:
        raise RegistryInputError(f"{key} {text!r}: {syntax}")
    alias = m["alias"]
    if re.fullmatch(r"[-+]?[\d.]+(e[-+]?\d+)?", alias):
        raise RegistryInputError(f"{key} {text!r}: compares with the version under an alias, not a "
                                 f"number; {syntax}")
    check_alias(alias, f"{key} {text!r}: alias")
    if alias == CANDIDATE:
        raise RegistryInputError(f"{key} {text!r}: '{CANDIDATE}' moves to every new version; "
                                 "compare with another alias, e.g. 'champion'")
    return PromotionRule(m["metric"], m["op"], alias)


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """``NAME`` / ``NAME@ALIAS`` / ``NAME/VERSION`` → (name, version, alias); VERSION may be ``latest``."""
    usage = "expected NAME, NAME@ALIAS or NAME/VERSION (e.g. lifelong-continual-split_digits-replay@champion)"
    name, slash, version = ref.partition("/")
    name, at, alias = name.partition("@")
    if not name or (slash and at) or (at and not alias):
        raise RegistryInputError(f"model reference {ref!r}: {usage}")
    if slash:
        if not (version.isdigit() or version == "latest"):
            raise RegistryInputError(f"model reference {ref!r}: the version after '/' must be a number or "
                                     f"'latest', got {version!r}")
        return name, None if version == "latest" else version, None
    return name, None, alias or None


# --------------------------------------------------------------------------- errors and the store


@contextmanager
def fail_fast() -> Iterator[None]:
    """One HTTP attempt with a 10 s timeout inside the block (MLflow reads these per request).

    Variables the user has set win over ours, as in :mod:`lifelong.env`.
    """
    added = {k: v for k, v in _FAIL_FAST.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _network_problem(exc: BaseException) -> str | None:
    """'connection refused', 'timed out', ... when a requests error is behind ``exc``."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, requests.exceptions.Timeout):
            return "timed out"
        if isinstance(seen, requests.exceptions.ConnectionError):
            return "connection refused" if "refused" in str(seen).lower() else "no connection"
        seen = seen.__cause__ or seen.__context__
    return None


@contextmanager
def _translated(uri: str) -> Iterator[None]:
    """MLflow's exceptions (often a page long) → one line naming the store."""
    try:
        yield
    except MlflowException as exc:
        problem = _network_problem(exc)
        if problem:
            raise StoreUnavailable(f"cannot reach the MLflow tracking server at {uri}: {problem}") from None
        status = re.search(r"failed with error code (\d+)", str(exc.message))
        if status:  # something answers, but not MLflow's API
            raise StoreUnavailable(f"{uri} answered HTTP {status[1]} to an MLflow registry request; "
                                   "is it an MLflow tracking server (`mlflow server`)?") from None
        first = str(exc.message).strip().splitlines()[0] if str(exc.message).strip() else type(exc).__name__
        raise RegistryError(f"MLflow store {uri}: {first[:300]}") from None


def check_store(uri: str | None) -> str:
    """The run's MLflow store answers, and is MLflow's at this MLflow's schema: checked before any
    work, so a run does not train for an hour and then fail to log (a SQLite file that does not
    exist yet is created, as the run would). One line naming the store and the problem otherwise."""
    import logging

    uri = uri or default_tracking_uri()
    # Creating or migrating a SQLite store is MLflow's and alembic's INFO chatter, not the user's news.
    quiet = [logging.getLogger(n) for n in ("mlflow.store.db.utils", "alembic")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.WARNING)
    with fail_fast():
        try:
            with _translated(uri):
                MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except RegistryError as exc:
            raise StoreUnavailable(f"tracking.uri: {exc}") from None
        except Exception as exc:  # the database driver's own: no server there, refused login, foreign schema
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise StoreUnavailable(f"tracking.uri: cannot use {uri} as an MLflow store: {first[:300]}") from None
        finally:
            for q, level in zip(quiet, levels):
                q.setLevel(level)
    return uri


def _open(uri: str | None) -> tuple[MlflowClient, str]:
    """A client for reading ``uri``; a SQLite file that does not exist is an error, not a new store."""
    uri = uri or default_tracking_uri()
    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///").split("?")[0]
        if path and path != ":memory:" and not Path(path).is_file():
            raise RegistryLookupError(f"no MLflow store at {uri}: {path} does not exist")
    return MlflowClient(tracking_uri=uri), uri


def _pages(search, **kwargs) -> Iterator[Any]:
    token = None
    while True:
        page = search(page_token=token, **kwargs)
        yield from page
        token = page.token
        if not token:
            return


def _versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    # Aliases of these are empty (see the module docstring): take them from the registered model.
    return list(_pages(client.search_model_versions, filter_string=f"name='{name}'"))


def _registered(client: MlflowClient, name: str, uri: str):
    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != _NOT_FOUND:
            raise
    names = sorted(m.name for m in _pages(client.search_registered_models))
    there = f"models there: {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}" if names \
        else "the registry is empty"
    raise RegistryLookupError(f"no registered model {name!r} in {uri} ({there})")


def _resolve(client: MlflowClient, name: str, uri: str, version: str | None = None,
             alias: str | None = None) -> ModelVersion:
    """The version asked for (latest when neither is given), with its aliases filled in."""
    model = _registered(client, name, uri)
    if alias is not None:
        held = {a: str(v) for a, v in model.aliases.items()}
        if alias not in held:
            have = ", ".join(f"{a} -> v{v}" for a, v in sorted(held.items())) or "none"
            raise RegistryLookupError(f"model {name!r} has no alias {alias!r} in {uri} (aliases: {have})")
        version = held[alias]
    if version is None:
        latest = client.search_model_versions(f"name='{name}'", max_results=1,
                                              order_by=["version_number DESC"])
        if not latest:
            raise RegistryLookupError(f"model {name!r} has no versions in {uri}")
        version = latest[0].version
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if exc.error_code != _NOT_FOUND:
            raise
    numbers = sorted(int(v.version) for v in _versions(client, name))
    have = f"versions {numbers[0]}-{numbers[-1]}" if numbers else "no versions"
    raise RegistryLookupError(f"model {name!r} has no version {version} in {uri} ({have})")


def _selector(selector: str) -> dict[str, str]:
    """A version number or an alias, as keyword arguments of :func:`_resolve`."""
    selector = str(selector)
    return {"version": selector} if selector.isdigit() else {"alias": selector}


# --------------------------------------------------------------------------- reading a version


def _info(mv: ModelVersion, aliases: list[str] | None = None) -> VersionInfo:
    tags = dict(mv.tags or {})
    metrics = {k.removeprefix(METRIC_PREFIX): float(v)
               for k, v in tags.items() if k.startswith(METRIC_PREFIX)}
    config = json.loads(tags[CONFIG_TAG]) if CONFIG_TAG in tags else {}
    promotion = tags.get(PROMOTION_TAG)
    rest = {k: v for k, v in tags.items()
            if not k.startswith(METRIC_PREFIX) and k not in (CONFIG_TAG, PROMOTION_TAG)}
    created = datetime.fromtimestamp(mv.creation_timestamp / 1000) if mv.creation_timestamp else None
    return VersionInfo(mv.name, str(mv.version), sorted(aliases if aliases is not None else mv.aliases or []),
                       mv.run_id or None, mv.source, created, metrics, config, rest, promotion)


def _with_lineage(client: MlflowClient, info: VersionInfo) -> VersionInfo:
    if info.run_id:
        try:
            run = client.get_run(info.run_id)
            info.run_name, info.run_status = run.info.run_name, run.info.status
        except MlflowException as exc:
            if exc.error_code != _NOT_FOUND:
                raise
            info.run_status = "deleted"
    return info


# --------------------------------------------------------------------------- the API


def register_run_model(client: MlflowClient, run_id: str, model_uri: str, name: str, tags: Mapping[str, Any],
                       metrics: Mapping[str, float], promote_rule: str | None = None, *,
                       config: Mapping[str, Any] | None = None, gates: Sequence[str] = (),
                       lineage: Mapping[str, Any] | None = None) -> VersionInfo:
    """Register a finished run's model as a new version of ``name``; ``candidate`` moves to it.

    ``model_uri`` is what :func:`lifelong.tracking.log_torch_model` returns (``models:/m-…``);
    ``tags`` go on the version as given (``flow``, ``stream``, ``strategy``), ``metrics`` as
    ``metric.<name>``, ``config`` (flat; default: the run's parameters) as JSON. With ``promote_rule``
    (e.g. ``"avg_accuracy>champion"``, checked before anything is written) the version may also
    take the rule's alias. With ``gates`` (lifelong/gates.py) the version takes ``champion`` only
    when every gate passes against the current champion. ``lineage``: ``parent`` (a version
    number), ``experiences``, ``final_row`` and ``data``, kept as tags. Returns the version as read
    back, aliases included.
    """
    rule = parse_rule(promote_rule) if promote_rule else None
    parsed = [parse_gate(g) for g in gates]
    if rule is not None and parsed and rule.alias == CHAMPION:
        raise RegistryInputError(f"promote rule {rule}: with gates, the gates decide {CHAMPION!r}; give the rule "
                                 "another alias or drop it")
    check_model_name(name)
    values = _metric_values(metrics)
    version_tags = {str(k): str(v) for k, v in tags.items()}
    version_tags.update({f"{METRIC_PREFIX}{k}": repr(v) for k, v in values.items()})
    uri = client.tracking_uri
    with _translated(uri):
        if config is None:
            config = client.get_run(run_id).data.params
        version_tags[CONFIG_TAG] = json.dumps({str(k): str(v) for k, v in config.items()}, sort_keys=True)
        if parsed:
            version_tags[GATE_SPEC_TAG] = json.dumps([str(g) for g in parsed])
        lineage = dict(lineage or {})
        if lineage.get("parent") is not None:
            version_tags[PARENT_TAG] = str(lineage["parent"])
        for key, tag in (("experiences", EXPERIENCES_TAG), ("final_row", FINAL_ROW_TAG), ("data", DATA_TAG)):
            if lineage.get(key) is not None:
                version_tags[tag] = json.dumps(lineage[key])
        _ensure_registered(client, name)
        model_id = re.fullmatch(r"models:/(m-[0-9a-f]+)", model_uri)
        mv = client.create_model_version(name, model_uri, run_id=run_id, tags=version_tags,
                                         model_id=model_id[1] if model_id else None)
        client.set_registered_model_alias(name, CANDIDATE, mv.version)
        if parsed:
            _apply_gates(client, parsed, name, mv.version, values)
        if rule is not None:
            _apply_rule(client, rule, name, mv.version, values)
        return _info(client.get_model_version(name, mv.version))


def register_from_config(cfg, client: MlflowClient, run_id: str, model_uri: str | None, *, flow: str,
                         stream: str, strategy: str, metrics: Mapping[str, float],
                         lineage: Mapping[str, Any] | None = None) -> VersionInfo | None:
    """The flows' one call at the end of a finished run: :func:`register_run_model` with the
    name, rule, gates and switch from ``cfg.tracking`` (``model_name``, ``promote_if``, ``gates``,
    ``register_model``); the lineage is flow + stream + strategy unless ``model_name`` names it.
    Nothing when registration is off or no model was logged (``model_uri`` None). What the gates
    decided is printed."""
    t = cfg.tracking
    if not t.register_model or model_uri is None:
        return None
    v = register_run_model(client, run_id, model_uri, model_name(flow, t.model_name, stream, strategy),
                           {"flow": flow, "stream": stream, "strategy": strategy}, metrics, t.promote_if,
                           gates=getattr(t, "gates", ()) or (), lineage=lineage)
    if v.promotion:
        print(f"[registry] {v.name} v{v.version}: {v.promotion}", flush=True)
    return v


def _metric_values(metrics: Mapping[str, float]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        try:
            value = float(v)
        except (TypeError, ValueError):
            raise RegistryInputError(f"metric {k!r}: {v!r} is not a number") from None
        if not math.isnan(value):
            out[str(k)] = value
    return out


def _ensure_registered(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name)
    except MlflowException as exc:  # a run before this one created it (or one beside it just did)
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _apply_rule(client: MlflowClient, rule: PromotionRule, name: str, version: str,
                metrics: dict[str, float]) -> None:
    """Give ``version`` the rule's alias when it beats the version holding it; record why in a tag."""
    held = client.get_registered_model(name).aliases.get(rule.alias)
    current = _info(client.get_model_version(name, str(held))) if held is not None else None
    promoted, reason = rule.decide(metrics, current)
    client.set_model_version_tag(name, version, PROMOTION_TAG, f"{reason} [rule {rule}]")
    if promoted:
        client.set_registered_model_alias(name, rule.alias, version)


def _champion(client: MlflowClient, name: str) -> VersionInfo | None:
    held = client.get_registered_model(name).aliases.get(CHAMPION)
    return _info(client.get_model_version(name, str(held))) if held is not None else None


def _apply_gates(client: MlflowClient, parsed: list, name: str, version: str, metrics: dict[str, float]) -> None:
    """Judge ``version`` by its gates against the current champion; move ``champion`` only when all
    pass; keep every verdict and the decision on the version."""
    current = _champion(client, name)
    results = gates.evaluate(parsed, metrics, current.metrics if current else None,
                             f"{CHAMPION} v{current.version}" if current else CHAMPION)
    passed, reason = gates.decision(results)
    client.set_model_version_tag(name, version, GATES_TAG, json.dumps([r.to_json() for r in results]))
    verb = f"promoted to {CHAMPION}" if passed else f"not promoted to {CHAMPION}"
    client.set_model_version_tag(name, version, PROMOTION_TAG, f"{verb}: {reason}")
    if passed:
        client.set_registered_model_alias(name, CHAMPION, version)


@dataclass
class PromotionCheck:
    """What the gates would decide for a version now, without acting."""

    version: VersionInfo
    champion: VersionInfo | None
    gates: list[str]
    results: list
    passed: bool
    reason: str


def _check(client: MlflowClient, mv: ModelVersion) -> PromotionCheck:
    info = _info(mv)
    spec = json.loads(info.tags.get(GATE_SPEC_TAG, "[]"))
    current = _champion(client, info.name)
    if current is not None and current.version == info.version:
        return PromotionCheck(info, current, spec, [], True, f"v{info.version} is already {CHAMPION}")
    if not spec:
        return PromotionCheck(info, current, spec, [], True, "no gates were declared for this version "
                              "(tracking.gates): promotion is a manual decision")
    results = gates.evaluate([gates.parse_gate(g) for g in spec], info.metrics,
                             current.metrics if current else None,
                             f"{CHAMPION} v{current.version}" if current else CHAMPION)
    passed, reason = gates.decision(results)
    return PromotionCheck(info, current, spec, results, passed, reason)


def check_promotion(uri: str | None, name: str, version: str | int) -> PromotionCheck:
    """Re-judge ``version`` by the gates its run declared, against today's champion; changes nothing."""
    client, uri = _open(uri)
    with _translated(uri):
        return _check(client, _resolve(client, name, uri, **_selector(str(version))))


def lineage(uri: str | None, name: str) -> list[VersionInfo]:
    """Every version of ``name``, oldest first, with aliases (their lineage tags: parent,
    experiences, gates, final accuracy row — read with :func:`lineage_fields`)."""
    client, uri = _open(uri)
    with _translated(uri):
        held: dict[str, list[str]] = {}
        for a, v in _registered(client, name, uri).aliases.items():
            held.setdefault(str(v), []).append(a)
        versions = sorted(_versions(client, name), key=lambda mv: int(mv.version))
        return [_info(mv, held.get(str(mv.version), [])) for mv in versions]


def lineage_fields(v: VersionInfo) -> dict[str, Any]:
    """A version's lineage tags, decoded: parent, experiences, final_row, data, gates (verdicts)."""
    t = v.tags
    return {"parent": t.get(PARENT_TAG),
            "experiences": json.loads(t[EXPERIENCES_TAG]) if EXPERIENCES_TAG in t else None,
            "final_row": json.loads(t[FINAL_ROW_TAG]) if FINAL_ROW_TAG in t else None,
            "data": json.loads(t[DATA_TAG]) if DATA_TAG in t else None,
            "gates": json.loads(t[GATES_TAG]) if GATES_TAG in t else []}


def list_models(uri: str | None = None, name: str | None = None) -> list[VersionInfo]:
    """Every version of every registered model (or of ``name``): by name, newest version first."""
    client, uri = _open(uri)
    with _translated(uri):
        names = [name] if name else sorted(m.name for m in _pages(client.search_registered_models))
        out = []
        for n in names:
            held: dict[str, list[str]] = {}
            for a, v in _registered(client, n, uri).aliases.items():
                held.setdefault(str(v), []).append(a)
            versions = sorted(_versions(client, n), key=lambda mv: int(mv.version), reverse=True)
            out += [_info(mv, held.get(str(mv.version), [])) for mv in versions]
        return out


def show(uri: str | None, ref: str) -> VersionInfo:
    """One version (``NAME``, ``NAME@ALIAS``, ``NAME/VERSION``) with its run's name and status."""
    name, version, alias = parse_ref(ref)
    client, uri = _open(uri)
    with _translated(uri):
        return _with_lineage(client, _info(_resolve(client, name, uri, version, alias)))


def promote(uri: str | None, name: str, version: str | int, alias: str = CHAMPION) -> VersionInfo:
    """Point ``alias`` at ``version`` (a number, or an alias such as ``candidate``). Moving
    ``champion`` by hand is recorded on the version (``lifelong.promotion``), as a manual override
    when the version's own gates fail against the champion it replaces."""
    check_alias(alias)
    client, uri = _open(uri)
    with _translated(uri):
        mv = _resolve(client, name, uri, **_selector(str(version)))
        if alias == CHAMPION:
            check = _check(client, mv)
            when = datetime.now().strftime("%Y-%m-%d %H:%M")
            note = (f"promoted to {CHAMPION} by hand ({when}); {check.reason}" if check.passed else
                    f"manual override: promoted to {CHAMPION} by hand ({when}) although {check.reason}")
            client.set_model_version_tag(name, mv.version, PROMOTION_TAG, note)
        client.set_registered_model_alias(name, alias, mv.version)
        return _info(client.get_model_version(name, mv.version))


def compare(uri: str | None, name: str, v1: str | int, v2: str | int) -> Comparison:
    """Two versions side by side: every metric, and the config keys whose values differ."""
    client, uri = _open(uri)
    with _translated(uri):
        a = _with_lineage(client, _info(_resolve(client, name, uri, **_selector(str(v1)))))
        b = _with_lineage(client, _info(_resolve(client, name, uri, **_selector(str(v2)))))
    names = ordered_metrics(a.metrics.keys() | b.metrics.keys())
    metrics = {k: (a.metrics.get(k), b.metrics.get(k)) for k in names}
    config = {k: (a.config.get(k), b.config.get(k)) for k in sorted(a.config.keys() | b.config.keys())
              if a.config.get(k) != b.config.get(k)}
    return Comparison(a, b, metrics, config)


def ordered_metrics(keys) -> list[str]:
    """Headline metrics first, the rest alphabetically."""
    return [k for k in HEADLINE if k in keys] + sorted(k for k in keys if k not in HEADLINE)


def load(ref: str, uri: str | None = None):
    """The model of ``ref`` (``NAME``, ``NAME@ALIAS``, ``NAME/VERSION``): a torch module in eval mode."""
    import mlflow.artifacts
    import mlflow.pytorch

    name, version, alias = parse_ref(ref)
    client, uri = _open(uri)
    with _translated(uri), tempfile.TemporaryDirectory(prefix="lifelong-model-") as tmp:
        mv = _resolve(client, name, uri, version, alias)
        files = client.get_model_version_download_uri(name, mv.version)
        local = mlflow.artifacts.download_artifacts(files, dst_path=tmp, tracking_uri=uri)
        # MLflow warns that the pickle module is not the one it saved with (its own, cloudpickle);
        # ours reads the same standard pickles and only maps module names (see _renaming_pickle).
        log = logging.getLogger("mlflow.pytorch")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            return mlflow.pytorch.load_model(local, pickle_module=_renaming_pickle()).eval()
        finally:
            log.setLevel(level)


#: Top-level package names before the one namespace (the old name's prefix -> today's).
RENAMED_MODULES = {old: f"lifelong.{old}" for old in ("tasks", "strategies", "flows", "clients")}
#: Modules of model classes that were renamed, not only moved under ``lifelong.``.
RENAMED_MODEL_MODULES = {"tasks.multitask": "lifelong.tasks.multitask_problems"}


def current_module(name: str) -> str:
    """Today's module path of a class pickled under an older one."""
    if name in RENAMED_MODEL_MODULES:
        return RENAMED_MODEL_MODULES[name]
    top, dot, rest = name.partition(".")
    return RENAMED_MODULES[top] + dot + rest if top in RENAMED_MODULES else name


def _renaming_pickle():
    """A pickle module for ``torch.load`` whose unpickler maps renamed modules (cloudpickle, which
    MLflow saves with, writes standard pickles that plain pickle reads)."""
    import pickle
    import types

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            return super().find_class(current_module(module), name)

    shim = types.ModuleType("lifelong.registry.renaming_pickle")
    shim.Unpickler = Unpickler
    shim.load = lambda file, **kw: Unpickler(file, **kw).load()
    shim.loads = pickle.loads
    shim.dump, shim.dumps = pickle.dump, pickle.dumps
    return shim
