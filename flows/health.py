"""Reporting training health (``tasks/health.py``) the same way from every flow.

A probe's figures go to MLflow as ``health/*`` metrics at the probe's step. A problem is printed
as a warning line naming the learner, the experience and the figure, and recorded in the run's
tags (``lifelong.health`` = ``unhealthy``, ``lifelong.health.problems``: every problem so far),
so it survives a resumed run and ``lifelong results`` shows it. A run that ends with no problem
is tagged ``ok``. An unhealthy model is not registered: a model that stopped learning is a
failed run, not a candidate. ``training.health_check = "fail"`` also stops the run there.
"""

from __future__ import annotations

import sys

from mlflow import MlflowClient

from lifelong import tracking
from lifelong.tasks.health import Health

HEALTH_TAG = "lifelong.health"
PROBLEMS_TAG = "lifelong.health.problems"
_TAG_LIMIT = 5000  # MLflow keeps tag values up to 8,000 characters


class UnhealthyModel(RuntimeError):
    """``training.health_check = "fail"``: the model stopped learning; the run is marked failed."""


def report(client: MlflowClient, run_id: str, logger: tracking.MLflowLogger, label: str, health: Health,
           step: int, mode: str) -> list[str]:
    """Log ``health`` at ``step``; warn about and record its problems. Returns them."""
    if mode == "off":
        return []
    logger.log_values(health.metrics(), step)
    problems = health.problems
    if not problems:
        return []
    for problem in problems:
        print(f"[{label}] WARNING — model unhealthy at {problem}", file=sys.stderr, flush=True)
    previous = client.get_run(run_id).data.tags.get(PROBLEMS_TAG, "")
    text = "; ".join([*([previous] if previous else []), *problems])
    tracking.set_tags(client, run_id, {HEALTH_TAG: "unhealthy", PROBLEMS_TAG: text[-_TAG_LIMIT:]})
    if mode == "fail":
        logger.flush()
        raise UnhealthyModel(f"{label}: {'; '.join(problems)} (training.health_check = 'fail')")
    return problems


def conclude(client: MlflowClient, run_id: str, mode: str) -> bool:
    """Tag a run that had no problem ``ok``; return whether the run is healthy."""
    if mode == "off":
        return True
    tags = client.get_run(run_id).data.tags
    if HEALTH_TAG in tags:
        return tags[HEALTH_TAG] == "ok"
    tracking.set_tags(client, run_id, {HEALTH_TAG: "ok"})
    return True
