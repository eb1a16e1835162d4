"""A grid of configs × variants × seeds through the flows, summarised as mean ± std.

``lifelong sweep CONFIG [CONFIG ...] --seeds 3`` runs every strategy (continual configs), every
combiner (multi-task configs) or the one federated learner (federated configs) of every config
with seeds 0..N-1, then writes one table per config to a Markdown file and to an MLflow parent run
(``sweep_results.md`` and metrics ``<config>/<row>/<metric>_mean``). Continual tables show final
average accuracy, average forgetting, min-ACC and WC-ACC; multi-task tables every per-task test
metric; federated tables accuracy, forgetting, the run's final user-level epsilon and the noise
multiplier, plus a plot of accuracy against epsilon per clipping mode (``<config>_accuracy_vs_epsilon.png``).

Rows can also come from *variants* of one config — a federated config has a single learner, so
the comparison "no DP vs flat vs per-layer clipping" is one base config and three overrides::

    [[variants]]
    label = "flat"
    set = { "privacy.clipping" = "flat", "privacy.target_epsilon" = 2.0 }

Each ``set`` entry is applied exactly as ``lifelong run --set key=value`` would
(:func:`lifelong.config.apply_override`), after the sweep's own ``--set`` overrides; every
variant of every config is validated before the first run starts.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow

from lifelong import tracking
from lifelong.checkpoints import config_fingerprint
from lifelong.config import (
    Config,
    ConfigError,
    apply_override,
    load_config,
    read_toml,
    strategy_label,
    validate_config,
)
from lifelong.env import default_tracking_uri
from lifelong.flows.continual import continual_flow
from lifelong.flows.federated import privacy_plan, run_federated
from lifelong.flows.multitask import multitask_flow
from lifelong.flows.sweep_protocol import Claim, Protocol, Tuned, read_protocol, tuning_config
from lifelong.tasks.comparison import interval95, paired_difference, verdict
from lifelong.tasks.streams import build_stream

METRICS = ("avg_accuracy", "avg_forgetting", "min_acc", "wc_acc")
#: Federated rows. ``epsilon`` is the run-level (sampled) user-level epsilon; ``client_eps_p50`` and
#: ``client_eps_max`` the per-client ledger's spread after the last round (privacy/ledger.py: each
#: client's own participations, no amplification by sampling); ``noise_std`` is the noise's standard
#: deviation per coordinate of the averaged update, z·C/S (S the expected cohort), the figure that
#: says whether noise can matter. The run-level epsilon, z and z·C/S are the same for every seed and
#: shown without ± (n/a without DP).
FEDERATED_METRICS = ("avg_accuracy", "avg_forgetting", "epsilon", "client_eps_p50", "client_eps_max",
                     "noise_multiplier", "noise_std")
#: The ledger's figures, as the run logs them after each round.
LEDGER_METRICS = {"client_eps_p50": "privacy/client_epsilon_p50", "client_eps_max": "privacy/client_epsilon_max"}
#: A run on the virtual clock: also its clients' accuracy on their own reached experiences.
CLOCK_METRICS = ("avg_accuracy", "avg_forgetting", "clients_acc_mean", "clients_acc_worst")
EXACT = ("epsilon", "noise_multiplier", "noise_std")
VARIANT_KEYS = {"label", "set"}
#: Each row's cost, shown as a mean: optimiser updates (federated: server rounds) and wall time.
COSTS = ("updates", "wall_s")
#: A finished cell's tag: the hash of everything that determines its result (resume cell by cell).
CELL_TAG = "lifelong.sweep_cell"


@dataclass(frozen=True)
class Variant:
    """One row-maker of a sweep config: a label and ``key=value`` overrides (``lifelong run --set``)."""

    label: str | None
    overrides: tuple[str, ...] = ()


@dataclass
class SweepTable:
    name: str
    title: str
    stream: str
    seeds: list[int]
    metrics: tuple[str, ...] = METRICS
    #: row label -> metric -> values over seeds
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    run_ids: list[str] = field(default_factory=list)
    #: federated rows: label -> clipping mode ("off" without DP), for the accuracy-vs-epsilon plot
    clipping: dict[str, str] = field(default_factory=dict)
    delta: float | None = None
    wall_s: float = 0.0
    #: label -> cost -> values over seeds (``COSTS``)
    costs: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    #: what ``[protocol]`` chose on validation data, and the claims' verdicts
    metric_tuned: str = "avg_accuracy"
    tuning: list[Tuned] = field(default_factory=list)
    verdicts: list[tuple[Claim, str, str]] = field(default_factory=list)  # claim, difference, verdict
    #: the configs' continual evaluation period: min-ACC and WC-ACC are upper bounds unless it is 1
    eval_every: int = 1

    def cell(self, label: str, metric: str) -> str:
        vals = self.values[label].get(metric, [])
        if not vals:
            return "n/a"
        if metric in EXACT:  # determined by the config (calibrated before the run), not by the seed
            return f"{np.mean(vals):.3g}"
        text = f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1) if len(vals) > 1 else 0.0:.3f}"
        if len(vals) > 1:
            ci = interval95(vals)
            text += f" [{ci.low:.3f}, {ci.high:.3f}]"
        return text

    def cost_cell(self, label: str, cost: str) -> str:
        vals = self.costs.get(label, {}).get(cost, [])
        return "n/a" if not vals else (f"{np.mean(vals):.0f}" if cost == "updates" else f"{np.mean(vals):.1f}")

    def markdown(self) -> str:
        head = (f"| {'variant' if self.clipping else 'strategy'} | " + " | ".join(self.metrics)
                + " | updates | wall (s) |")
        rule = "|---|" + "---|" * (len(self.metrics) + len(COSTS))
        rows = [f"| {label} | " + " | ".join(self.cell(label, m) for m in self.metrics) + " | "
                + " | ".join(self.cost_cell(label, c) for c in COSTS) + " |" for label in self.values]
        lines = [head, rule, *rows]
        if self.tuning:
            lines = [*(f"Chosen on validation data: {t.describe(self.metric_tuned)}." for t in self.tuning),
                     "", *lines]
        if self.verdicts:
            lines += ["", "| claim | better − baseline, mean [95% CI] | verdict |", "|---|---|---|",
                      *(f"| {c.claim} ({c.better} vs {c.baseline}, {c.metric}) | {d} | **{v}** |"
                        for c, d, v in self.verdicts)]
        return "\n".join(lines)

    @property
    def plot_name(self) -> str | None:
        """The accuracy-vs-epsilon artifact, for federated tables with at least one DP row."""
        return f"{self.name}_accuracy_vs_epsilon.png" if any(m != "off" for m in self.clipping.values()) else None


def _title(path: Path) -> str:
    """The config's first comment line, if any: what the sweep is about."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return path.stem


