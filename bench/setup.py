"""What every benchmark sets up before it times anything: an output folder, a SQLite MLflow store
in it (its tables created), a config pointed at that store, and Prefect's ephemeral API already
up (its start is reported apart, not counted in a ratio)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path


def out_folder(out_dir: Path | None, prefix: str) -> Path:
    out = Path(out_dir or tempfile.mkdtemp(prefix=prefix))
    out.mkdir(parents=True, exist_ok=True)
    return out


def store(out_dir: Path, name: str = "bench.db") -> str:
    """The URI of a SQLite MLflow store in ``out_dir``."""
    return f"sqlite:///{(out_dir / name).resolve()}"


def bench_config(path: str, overrides: list[str], uri: str, experiment: str | None = None):
    """``path`` with ``overrides``, tracked in ``uri`` (and ``experiment``)."""
    from lifelong.config import load_config

    return load_config(path, [*overrides, f'tracking.uri="{uri}"',
                              *([f'tracking.experiment="{experiment}"'] if experiment else [])])


def start_prefect_api() -> float:
    """Run a no-op flow so Prefect's ephemeral API is up before anything is timed; its seconds."""
    from prefect import flow

    @flow(name="noop")
    def noop() -> int:
        return 1

    t = time.perf_counter()
    noop()
    return time.perf_counter() - t


def create_store(uri: str) -> float:
    """Create the store's tables (MLflow does on first use); its seconds."""
    from lifelong.tracking import client_for

    t = time.perf_counter()
    client_for(uri).search_experiments()
    return time.perf_counter() - t


def rss_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS: now; VmHWM: the peak), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")
