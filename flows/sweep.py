"""A grid of configs × seeds through the flows, summarised as mean ± std.

``lifelong sweep CONFIG [CONFIG ...] --seeds 3`` runs every strategy (continual configs) or every
combiner (multi-task configs) of every config with seeds 0..N-1, then writes one table per config
to a Markdown file and to an MLflow parent run (``sweep_results.md`` and metrics
``<config>/<strategy>/<metric>_mean``). Continual tables show final average accuracy, average
forgetting, min-ACC and WC-ACC; multi-task tables every per-task test metric and throughput.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prefect import flow

from flows.continual import continual_flow
from flows.multitask import multitask_flow
from lifelong import tracking
from lifelong.config import load_config
from lifelong.env import default_tracking_uri

METRICS = ("avg_accuracy", "avg_forgetting", "min_acc", "wc_acc")


@dataclass
class SweepTable:
    name: str
    title: str
    stream: str
    seeds: list[int]
    metrics: tuple[str, ...] = METRICS
    #: strategy label -> metric -> values over seeds
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    run_ids: list[str] = field(default_factory=list)

    def cell(self, label: str, metric: str) -> str:
        vals = self.values[label].get(metric, [])
        if not vals:
            return "n/a"
        return f"{np.mean(vals):.3f} ± {np.std(vals):.3f}"

    def markdown(self) -> str:
        head = "| strategy | " + " | ".join(self.metrics) + " |"
        rule = "|---|" + "---|" * len(self.metrics)
        rows = [f"| {label} | " + " | ".join(self.cell(label, m) for m in self.metrics) + " |"
                for label in self.values]
        return "\n".join([head, rule, *rows])


def _title(path: Path) -> str:
    """The config's first comment line, if any: what the sweep is about."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return path.stem


@flow(name="sweep", validate_parameters=False)
def sweep_flow(configs: list[str], seeds: int, overrides: list[str] | None = None,
               out: str | None = None) -> list[SweepTable]:
    tables = []
    for path in map(Path, configs):
        base = load_config(path, overrides)
        multitask = base.flow == "multitask"
        source = base.multitask.problem if multitask else base.stream.name
        table = SweepTable(path.stem, _title(path), source, list(range(seeds)))
        for seed in range(seeds):
            cfg = load_config(path, [*(overrides or []), f"seed={seed}", 'tracking.experiment="sweep"'])
            result = multitask_flow(cfg) if multitask else continual_flow(cfg)
            table.run_ids.append(result.parent_run_id)
            if multitask:  # throughput is measured side by side by `make bench`, not across runs
                table.metrics = tuple(sorted(k for k in result.results[0].summary if k != "samples_per_s"))
            for r in result.results:
                for m in table.metrics:
                    if m in r.summary:
                        table.values.setdefault(r.label, {}).setdefault(m, []).append(r.summary[m])
                table.values.setdefault(r.label, {})
        tables.append(table)
    _log_sweep(tables, seeds, overrides)
    if out:
        write_markdown(tables, Path(out), seeds)
    return tables


def _log_sweep(tables: list[SweepTable], seeds: int, overrides: list[str] | None) -> None:
    uri = load_config(None, overrides).tracking.uri or default_tracking_uri()
    client = tracking.client_for(uri)
    run = client.create_run(tracking.experiment_id(client, "sweep"), run_name="sweep",
                            tags={"lifelong.flow": "sweep"})
    tracking.log_params(client, run.info.run_id, {"seeds": seeds, "configs": ",".join(t.name for t in tables)})
    metrics = {}
    for t in tables:
        for label, vals in t.values.items():
            for m, v in vals.items():
                key = tracking.metric_key(f"{t.name}/{label}/{m}")
                metrics[f"{key}_mean"], metrics[f"{key}_std"] = float(np.mean(v)), float(np.std(v))
    now = int(time.time() * 1000)
    items = [tracking.Metric(k, v, now, 0) for k, v in metrics.items()]
    for i in range(0, len(items), 1000):
        client.log_batch(run.info.run_id, metrics=items[i : i + 1000])
    client.log_text(run.info.run_id, "\n\n".join(f"## {t.title}\n\n{t.markdown()}" for t in tables),
                    "sweep_results.md")
    client.set_terminated(run.info.run_id, "FINISHED")


def write_markdown(tables: list[SweepTable], out: Path, seeds: int) -> None:
    """Write (or replace) this sweep's section of ``out``, between markers named by its configs:
    sweeps of other configs keep their own sections in the same file."""
    key = "+".join(t.name for t in tables)
    begin, end = f"<!-- sweep:begin {key} -->", f"<!-- sweep:end {key} -->"
    body = [begin, f"_Generated by `lifelong sweep ... --seeds {seeds}`; mean ± std over seeds "
                   f"{', '.join(map(str, range(seeds)))}._", ""]
    for t in tables:
        body += [f"### {t.title}", "", f"Config: `configs/sweeps/{t.name}.toml` (`{t.stream}`).", "",
                 t.markdown(), ""]
    body.append(end)
    text = out.read_text() if out.exists() else ""
    if begin in text and end in text:
        text = text[: text.index(begin)] + "\n".join(body) + text[text.index(end) + len(end):]
    else:
        text = (text.rstrip() + "\n\n" if text else "") + "\n".join(body) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