# --------------------------------------------------------------------------- variants


def _toml_value(value: Any) -> str:
    """A TOML literal for ``value``, so a variant's ``set`` goes through ``apply_override`` as text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # 1e-06, inf and nan are TOML floats too
    if isinstance(value, str):
        return json.dumps(value)  # JSON's string escapes are TOML basic-string escapes
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml_value, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"cannot use {value!r} ({type(value).__name__}) as an override value")


def read_variants(raw: Any, path: Path) -> list[Variant]:
    """The ``[[variants]]`` of a sweep config, checked (labels present and distinct, known keys)."""
    if raw is None:
        return [Variant(None)]
    if not isinstance(raw, list) or not raw or not all(isinstance(v, dict) for v in raw):
        raise ConfigError(f"{path}: variants: expected a non-empty array of tables ([[variants]] with "
                          "label = ... and set = { \"key\" = value })")
    variants, seen = [], set()
    for i, v in enumerate(raw):
        unknown = sorted(set(v) - VARIANT_KEYS)
        if unknown:
            raise ConfigError(f"{path}: variants[{i}]: unknown key(s) {', '.join(map(repr, unknown))}; "
                              "a variant has 'label' and 'set'")
        label, sets = v.get("label"), v.get("set", {})
        if not isinstance(label, str) or not label.strip():
            raise ConfigError(f"{path}: variants[{i}]: 'label' must be a non-empty string (it names the row)")
        if label in seen:
            raise ConfigError(f"{path}: variants[{i}]: label {label!r} is used twice")
        if not isinstance(sets, dict):
            raise ConfigError(f"{path}: variant {label!r}: 'set' must be a table of \"dotted.key\" = value")
        seen.add(label)
        variants.append(Variant(label, tuple(f"{k}={_toml_value(x)}" for k, x in sets.items())))
    return variants


def variant_configs(path: str | Path, overrides: list[str] | None = None,
                    extra: list[str] | None = None) -> list[tuple[Variant, Config]]:
    """Every variant of a sweep config as a validated Config: the file, then the sweep's
    ``overrides``, then the variant's own, then ``extra`` (the seed). A bad key names its variant."""
    path = Path(path)
    data = read_toml(path)
    data.pop("protocol", None)  # (read_protocol's)
    variants = read_variants(data.pop("variants", None), path)
    out = []
    for v in variants:
        d = copy.deepcopy(data)
        try:
            for item in [*(overrides or []), *v.overrides, *(extra or [])]:
                apply_override(d, item)
            cfg = validate_config(d)
        except ConfigError as exc:
            if v.label is None:
                raise
            raise ConfigError(f"{path}: variant {v.label!r}: {exc}") from None
        out.append((v, cfg))
    return out


