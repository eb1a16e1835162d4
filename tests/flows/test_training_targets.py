"""Issue 18's targets: the shipped defaults train on 28×28 images, in both flows.

The generated ``split_digits28`` stream is hard enough to show the failures these guard against:
before the fix, the default CNN predicted one class of the experience it had just trained on
(0.49–0.50 on two classes) in the continual flow at 3 epochs, and a federated run with the
shipped client optimiser sat at 0.50 on every experience (docs/results.md, "Defaults that train").

- Continual, the shipped model and optimiser (configs/default.toml) at 3 epochs: every
  experience's accuracy right after it is trained is ≥ 0.9 × what joint training reaches on
  that experience's classes, and the health check finds nothing.
- Federated, configs/federated.toml's clients and optimiser, Dirichlet 0.5, 10 clients:
  at a small budget (3 rounds × 1 local epoch) the default model ends no worse than the MLP
  (a tolerance of 0.03 for one seed), and neither run is reported unhealthy.
"""

from pathlib import Path

import numpy as np
import pytest

from lifelong.config import load_config
from lifelong.flows.continual import continual_flow
from lifelong.flows.federated import run_federated
from lifelong.flows.health import HEALTH_TAG, PROBLEMS_TAG
from lifelong.tracking import client_for

pytestmark = [pytest.mark.integration, pytest.mark.heavy]

CONFIGS = Path(__file__).parents[2] / "configs"


def _tracking(tmp_path, experiment: str) -> list[str]:
    return [f'tracking.uri="sqlite:///{tmp_path / "mlruns.db"}"', f'tracking.experiment="{experiment}"',
            "tracking.log_model=false", "tracking.log_plots=false"]


def _health(uri: str, run_id: str) -> tuple[str, str]:
    tags = client_for(uri).get_run(run_id).data.tags
    return tags.get(HEALTH_TAG, ""), tags.get(PROBLEMS_TAG, "")


def test_continual_defaults_learn_every_experience_of_the_28x28_stream(tmp_path):
    cfg = load_config(CONFIGS / "default.toml", [
        'stream.name="split_digits28"', "training.epochs=3", "training.eval_every=0",
        'strategies=[{name="naive"}, {name="joint"}]', *_tracking(tmp_path, "targets"),
    ])
    assert cfg.model.name == "cnn" and cfg.training.optimizer == "adam"  # the shipped defaults
    result = continual_flow(cfg)
    naive, joint = result.results
    just_trained = np.diag(naive.matrix)
    reference = joint.matrix[-1]
    assert (just_trained >= 0.9 * reference).all(), (just_trained.round(3), reference.round(3))
    assert _health(result.tracking_uri, naive.run_id) == ("ok", "")
    assert _health(result.tracking_uri, joint.run_id) == ("ok", "")


# Dirichlet 0.5 only: the label-skewed case, where the old defaults failed first. The IID case
# (the same check, 76 s on a busy 2-core worker) was dropped when the suite neared its 15-minute
# limit; docs/federated.md, "Client optimiser", keeps its measured figures.
@pytest.mark.parametrize("partition", ["dirichlet"])
def test_federated_default_model_is_no_worse_than_the_mlp_at_a_small_budget(tmp_path, partition):
    final, health = {}, {}
    for model in ("cnn", "mlp"):
        cfg = load_config(CONFIGS / "federated.toml", [
            'stream.name="split_digits28"', f'model.name="{model}"', "federated.rounds=3", "training.epochs=1",
            f'federated.partition="{partition}"', "federated.alpha=0.5", *_tracking(tmp_path, f"fed-{model}"),
        ])
        result = run_federated(cfg)
        final[model] = result.summary["avg_accuracy"]
        health[model] = _health(cfg.tracking.uri, result.run_id)
    assert final["cnn"] >= final["mlp"] - 0.03, final
    assert health == {"cnn": ("ok", ""), "mlp": ("ok", "")}
