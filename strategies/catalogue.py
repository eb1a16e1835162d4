"""What ``lifelong strategies`` lists: every strategy and plugin, with the paper it comes from."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StrategyInfo:
    name: str
    kind: str  # "strategy" (the learner) or "plugin" (composable with any strategy)
    summary: str
    paper: str
    implementation: str


CATALOGUE: tuple[StrategyInfo, ...] = (
    StrategyInfo(
        "naive", "strategy", "fine-tune on each experience in turn (lower bound; shows forgetting)",
        "—", "avalanche.training.Naive",
    ),
    StrategyInfo(
        "replay", "strategy", "experience replay from a fixed-size, experience-balanced memory",
        "Chaudhry et al., On Tiny Episodic Memories in Continual Learning, 2019",
        "avalanche.training.Naive + avalanche.training.plugins.ReplayPlugin",
    ),
    StrategyInfo(
        "joint", "strategy", "train on all experiences at once (upper bound; not continual)",
        "—", "avalanche.training.JointTraining",
    ),
)


def names() -> list[str]:
    return [s.name for s in CATALOGUE]