# --------------------------------------------------------------------------- the flow


def protocol_of(path: str | Path) -> Protocol | None:
    return read_protocol(read_toml(Path(path)).get("protocol"), Path(path))


def _config_data(path: str | Path) -> dict:
    """A sweep config's run config: the file without its ``[protocol]`` and ``[[variants]]``."""
    data = read_toml(Path(path))
    data.pop("protocol", None), data.pop("variants", None)
    return data


def row_label(v: Variant, label: str) -> str:
    """A table row's label: the learner's, prefixed by its variant's."""
    return label if v.label is None else f"{v.label}: {label}"


def row_labels(vcs: list[tuple[Variant, Config]]) -> set[str]:
    """The rows a config's runs will produce (what claims may name), known before any run."""
    labels = set()
    for v, cfg in vcs:
        if cfg.flow == "federated":
            labels.add(v.label or f"federated {strategy_label(cfg.strategies[0])}")
        elif cfg.flow == "continual":
            labels.update(row_label(v, strategy_label(s)) for s in cfg.strategies)
    return labels


def check_sweep(configs: list[str], seeds: int, overrides: list[str] | None = None) -> dict:
    """Everything a sweep needs, checked before its first run: seeds for an interval, every
    variant, the protocol's grids and claims. Returns the planned variants per config."""
    if seeds < 2:
        raise ConfigError(f"--seeds: {seeds} seed(s) give no interval; a sweep needs at least 2 (docs use 5)")
    planned = {}
    for path in configs:
        planned[path] = variant_configs(path, overrides)
        protocol = protocol_of(path)
        if protocol is None:
            continue
        known = row_labels(planned[path])
        for c in protocol.claims:
            for side in (c.better, c.baseline):
                if known and side not in known:
                    raise ConfigError(f"{path}: protocol.claims: no row {side!r} in this sweep; rows: "
                                      f"{', '.join(sorted(known))}")
        data = _config_data(path)
        for g in protocol.grids:  # every tuning config validates (keys, values, the validation split)
            for value in g.values:
                cfg = tuning_config(data, g, value, [], protocol, protocol.tune_seeds[0], list(overrides or []),
                                    _toml_value)
            if cfg.flow != "multitask":
                build_stream(cfg.stream, cfg.seed)  # a validation split too small for a class is refused here
    return planned


