"""What ``lifelong strategies`` lists: every strategy and plugin, with the paper it comes from."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StrategyInfo:
    name: str
    kind: str  # "strategy" (the learner), "plugin" (composable with any strategy), "combiner" (multi-task)
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
    StrategyInfo(
        "oneprompt", "strategy",
        "OnePrompt: one prefix-tuning prompt for all tasks on a frozen ViT; vor=true adds virtual "
        "outlier regularisation of the head (OVOR)",
        "Huang et al., OVOR: OnePrompt with Virtual Outlier Regularization for Rehearsal-Free "
        "Class-Incremental Learning, ICLR 2024 (code: jpmorganchase/ovor)",
        "bridges/avalanche/oneprompt.py + strategies/ovor.py + tasks/vit.py",
    ),
    StrategyInfo(
        "ewc", "plugin", "Elastic Weight Consolidation: lambda * sum F (theta - theta*)^2, diagonal empirical Fisher",
        "Kirkpatrick et al., Overcoming catastrophic forgetting in neural networks, PNAS 2017; "
        "as studied in Smith et al., A Closer Look at Rehearsal-Free Continual Learning, 2022",
        "strategies/regularizers/ewc.py + bridges/avalanche/plugin.py",
    ),
    StrategyInfo(
        "l2", "plugin", "L2 toward the previous (or initial) backbone parameters, head excluded",
        "Smith et al., A Closer Look at Rehearsal-Free Continual Learning, 2022",
        "strategies/regularizers/l2.py + bridges/avalanche/plugin.py",
    ),
    StrategyInfo(
        "center_loss", "plugin", "center loss on penultimate features; centers and classifier frozen after learning",
        "Center Loss Regularization for Continual Learning, 2021 (centers: Wen et al., ECCV 2016)",
        "strategies/regularizers/center_loss.py + bridges/avalanche/plugin.py",
    ),
    StrategyInfo(
        "sum", "combiner", "multi-task: the (weighted) sum of the task losses", "—",
        "strategies/combiners/gradients.py",
    ),
    StrategyInfo(
        "pcgrad", "combiner", "multi-task: project each task's gradient off the ones it conflicts with",
        "Yu et al., Gradient Surgery for Multi-Task Learning, NeurIPS 2020",
        "strategies/combiners/pcgrad.py",
    ),
    StrategyInfo(
        "gcond", "combiner",
        "multi-task: accumulate per-task gradients over K batches (sequential/stochastic), arbitrate "
        "conflicting pairs with a smooth projection schedule, momentum; also usable inside a continual "
        "learner (strategy key arbitrate = 'gcond')",
        "GCond: Gradient Conflict Resolution via Accumulation-based Stabilization for Large-Scale "
        "Multi-Task Learning, 2025 (code: AlevLab-dev/GCond)",
        "strategies/combiners/gcond.py (+ bridges/avalanche/arbitration.py)",
    ),
)


def names() -> list[str]:
    return [s.name for s in CATALOGUE]
