"""``lifelong prune``: remove the resume state of runs that finished.

Every run keeps what a resume needs on this machine: the server's (or the continual learner's)
checkpoints in ``$LIFELONG_HOME/checkpoints/RUN_ID/`` and, for federated runs, its clients' state
store in ``CLIENT_STATE/RUN_ID/`` (``clients/state_store.py``). Nothing reads them once the run
has FINISHED — a continuation starts from the registered version's own artifacts
(``flows/continuation.py``) — so they only fill the disk (a population's store, with its
write-ahead logs, is ~16 MB a run). A folder is removed only when the tracking store says its run
FINISHED; a run that failed, was killed or is still running keeps its folders (it can be
resumed), and so does a folder whose run this store does not know (it may be another store's).
The clients' own DP records (``clients/privacy_record.py``) sit beside the run folders and
outlive every run: never touched.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from lifelong.cli.common import fail

TrackingUri = Annotated[str | None, typer.Option(
    "--tracking-uri", help="MLflow store the runs are in (default: $MLFLOW_TRACKING_URI or ./mlruns.db)")]


@dataclass
class RunFolders:
    run_id: str
    folders: list[Path]

    @property
    def size(self) -> int:
        total = 0
        for folder in self.folders:
            for f in folder.rglob("*"):
                with contextlib.suppress(FileNotFoundError):  # a running run's WAL may come and go
                    total += f.stat().st_size if f.is_file() else 0
        return total


def run_folders(checkpoints: Path, client_state: Path) -> list[RunFolders]:
    """Each run's resume folders: checkpoint folders, and client-state folders (those holding a
    run's state shards)."""
    found: dict[str, list[Path]] = {}
    if checkpoints.is_dir():
        for d in sorted(checkpoints.iterdir()):
            if d.is_dir():
                found.setdefault(d.name, []).append(d)
    if client_state.is_dir():
        for d in sorted(client_state.iterdir()):
            if d.is_dir() and any(d.glob("states-*.sqlite*")):
                found.setdefault(d.name, []).append(d)
    return [RunFolders(run, folders) for run, folders in sorted(found.items())]


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def prune(tracking_uri: TrackingUri = None,
          dry_run: Annotated[bool, typer.Option("--dry-run", help="list what would go; remove nothing")] = False,
          client_state_dir: Annotated[Path | None, typer.Option(
              "--client-state-dir", help="where the clients' state is (default: as the clients find it: "
                                         "$LIFELONG_CLIENT_STATE_DIR, else $LIFELONG_HOME/client-state)")] = None,
          ) -> None:
    """Remove the checkpoints and client state of runs that FINISHED; keep every other run's."""
    from mlflow.exceptions import MlflowException

    from lifelong import registry, tracking
    from lifelong.clients.state_store import state_root
    from lifelong.env import default_tracking_uri, state_dir

    uri = tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        fail(f"no MLflow store at {uri}: no run is known to have finished (pass --tracking-uri)", 1)
    try:
        registry.check_store(uri)
    except registry.StoreUnavailable as exc:
        fail(str(exc), 1)
    client = tracking.client_for(uri)
    freed = 0
    runs = run_folders(state_dir() / "checkpoints", client_state_dir.resolve() if client_state_dir else state_root())
    for run in runs:
        try:
            status = client.get_run(run.run_id).info.status
        except MlflowException:
            status = None
        size = run.size
        where = ", ".join(str(f) for f in run.folders)
        if status == "FINISHED":
            if not dry_run:
                for folder in run.folders:
                    shutil.rmtree(folder)
            freed += size
            typer.echo(f"{run.run_id}  FINISHED  {_mb(size)}  {'would remove' if dry_run else 'removed'} {where}")
        elif status is None:
            typer.echo(f"{run.run_id}  not in {uri}  {_mb(size)}  kept (another store's run?): {where}")
        else:  # FAILED, KILLED; RUNNING: still running, or its process was killed
            typer.echo(f"{run.run_id}  {status}  {_mb(size)}  kept: resumable (lifelong run --resume {run.run_id})")
    if not runs:
        typer.echo(f"no run state under {state_dir()}")
    typer.echo(f"{'would free' if dry_run else 'freed'} {_mb(freed)}")
