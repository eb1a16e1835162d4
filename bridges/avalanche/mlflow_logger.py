"""Avalanche's evaluation logging into MLflow: an Avalanche ``BaseLogger`` (Avalanche ships none
for MLflow) over the pipeline's batched ``lifelong.tracking.MLflowLogger``.

``EvaluationPlugin(..., loggers=[AvalancheMLflowLogger(tracking.MLflowLogger(run_id))])``: every
value Avalanche's metrics emit is buffered (``x_plot`` becomes the MLflow step) and sent with
``log_batch`` at the end of each experience, of evaluation and of training.
"""

from __future__ import annotations

from typing import Any

from avalanche.logging import BaseLogger

from lifelong.tracking import MLflowLogger


class AvalancheMLflowLogger(BaseLogger):
    def __init__(self, logger: MLflowLogger):
        super().__init__()
        self.logger = logger

    def log_single_metric(self, name: str, value: Any, x_plot: int) -> None:
        self.logger.log_single_metric(name, value, x_plot)

    # Avalanche calls these hooks on loggers: flush at natural boundaries.
    def after_training_exp(self, strategy, metric_values=None, **kwargs):
        self.logger.flush()

    def after_eval(self, strategy, metric_values=None, **kwargs):
        self.logger.flush()

    def after_training(self, strategy, metric_values=None, **kwargs):
        self.logger.flush()