@flow(name="sweep", validate_parameters=False)
def sweep_flow(configs: list[str], seeds: int, overrides: list[str] | None = None,
               out: str | None = None) -> list[SweepTable]:
    """Every config × variant × seed; a cell a previous sweep finished (same config, same seed) is
    read back from MLflow instead of run again, so an interrupted sweep resumes cell by cell."""
    planned = check_sweep(configs, seeds, overrides)
    noise = {(path, v.label): _noise_multiplier(cfg) for path, vcs in planned.items() for v, cfg in vcs
             if cfg.flow == "federated"}
    tables = []
    for path in map(Path, configs):
        base = planned[str(path)][0][1]
        source = base.multitask.problem if base.flow == "multitask" else base.stream.name
        table = SweepTable(path.stem, _title(path), source, list(range(seeds)))
        if base.flow == "federated":
            table.metrics = CLOCK_METRICS if base.clock is not None else FEDERATED_METRICS
            table.delta = base.privacy.delta
        table.eval_every = base.training.eval_every
        t0 = time.perf_counter()
        protocol = protocol_of(path)
        chosen = _tune(table, path, protocol, list(overrides or []))
        for seed in range(seeds):
            for v, cfg in variant_configs(path, [*(overrides or []), *chosen],
                                          [f"seed={seed}", 'tracking.experiment="sweep"']):
                if cfg.flow == "federated":
                    _run_federated(table, v, cfg, noise[(str(path), v.label)])
                else:
                    _run_local(table, v, cfg)
        _judge(table, protocol)
        table.wall_s = time.perf_counter() - t0
        tables.append(table)
    _log_sweep(tables, seeds, overrides)
    if out:
        write_markdown(tables, Path(out), seeds)
    return tables


def _tune(table: SweepTable, path: Path, protocol: Protocol | None, overrides: list[str]) -> list[str]:
    """Choose each grid's value on the validation split (coordinate-wise, in the order given);
    returns the chosen values as overrides for the reported runs."""
    if protocol is None or not protocol.grids:
        return []
    data = _config_data(path)
    table.metric_tuned = protocol.metric
    chosen: list[str] = []
    for g in protocol.grids:
        scores: dict[str, float] = {}
        for value in g.values:
            runs = []
            for seed in protocol.tune_seeds:
                cfg = tuning_config(data, g, value, chosen, protocol, seed, overrides, _toml_value)
                rows = _local_rows(cfg) if cfg.flow != "federated" else [_federated_row(cfg)]
                runs.append(rows[0][1].get(protocol.metric, float("nan")))
            scores[_toml_value(value)] = float(np.mean(runs))
        best = next(iter(scores))
        for value, score in scores.items():
            if protocol.better(score, scores[best]):
                best = value
        table.tuning.append(Tuned(g.key, scores, best))
        chosen.append(f"{g.key}={best}")
        print(f"[sweep] {path.stem}: {table.tuning[-1].describe(protocol.metric)}", flush=True)
    return chosen


def _judge(table: SweepTable, protocol: Protocol | None) -> None:
    for c in protocol.claims if protocol is not None else []:
        a, b = table.values[c.better].get(c.metric, []), table.values[c.baseline].get(c.metric, [])
        diff = paired_difference(a, b)
        table.verdicts.append((c, str(diff), verdict(diff, c.direction)))


# ----------------------------------------------------------------- cells: run, or read back


def cell_key(cfg: Config) -> str:
    """What determines a cell's result: the whole config but where it is logged."""
    return hashlib.sha256(config_fingerprint(cfg).encode()).hexdigest()[:32]


def _finished_cell(cfg: Config):
    """The run of a previous sweep with this cell's key, if it finished."""
    client = tracking.client_for(cfg.tracking.uri or default_tracking_uri())
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        return client, None
    runs = client.search_runs([exp.experiment_id], f"tags.`{CELL_TAG}` = '{cell_key(cfg)}' "
                              "and attributes.status = 'FINISHED'", max_results=1)
    return client, (runs[0] if runs else None)


