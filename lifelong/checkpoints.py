"""What continual and federated checkpoints share: where they live, what must match to resume,
an atomic write, and a read that refuses a corrupt, foreign or mismatched file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lifelong.config import Config, _flatten
from lifelong.env import state_dir


class ResumeError(ValueError):
    """A run that cannot be resumed: a corrupt or mismatched checkpoint, an unknown run."""


def checkpoint_dir(run_id: str) -> Path:
    return state_dir() / "checkpoints" / run_id


def config_fingerprint(cfg: Config) -> str:
    """What must match for a checkpoint to be resumed: everything but where results are logged."""
    data = cfg.model_dump(mode="json")
    data.pop("tracking")
    return json.dumps(data, sort_keys=True)


def write_checkpoint(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a kill mid-write leaves the previous checkpoint intact


def read_checkpoint(path: Path, cfg: Config, version: int, what: str, unreadable_hint: str = "") -> dict:
    """The checkpoint at ``path``, if it is a ``what`` checkpoint of ``version`` written by ``cfg``."""
    try:
        state = torch.load(path, weights_only=False)
    except Exception as exc:  # truncated, not a checkpoint, unreadable
        raise ResumeError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}){unreadable_hint}") from None
    if not isinstance(state, dict) or state.get("version") != version:
        raise ResumeError(f"checkpoint {path} is not a {what} checkpoint of version {version}")
    if state["config"] != config_fingerprint(cfg):
        old, new = _flatten(json.loads(state["config"])), _flatten(json.loads(config_fingerprint(cfg)))
        keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        raise ResumeError(f"checkpoint {path} was written with a different config (differs in: "
                          f"{', '.join(keys[:8])}); resume with the run's own config")
    return state
