"""MLflow tracking: runs, metrics logged in batches, the accuracy matrix, plots, models.

* ``MLflowLogger`` buffers values and sends them with ``log_batch`` (one call per 1,000 values,
  not one per value); Avalanche's evaluation logs into it through
  ``bridges/avalanche/mlflow_logger.py`` (Avalanche ships no MLflow logger).
* Matplotlib and PyTorch are imported where a plot or a model is made, not with this module, so
  commands that only read or write runs (``lifelong registry``, ``lifelong results``) start fast.
* Everything addresses runs by id through one ``MlflowClient``: MLflow's "active run" is per
  thread, and Prefect runs steps in worker threads.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from lifelong.env import default_tracking_uri

MATRIX_FILE = "accuracy_matrix.json"
SUMMARY_FILE = "summary.json"
TRACE_FILE = "continual_trace.json"
#: Per-client continual evaluation: one line per client, experience trained, experience evaluated.
CLIENT_MATRIX_FILE = "client_matrix.json"
_BATCH_METRICS, _BATCH_PARAMS = 1000, 100  # MLflow's limits per log_batch call


def metric_key(text: str) -> str:
    """A string MLflow accepts in a metric name (labels like ``replay+center_loss`` are not)."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", text)


def client_for(uri: str | None = None) -> MlflowClient:
    return MlflowClient(tracking_uri=uri or default_tracking_uri())


def experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root(client.tracking_uri))
    except MlflowException as exc:  # a process beside this one (a parallel sweep) created it first
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


@contextmanager
def terminated(client: MlflowClient, run_id: str, cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """The run ends FINISHED when the block does, FAILED when it raises (the error goes on);
    ``cleanup`` (flush buffered metrics, close a progress bar) runs first either way."""
    try:
        yield
    except BaseException:
        if cleanup is not None:
            cleanup()
        client.set_terminated(run_id, "FAILED")
        raise
    if cleanup is not None:
        cleanup()
    client.set_terminated(run_id, "FINISHED")


def artifact_root(uri: str) -> str | None:
    """Where a new experiment of a SQLite store keeps its artifacts: ``mlruns/`` beside the
    database file. MLflow's own default is ``./mlruns`` in whatever directory the process runs in,
    which scatters one store's artifacts over every working directory it was used from. None (the
    server's or MLflow's choice) for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()


class MLflowLogger:
    """Buffers metric values of one MLflow run and sends them with ``log_batch``.

    ``x_plot`` becomes the MLflow step. Non-numeric values (images, tensors) are skipped.
    Call ``flush()`` (the logger does at the end of each experience and of evaluation).
    """

    def __init__(self, run_id: str, client: MlflowClient | None = None, tracking_uri: str | None = None):
        self.run_id = run_id
        self.client = client or client_for(tracking_uri)
        self._buffer: list[Metric] = []
        self._tags: list[RunTag] = []

    def log_single_metric(self, name: str, value: Any, x_plot: int) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            return
        value = float(value)
        if math.isnan(value):
            return
        self._buffer.append(Metric(name, value, int(time.time() * 1000), int(x_plot)))
        if len(self._buffer) >= _BATCH_METRICS:
            self.flush()

    def log_values(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.log_single_metric(k, v, step)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Tags sent with the next flush: in the same transaction as the metrics, not one more
        (each ``log_batch`` costs about as much with one tag as with a hundred metrics)."""
        self._tags.extend(RunTag(k, str(v)) for k, v in tags.items())
        if len(self._tags) >= _BATCH_PARAMS:
            self.flush()

    def discard(self) -> None:
        """Drop what is buffered (a failed attempt's metrics, before a retry from a checkpoint)."""
        self._buffer.clear()

    def flush(self) -> None:
        """Send what is buffered. A batch the store refuses or cannot be reached for (MLflow's client
        retries a server that is down for a while first) stays buffered, and the error is raised:
        a later flush, or a resumed run, sends it; nothing is dropped. Sending a batch again that
        did arrive duplicates nothing (the stores skip an identical key, value, timestamp, step)."""
        while self._buffer or self._tags:
            tags = self._tags[:_BATCH_PARAMS]
            n = _BATCH_METRICS - len(tags)  # (MLflow's limit of 1,000 counts tags too)
            chunk = self._buffer[:n]
            self.client.log_batch(self.run_id, metrics=chunk, tags=tags)
            del self._tags[:len(tags)], self._buffer[:len(chunk)]

    def flush_if_older(self, seconds: float) -> None:
        """Flush when the oldest buffered value is ``seconds`` old: a value reaches MLflow at
        most that late, in one batch instead of one per step (each ``log_batch`` is a database
        transaction, about as long as a small federated round's training)."""
        if self._buffer and time.time() * 1000 - self._buffer[0].timestamp >= seconds * 1000:
            self.flush()

    def pending(self) -> list[tuple[str, float, int, int]]:
        """The buffered values as (key, value, timestamp, step), e.g. to keep in a checkpoint."""
        return [(m.key, m.value, m.timestamp, m.step) for m in self._buffer]

    def restore(self, pending: list[tuple[str, float, int, int]]) -> None:
        """Buffer values saved with :meth:`pending`. They keep their timestamps, so values that
        reached MLflow before all the same are not logged twice: MLflow's stores skip a metric
        equal to a logged one in key, value, timestamp and step."""
        self._buffer.extend(Metric(k, v, t, s) for k, v, t, s in pending)


def open_run(client: MlflowClient, name: str, params: dict, tags: dict[str, str],
             experiment: str | None = None, parent_run_id: str | None = None) -> str:
    """Create a run (nested under ``parent_run_id``, in its experiment) with its parameters."""
    if parent_run_id is not None:
        exp_id = client.get_run(parent_run_id).info.experiment_id
        tags = {"mlflow.parentRunId": parent_run_id, **tags}
    else:
        exp_id = experiment_id(client, experiment or "lifelong")
    run_id = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
    log_params(client, run_id, params)
    return run_id


def log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), _BATCH_PARAMS):
        client.log_batch(run_id, params=items[i : i + _BATCH_PARAMS])