def _row_values(metrics: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    summary = {k.removeprefix("final/"): v for k, v in metrics.items() if k.startswith("final/")}
    costs = {k.removeprefix("cost/"): v for k, v in metrics.items() if k.startswith("cost/")}
    return summary, costs


def _local_rows(cfg: Config) -> list[tuple[str, dict[str, float], dict[str, float], str]]:
    """(label, summary, costs, parent run id) per strategy or combiner of one continual/multi-task cell."""
    client, done = _finished_cell(cfg)
    if done is not None:
        children = tracking.child_runs(client, done.info.run_id)
        return [(c.info.run_name, *_row_values(c.data.metrics), done.info.run_id) for c in children]
    result = multitask_flow(cfg) if cfg.flow == "multitask" else continual_flow(cfg)
    client.set_tag(result.parent_run_id, CELL_TAG, cell_key(cfg))
    rows = []
    for r in result.results:
        metrics = client.get_run(r.run_id).data.metrics
        rows.append((r.label, r.summary, _row_values(metrics)[1], result.parent_run_id))
    return rows


def _federated_row(cfg: Config) -> tuple[str, dict[str, float], dict[str, float], str, dict[str, float]]:
    """(label, summary, costs, run id, privacy figures) of one federated cell."""
    client, done = _finished_cell(cfg)
    if done is None:
        result = run_federated(cfg)
        client.set_tag(result.run_id, CELL_TAG, cell_key(cfg))
        done = client.get_run(result.run_id)
    summary, costs = _row_values(done.data.metrics)
    # The epsilons the run itself logged after its last round (privacy/epsilon and the ledger's), not
    # a recomputation.
    logged = done.data.metrics
    privacy = {k: logged[m] for k, m in {"epsilon": "privacy/epsilon", **LEDGER_METRICS}.items() if m in logged}
    return f"federated {strategy_label(cfg.strategies[0])}", summary, costs, done.info.run_id, privacy


def _add(table: SweepTable, label: str, summary: dict[str, float], costs: dict[str, float]) -> None:
    row = table.values.setdefault(label, {})
    for m in table.metrics:
        if m in summary:
            row.setdefault(m, []).append(summary[m])
    cost_row = table.costs.setdefault(label, {})
    for c in COSTS:
        if c in costs:
            cost_row.setdefault(c, []).append(costs[c])


def _run_local(table: SweepTable, v: Variant, cfg: Config) -> None:
    """Continual or multi-task: one row per strategy (or combiner), prefixed by the variant."""
    rows = _local_rows(cfg)
    table.run_ids.append(rows[0][3])
    if cfg.flow == "multitask":  # throughput is measured side by side by `make bench`, not across runs
        table.metrics = tuple(sorted(k for k in rows[0][1] if k != "samples_per_s"))
    for label, summary, costs, _ in rows:
        _add(table, row_label(v, label), summary, costs)


def _noise_multiplier(cfg: Config) -> float | None:
    """The noise multiplier the federated run applies (calibrated to a target epsilon before it
    starts; an unreachable budget is refused here), or None without DP."""
    if cfg.clock is not None:  # the clock takes z as given (no calibration: its steps are not known)
        return cfg.privacy.noise_multiplier if cfg.privacy.clipping != "off" else None
    plan = privacy_plan(cfg)
    return None if plan is None else plan.noise_multiplier


def _run_federated(table: SweepTable, v: Variant, cfg: Config, z: float | None) -> None:
    default_label, summary, costs, run_id, privacy = _federated_row(cfg)
    table.run_ids.append(run_id)
    label = v.label or default_label
    table.clipping[label] = cfg.privacy.clipping
    _add(table, label, {m: summary[m] for m in table.metrics if m in summary}, costs)
    if z is not None:
        row = table.values[label]
        for k, v in privacy.items():
            if k in table.metrics:
                row.setdefault(k, []).append(v)
        row.setdefault("noise_multiplier", []).append(z)
        if "noise_std" in table.metrics:
            row.setdefault("noise_std", []).append(z * cfg.privacy.clip / cfg.federated.sampled)


# --------------------------------------------------------------------------- MLflow and Markdown


def accuracy_vs_epsilon_figure(t: SweepTable):
    """Final average accuracy against the run's epsilon, one line per clipping mode (log x);
    runs without DP are a dashed horizontal line (epsilon = infinity)."""
    plt = tracking.pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    modes = sorted({m for m in t.clipping.values() if m != "off"})
    for mode in modes:
        pts = sorted((float(np.mean(t.values[lb]["epsilon"])), float(np.mean(t.values[lb]["avg_accuracy"])),
                      float(np.std(t.values[lb]["avg_accuracy"])))
                     for lb, m in t.clipping.items() if m == mode and t.values[lb].get("epsilon"))
        if pts:
            x, y, err = zip(*pts)
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=mode)
    for lb, m in t.clipping.items():
        if m == "off":
            ax.axhline(float(np.mean(t.values[lb]["avg_accuracy"])), ls="--", color="gray", label=f"{lb} (ε = ∞)")
    ax.set_xscale("log")
    ax.set_xlabel(f"user-level ε (δ = {t.delta:g})" if t.delta else "user-level ε")
    ax.set_ylabel("final average accuracy")
    ax.set_title(t.title if len(t.title) < 70 else t.title[:67] + "...", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _log_sweep(tables: list[SweepTable], seeds: int, overrides: list[str] | None) -> str:
    uri = load_config(None, [o for o in overrides or [] if o.startswith("tracking.")]).tracking.uri \
        or default_tracking_uri()
    client = tracking.client_for(uri)
    run_id = tracking.open_run(client, "sweep", {"seeds": seeds, "configs": ",".join(t.name for t in tables)},
                               {"lifelong.flow": "sweep"}, experiment="sweep")
    metrics = {}
    for t in tables:
        for label, vals in t.values.items():
            for m, v in vals.items():
                key = tracking.metric_key(f"{t.name}/{label}/{m}")
                metrics[f"{key}_mean"], metrics[f"{key}_std"] = float(np.mean(v)), float(np.std(v))
        metrics[tracking.metric_key(f"{t.name}/wall_s")] = t.wall_s
    logger = tracking.MLflowLogger(run_id, client)  # batches of 1,000, as MLflow allows
    logger.log_values(metrics, 0)
    logger.flush()
    client.log_text(run_id, "\n\n".join(f"## {t.title}\n\n{t.markdown()}" for t in tables),
                    "sweep_results.md")
    for t in tables:
        if t.plot_name:
            tracking.log_figure(client, run_id, accuracy_vs_epsilon_figure(t), t.plot_name)
    client.set_terminated(run_id, "FINISHED")
    return run_id


def write_markdown(tables: list[SweepTable], out: Path, seeds: int) -> None:
    """Write (or replace) this sweep's section of ``out``, between markers named by its configs:
    sweeps of other configs keep their own sections in the same file."""
    key = "+".join(t.name for t in tables)
    begin, end = f"<!-- sweep:begin {key} -->", f"<!-- sweep:end {key} -->"
    note = (f"_Generated by `lifelong sweep ... --seeds {seeds}`; mean ± std [95% interval] over seeds "
            f"{', '.join(map(str, range(seeds)))}; updates and wall time per run, mean._")
    body = [begin, note, ""]
    for t in tables:
        body += [f"### {t.title}", "", f"Config: `configs/sweeps/{t.name}.toml` (`{t.stream}`).", "",
                 t.markdown(), ""]
        if t.eval_every != 1 and {"min_acc", "wc_acc"} & set(t.metrics):
            when = f"every {t.eval_every} iterations" if t.eval_every else "at experience boundaries only"
            body += [f"_min_acc and wc_acc are upper bounds: evaluated {when}, not after every update._", ""]
        if t.clipping:  # federated: the wall time, and where the plot is
            note = f"{len(t.run_ids)} runs in {t.wall_s / 60:.1f} min"
            if t.plot_name:
                note += (f"; accuracy vs epsilon: `{t.plot_name}` in the sweep's MLflow run "
                         "(experiment `sweep`)")
            body += [f"_{note}._", ""]
    body.append(end)
    text = out.read_text() if out.exists() else ""
    if begin in text and end in text:
        text = text[: text.index(begin)] + "\n".join(body) + text[text.index(end) + len(end):]
    else:
        text = (text.rstrip() + "\n\n" if text else "") + "\n".join(body) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
