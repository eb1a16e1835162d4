"""Progress on long work: a bar over experiences and epochs on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys

from avalanche.core import SupervisedPlugin
from tqdm import tqdm


class Progress:
    """One learner's progress over its experiences; epochs show as the bar's postfix."""

    def __init__(self, label: str, n_experiences: int, epochs: int, stream=None, step_name: str = "epoch"):
        self.label, self.n, self.epochs, self.step_name = label, n_experiences, epochs, step_name
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.bar = tqdm(total=n_experiences, desc=f"{label:>12}", unit="exp", file=self.stream,
                        leave=True, dynamic_ncols=True) if self.tty else None

    def epoch(self, experience: int, epoch: int) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"experience {experience + 1}/{self.n} {self.step_name} {epoch + 1}/{self.epochs}")

    def experience_done(self, experience: int, accuracy: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"avg acc {accuracy:.3f}")
            self.bar.update(1)
        else:
            print(f"[{self.label}] experience {experience + 1}/{self.n} done: average accuracy on seen "
                  f"{accuracy:.3f}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class EpochProgressPlugin(SupervisedPlugin):
    """Avalanche adapter: reports each epoch's start to a :class:`Progress`."""

    checkpoint_stateless = True  # nothing of its own to checkpoint (bridges/avalanche/checkpoint.py)

    def __init__(self, progress: Progress, experience_index):
        super().__init__()
        self.progress, self.experience_index = progress, experience_index

    def before_training_epoch(self, strategy, **kwargs):
        self.progress.epoch(self.experience_index(strategy), strategy.clock.train_exp_epochs)