def set_tags(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


# --------------------------------------------------------------------------- artifacts


def log_matrix(client: MlflowClient, run_id: str, matrix: np.ndarray, labels: list[str]) -> None:
    """The accuracy matrix as a table (rows: after training on; columns: evaluated on)."""
    matrix = np.asarray(matrix, dtype=float)
    rows = [f"after {labels[k]}" for k in range(matrix.shape[0])] if matrix.shape[0] > 1 else ["after all"]
    client.log_dict(run_id, {"rows": rows, "columns": labels, "matrix": matrix.tolist()}, MATRIX_FILE)


def pyplot():
    """Matplotlib's pyplot, drawing to files only (no display here, and none needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def matrix_figure(matrix: np.ndarray, labels: list[str], title: str):
    plt = pyplot()
    matrix = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(1.1 * matrix.shape[1] + 2, 0.8 * matrix.shape[0] + 1.6))
    im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    for (k, i), v in np.ndenumerate(matrix):
        if np.isnan(v):  # a task not seen yet (multi-head models have no head for it)
            continue
        ax.text(i, k, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
    ax.set_xticks(range(matrix.shape[1]), labels, rotation=30, ha="right")
    ax.set_yticks(range(matrix.shape[0]), [f"after {l}" for l in labels[: matrix.shape[0]]]
                  if matrix.shape[0] > 1 else ["after all"])
    ax.set_xlabel("evaluated on")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def curve_figure(points: list[tuple[int, int, dict[int, float]]], labels: list[str], title: str,
                 xlabel: str = "training iteration"):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    tasks = sorted({i for _, _, accs in points for i in accs})
    for i in tasks:
        xs = [it for it, _, accs in points if i in accs]
        ax.plot(xs, [accs[i] for _, _, accs in points if i in accs], label=labels[i], lw=1.2)
    starts = {}  # dashed lines where each later experience starts
    for it, exp, _ in points:
        starts.setdefault(exp, it)
    for exp, it in starts.items():
        if exp:
            ax.axvline(it, color="grey", lw=0.6, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def clients_figure(final: np.ndarray, spreads: list[dict[str, float]], labels: list[str], title: str):
    """Per-client continual evaluation: left, every client's final accuracy on each experience
    (clients × experiences; NaN, no data, left blank); right, the spread of the clients' seen
    accuracy after each experience (mean, p10–p90 band, worst client)."""
    plt = pyplot()
    n_clients = final.shape[0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.1, 1]})
    im = left.imshow(np.ma.masked_invalid(final), vmin=0, vmax=1, cmap="viridis", aspect="auto",
                     interpolation="nearest")
    left.set_xticks(range(final.shape[1]), labels, rotation=30, ha="right")
    left.set_ylabel(f"client ({n_clients})")
    left.set_xlabel("evaluated on (after the last experience)")
    fig.colorbar(im, ax=left, fraction=0.046)
    xs = range(len(spreads))
    right.fill_between(xs, [s["p10"] for s in spreads], [s["p90"] for s in spreads], alpha=0.25, label="p10–p90")
    right.plot(xs, [s["mean"] for s in spreads], lw=1.6, label="mean")
    right.plot(xs, [s["worst"] for s in spreads], lw=1.2, ls="--", label="worst client")
    right.set_xticks(list(xs), [f"after {lab}" for lab in labels[: len(spreads)]], rotation=30, ha="right")
    right.set_ylim(0, 1.02)
    right.set_ylabel("client's accuracy on its seen experiences")
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def histogram_figure(histograms: list[np.ndarray], title: str):
    """Per-client class counts, one panel per experience (clients × classes, stacked bars)."""
    plt = pyplot()
    n = len(histograms)
    fig, axes = plt.subplots(1, n, figsize=(min(3.2 * n, 16), 3.4), squeeze=False, sharey=True)
    cmap = plt.get_cmap("tab10" if histograms[0].shape[1] <= 10 else "tab20")
    for e, (ax, h) in enumerate(zip(axes[0], histograms)):
        bottom = np.zeros(h.shape[0])
        for c in range(h.shape[1]):
            if h[:, c].any():
                ax.bar(range(h.shape[0]), h[:, c], bottom=bottom, color=cmap(c % cmap.N), label=str(c), width=0.9)
                bottom += h[:, c]
        ax.set_title(f"exp{e}", fontsize=9)
        ax.set_xlabel("client")
        ax.legend(fontsize=6, title="class", title_fontsize=6)
    axes[0][0].set_ylabel("samples")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def log_figure(client: MlflowClient, run_id: str, fig, name: str) -> None:
    client.log_figure(run_id, fig, name)
    pyplot().close(fig)


def log_torch_model(run_id: str, model, uri: str | None, name: str = "model") -> str:
    """Log the final model as an eager, pickled PyTorch model and return its ``models:/`` URI.

    Pickle rather than ``torch.export`` (MLflow 3's alternative): an exported program fixes the
    batch size of its example input, while the pickled module predicts any batch size. The
    model's code is this installed package; requirements are given explicitly so MLflow does
    not spend seconds inferring them.
    """
    import logging

    import mlflow.pytorch
    import torch

    # MLflow warns on every pickle save; the choice is deliberate (see above).
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    mlflow.set_tracking_uri(uri or default_tracking_uri())
    # Attach to the run by id in this thread (the active run is thread-local).
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model.cpu(), name=name, serialization_format="pickle",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "lifelong"],
        )
    return info.model_uri


# --------------------------------------------------------------------------- reading results back


@dataclass
class RunResults:
    run_id: str
    name: str
    status: str
    matrix: np.ndarray | None
    rows: list[str]
    columns: list[str]
    metrics: dict[str, float]
    children: list["RunResults"]
    tags: dict[str, str] = field(default_factory=dict)
    #: A federated run's per-client matrices (``CLIENT_MATRIX_FILE``), when it logged them.
    client_matrix: dict | None = None


def child_runs(client: MlflowClient, run_id: str) -> list:
    exp_id = client.get_run(run_id).info.experiment_id
    return client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{run_id}'",
                              order_by=["attributes.start_time ASC"])


def read_results(run_id: str, uri: str | None = None) -> RunResults:
    client = client_for(uri)
    try:
        run = client.get_run(run_id)
    except Exception as exc:  # MlflowException for unknown ids, connection errors for bad URIs
        raise LookupError(f"no MLflow run {run_id!r} in {uri or default_tracking_uri()}: {exc}") from None
    matrix, rows, cols = None, [], []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, MATRIX_FILE, tmp)
            data = json.loads(Path(path).read_text())
            matrix, rows, cols = np.array(data["matrix"]), data["rows"], data["columns"]
        except Exception:  # a parent run, or a run that stopped before its first experience ended
            pass
        client_matrix = None
        if any(k.startswith("final/clients_acc_") for k in run.data.metrics):
            path = client.download_artifacts(run_id, CLIENT_MATRIX_FILE, tmp)
            client_matrix = json.loads(Path(path).read_text())
    children = [read_results(child.info.run_id, uri) for child in child_runs(client, run_id)]
    return RunResults(run_id, run.info.run_name, run.info.status, matrix, rows, cols,
                      dict(run.data.metrics), children, dict(run.data.tags), client_matrix)
