"""What a federated client keeps between rounds, as records of its persistent ``Context.state``.

Flower keeps ``Context.state`` (a ``RecordDict``) per node across the rounds of a run — on the
SuperNode in a deployment, in the simulation engine or our in-process grid when simulated — so a
client's continual-learning memory lives there and nowhere else:

* ``progress`` (ConfigRecord): the last experience trained and the last one consolidated;
* ``reg/<i>`` (ArrayRecord): the i-th regulariser's ``state_dict`` (Fisher, anchors, centers);
* ``replay`` (ArrayRecord): the rehearsal memory, group by group, with the reservoir weights
  Avalanche's buffer keeps sorted, so a restored buffer evolves exactly as the original would;
* ``sample-dp`` (ConfigRecord): under sample-level DP, the client's Opacus accountant history —
  every ``(noise_multiplier, sample_rate, steps)`` of its DP-SGD so far — so its epsilon composes
  every round it was sampled in (each client is its own privacy unit).
"""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, RecordDict

from lifelong.bridges.flower.records import from_state_dict, to_state_dict

PROGRESS = "progress"
REPLAY = "replay"
SAMPLE_DP = "sample-dp"


def reg_key(i: int) -> str:
    return f"reg/{i}"


def read_progress(state: RecordDict) -> dict[str, int]:
    rec = state[PROGRESS] if PROGRESS in state else ConfigRecord({"trained": -1, "consolidated": -1})
    return {"trained": int(rec["trained"]), "consolidated": int(rec["consolidated"])}


def write_progress(state: RecordDict, trained: int, consolidated: int) -> None:
    state[PROGRESS] = ConfigRecord({"trained": trained, "consolidated": consolidated})


def write_tensors(state: RecordDict, key: str, tensors: dict[str, torch.Tensor]) -> None:
    state[key] = from_state_dict(tensors)


def read_tensors(state: RecordDict, key: str) -> dict[str, torch.Tensor] | None:
    if key not in state:
        return None
    return dict(to_state_dict(state[key]))


def read_accountant(state: RecordDict) -> list[tuple[float, float, int]]:
    """The client's Opacus accountant history (empty before its first DP round)."""
    if SAMPLE_DP not in state:
        return []
    rec = state[SAMPLE_DP]
    return [(float(z), float(q), int(n)) for z, q, n in zip(rec["noise_multiplier"], rec["sample_rate"], rec["steps"])]


def write_accountant(state: RecordDict, history) -> None:
    # Three parallel lists: a ConfigRecord holds flat lists, not tuples (floats kept exactly).
    history = list(history)
    if not history:
        return  # nothing spent yet (and a ConfigRecord cannot hold an empty, untyped list)
    state[SAMPLE_DP] = ConfigRecord({"noise_multiplier": [float(z) for z, _, _ in history],
                                     "sample_rate": [float(q) for _, q, _ in history],
                                     "steps": [int(n) for _, _, n in history]})
