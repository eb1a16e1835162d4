"""The experiment protocol of ``lifelong sweep``: hyperparameters chosen on validation data, and
each paper claim's verdict by a rule stated in advance (``tasks/comparison.py``).

A sweep config may carry a ``[protocol]`` section::

    [protocol]
    validation_fraction = 0.2     # of each stream's training split: where hyperparameters are chosen
    metric = "avg_accuracy"       # the score (higher is better; "avg_forgetting": lower)
    tune_seeds = [0]

    [[protocol.tune]]             # one grid per key, chosen in turn (coordinate-wise)
    key = "strategies.3.plugins.0.lambda"
    grid = [100, 1000, 10000]

    [[protocol.claims]]           # judged on the reported seeds' paired differences
    claim = "L2 beats EWC (Smith et al. 2022)"
    better = "naive+l2"
    baseline = "naive+ewc"
    metric = "avg_accuracy"
    direction = "higher"

Tuning runs train on the rest of the training split and are scored on the validation split
(``stream.validation_fraction``): the test split is never read while choosing. A continual
config's key names one strategy (``strategies.<i>.…``), and only that strategy runs while its
grid is tried. The chosen values then apply to every reported run of the config.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lifelong.config import Config, ConfigError, apply_override, validate_config

LOWER_IS_BETTER = {"avg_forgetting"}
PROTOCOL_KEYS = {"validation_fraction", "metric", "tune_seeds", "tune", "claims"}
CLAIM_KEYS = {"claim", "better", "baseline", "metric", "direction"}


@dataclass(frozen=True)
class Grid:
    key: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Claim:
    claim: str
    better: str
    baseline: str
    metric: str = "avg_accuracy"
    direction: str = "higher"


@dataclass
class Protocol:
    validation_fraction: float = 0.2
    metric: str = "avg_accuracy"
    tune_seeds: tuple[int, ...] = (0,)
    grids: list[Grid] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)

    def better(self, a: float, b: float) -> bool:
        return a < b if self.metric in LOWER_IS_BETTER else a > b


@dataclass
class Tuned:
    """What tuning chose for one key: the grid's validation scores and the winner."""

    key: str
    scores: dict[str, float]  # value (as written in TOML) -> mean validation score
    chosen: str

    def describe(self, metric: str) -> str:
        grid = ", ".join(f"{v} ({s:.3f})" for v, s in self.scores.items())
        return f"`{self.key}` ∈ {{{grid}}} → **{self.chosen}** (validation {metric})"


def read_protocol(raw: Any, path: Path) -> Protocol | None:
    """The ``[protocol]`` section of a sweep config, checked before any run."""
    if raw is None:
        return None
    where = f"{path}: protocol"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table")
    unknown = sorted(set(raw) - PROTOCOL_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: "
                          f"{', '.join(sorted(PROTOCOL_KEYS))}")
    p = Protocol(float(raw.get("validation_fraction", 0.2)), str(raw.get("metric", "avg_accuracy")),
                 tuple(raw.get("tune_seeds", (0,))))
    if not 0 < p.validation_fraction < 1:
        raise ConfigError(f"{where}.validation_fraction: must be in (0, 1) — the validation split would be "
                          f"empty (got {p.validation_fraction})")
    if not p.tune_seeds:
        raise ConfigError(f"{where}.tune_seeds: at least one seed to tune on")
    for i, g in enumerate(raw.get("tune", [])):
        if not isinstance(g, dict) or set(g) != {"key", "grid"}:
            raise ConfigError(f"{where}.tune[{i}]: a grid is {{ key = \"dotted.key\", grid = [values] }}")
        if not isinstance(g["grid"], list) or not g["grid"]:
            raise ConfigError(f"{where}.tune[{i}] ({g['key']}): the grid is empty; give at least one value")
        p.grids.append(Grid(str(g["key"]), tuple(g["grid"])))
    for i, c in enumerate(raw.get("claims", [])):
        unknown = sorted(set(c) - CLAIM_KEYS) if isinstance(c, dict) else ["(not a table)"]
        missing = sorted({"claim", "better", "baseline"} - set(c)) if isinstance(c, dict) else []
        if unknown or missing:
            raise ConfigError(f"{where}.claims[{i}]: unknown {unknown} / missing {missing}; a claim has "
                              f"{', '.join(sorted(CLAIM_KEYS))}")
        claim = Claim(**c)
        if claim.direction not in ("higher", "lower"):
            raise ConfigError(f"{where}.claims[{i}].direction: 'higher' or 'lower', not {claim.direction!r}")
        p.claims.append(claim)
    return p


def tuning_config(data: dict, grid: Grid, value: Any, chosen: list[str], protocol: Protocol, seed: int,
                  overrides: list[str], to_toml) -> Config:
    """The config one tuning run trains: the sweep's overrides and the values already chosen,
    this grid's value, the validation split, the seed — and, for a continual config, only the
    strategy the key belongs to."""
    d = copy.deepcopy(data)
    for item in [*overrides, *chosen, f"{grid.key}={to_toml(value)}",
                 f"stream.validation_fraction={protocol.validation_fraction}", f"seed={seed}",
                 'tracking.experiment="sweep-tuning"', "tracking.register_model=false"]:
        apply_override(d, item)
    if d.get("flow", "continual") == "continual":
        parts = grid.key.split(".")
        if parts[0] != "strategies" or len(parts) < 3 or not parts[1].isdigit():
            raise ConfigError(f"protocol.tune: {grid.key!r} must name one strategy's key "
                              "(strategies.<i>.<key>): that strategy alone is tuned")
        index = int(parts[1])
        if index >= len(d.get("strategies", [])):
            raise ConfigError(f"protocol.tune: {grid.key!r}: there is no strategy {index}")
        d["strategies"] = [d["strategies"][index]]
    return validate_config(d)
