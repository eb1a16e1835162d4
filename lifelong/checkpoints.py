"""What continual and federated checkpoints share: where they live, what must match to resume,
an atomic write, and a read that refuses a corrupt, foreign or mismatched file."""

from __future__ import annotations

import errno
import io
import json
from pathlib import Path

import torch

from lifelong.config import Config, _flatten
from lifelong.env import state_dir


class ResumeError(ValueError):
    """A run that cannot be resumed: a corrupt or mismatched checkpoint, an unknown run."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (a full disk, a file-size limit, no permission);
    the previous one at that path is intact."""


def checkpoint_dir(run_id: str) -> Path:
    return state_dir() / "checkpoints" / run_id


def config_fingerprint(cfg: Config) -> str:
    """What must match for a checkpoint to be resumed: everything but where results are logged."""
    data = cfg.model_dump(mode="json")
    data.pop("tracking")
    return json.dumps(data, sort_keys=True)


def write_checkpoint(state: dict, path: Path) -> None:
    """Write ``state`` to ``path`` atomically: a kill or a full disk mid-write leaves the previous
    checkpoint intact (and no partial file behind); a failed write raises ``CheckpointWriteError``
    naming the path and the cause."""
    tmp = path.with_suffix(".tmp")
    # Serialised in memory first, then written with a plain write: a failed write then says why
    # (the OS's error: "No space left on device"), where torch.save writing to the file itself
    # reports only an internal offset mismatch.
    data = checkpoint_bytes(state)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        full = exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
        error = CheckpointWriteError(f"could not write {path}: {exc.strerror or exc}"
                                     + (" (the disk or the file-size limit is full)" if full else "")
                                     + "; the previous checkpoint there is intact")
        error.errno = exc.errno
        raise error from exc


def checkpoint_bytes(state: dict) -> bytes:
    """``state`` serialised as a checkpoint file holds it (for a store that keeps it in a row)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def read_checkpoint(path: Path, cfg: Config, version: int, what: str, unreadable_hint: str = "") -> dict:
    """The checkpoint at ``path``, if it is a ``what`` checkpoint of ``version`` written by ``cfg``."""
    return _load_checked(path, f"checkpoint {path}", cfg, version, what, unreadable_hint)


def read_checkpoint_bytes(data: bytes, where: str, cfg: Config, version: int, what: str,
                          unreadable_hint: str = "") -> dict:
    """A checkpoint serialised by ``checkpoint_bytes``, checked as ``read_checkpoint`` checks a
    file; ``where`` names it in errors."""
    return _load_checked(io.BytesIO(data), where, cfg, version, what, unreadable_hint)


def _load_checked(source, where: str, cfg: Config, version: int, what: str, unreadable_hint: str) -> dict:
    try:
        state = torch.load(source, weights_only=False)
    except Exception as exc:  # truncated, not a checkpoint, unreadable
        raise ResumeError(f"{where} is unreadable ({type(exc).__name__}: {exc}){unreadable_hint}") from None
    if not isinstance(state, dict) or state.get("version") != version:
        raise ResumeError(f"{where} is not a {what} checkpoint of version {version}")
    if state["config"] != config_fingerprint(cfg):
        old, new = _flatten(json.loads(state["config"])), _flatten(json.loads(config_fingerprint(cfg)))
        keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        raise ResumeError(f"{where} was written with a different config (differs in: "
                          f"{', '.join(keys[:8])}); resume with the run's own config")
    return state
