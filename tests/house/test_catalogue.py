"""One registration: a new regulariser is one file in strategies/regularizers/ plus one catalogue
entry, and the config, ``lifelong strategies``, the refusal rules, the plugin and checkpointing
all take it from there.

The proof adds a toy regulariser through exactly those two places, in a copy of the project laid
out as the installed wheel is (``lifelong/`` with ``strategies/``, ``bridges/``, ... inside), and
runs it in a fresh process that imports that copy.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from lifelong import catalogue

ROOT = Path(__file__).resolve().parents[2]

TOY = '''\
"""A toy regulariser: weight * sum of squared parameters; counts its consolidations."""

import torch


class Toy:
    def __init__(self, weight: float, n_classes: int):
        self.weight, self.n_classes = weight, n_classes
        self.calls = 0
        self.consolidated = torch.zeros(())

    def before_experience(self, model, classes):
        pass

    def penalty(self, model, x, y, out, features):
        self.calls += 1
        return self.weight * sum((p ** 2).sum() for p in model.parameters())

    def after_update(self, model):
        pass

    def after_experience(self, model, batches):
        self.consolidated += 1

    def state_dict(self):
        return {"consolidated": self.consolidated.clone()}

    def load_state_dict(self, state):
        self.consolidated = state["consolidated"].clone()
'''

SPEC = '''\
class ToySpec(Section):
    name: Literal["toy"]
    weight: float = Field(0.5, ge=0)


'''

ENTRY = '''\
    Component("toy", "regularizer", "a toy: weight * sum of squared parameters", "a test, 2026",
              "strategies/regularizers/toy.py", spec=ToySpec, build="lifelong.strategies.regularizers.toy:Toy",
              sample_dp_refusal="the toy reads the data"),
'''

SCRIPT = '''\
import json, sys
import torch
from avalanche.training.plugins import EvaluationPlugin
from lifelong.bridges.avalanche.checkpoint import learner_state
from lifelong.bridges.avalanche.learners import build_learner, quiet_avalanche_deprecations
from lifelong.bridges.avalanche.plugin import RegularizerPlugin
from lifelong.config import ConfigError, load_config
from lifelong.tasks.models import build_model
from lifelong.tasks.streams import build_stream

out = {"where": __import__("lifelong.strategies.regularizers.toy").__file__}
cfg = load_config(None, ['strategies=[{name="naive", plugins=[{name="toy", weight=0.25}]}]',
                         "stream.n_experiences=2", "training.epochs=1"])
stream = build_stream(cfg.stream, cfg.seed)
model = build_model(cfg.model, stream.input_shape, stream.n_classes, multi_head=False)
learner = build_learner(cfg.strategies[0], model, cfg.training, [], EvaluationPlugin(loggers=[]),
                        stream.n_classes, cfg.seed)
plugin = next(p for p in learner.plugins if isinstance(p, RegularizerPlugin))
toy = plugin.regularizer
with quiet_avalanche_deprecations():
    for exp in stream.train_stream:
        learner.train(exp)
out["built"] = [type(toy).__name__, toy.weight, toy.n_classes, plugin.name]
out["penalty_calls"] = toy.calls
out["checkpoint"] = [float(s["consolidated"]) for s in learner_state(learner)["regularizers"]]
for overrides in (['strategies=[{name="naive", plugins=[{name="toy", wieght=1.0}]}]'],
                  ['strategies=[{name="naive", plugins=[{name="toy"}]}]', "privacy.sample={noise_multiplier=1.0}"],
                  ['strategies=[{name="toy"}]']):
    try:
        load_config(None, overrides)
        out.setdefault("refusals", []).append(None)
    except ConfigError as exc:
        out.setdefault("refusals", []).append(str(exc))
print(json.dumps(out))
'''


def wheel_layout(dest: Path) -> Path:
    """The project's sources as the wheel installs them: ``lifelong/<folder>/`` for each mapped folder."""
    mapped = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package, folder in sorted(mapped.items(), key=lambda kv: kv[0].count(".")):
        shutil.copytree(ROOT / folder, dest / Path(*package.split(".")), ignore=ignore, dirs_exist_ok=True)
    return dest


@pytest.mark.integration
def test_a_new_regulariser_is_one_file_and_one_catalogue_entry(tmp_path):
    site = wheel_layout(tmp_path / "site")
    # 1. the one file
    (site / "lifelong/strategies/regularizers/toy.py").write_text(TOY)
    # 2. the one catalogue entry (its spec beside it)
    cat = site / "lifelong/catalogue.py"
    text = cat.read_text()
    anchor = "REGULARIZERS: list[Component] = [\n"
    assert text.count(anchor) == 1
    cat.write_text(text.replace(anchor, SPEC + anchor + ENTRY))

    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           "LIFELONG_HOME": str(tmp_path / "home")}
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    import json

    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["where"].startswith(str(site)), "the copy, not the checkout, was imported"
    assert out["built"] == ["Toy", 0.25, 10, "toy"]  # spec values by name, n_classes from the context
    assert out["penalty_calls"] > 0  # the plugin added its penalty to the loss
    assert out["checkpoint"] == [2.0]  # consolidated after each experience, and checkpointed
    unknown_key, under_sample_dp, as_strategy = out["refusals"]
    assert "strategies.0.plugins.0.wieght: unknown key; allowed keys here: name, weight" in unknown_key
    assert "toy cannot be combined with sample-level DP: the toy reads the data" in under_sample_dp
    assert "'toy' is a regulariser: add it to a strategy's plugins" in as_strategy

    listed = subprocess.run([sys.executable, "-m", "lifelong.cli", "strategies"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert any(line.split()[:2] == ["toy", "regularizer"] for line in listed.stdout.splitlines())
    assert "paper: a test, 2026" in listed.stdout


def test_every_component_has_a_unique_name_a_paper_and_an_implementation():
    names = catalogue.names()
    assert len(names) == len(set(names)), "a name must say which component it is, whatever its kind"
    for c in catalogue.catalogue():
        assert c.summary and c.paper and c.implementation, c.name
        if c.kind in ("strategy", "regularizer"):
            assert c.spec is not None and c.spec.model_fields["name"].annotation.__args__ == (c.name,), c.name
        if c.kind == "regularizer":
            assert callable(catalogue.target(c)), c.name


def test_each_regulariser_is_built_from_its_spec_by_the_catalogue():
    for c in catalogue.of_kind("regularizer"):
        built = catalogue.build(c.spec(name=c.name), n_classes=10)
        assert catalogue.entry_of(built) is c
    assert catalogue.entry_of(object()) is None


def test_a_constructor_that_does_not_take_a_spec_key_is_named():
    class Spec(catalogue.Section):
        name: str
        strength: float = 1.0

    entry = catalogue.Component("l2", "regularizer", "s", "p", "i", spec=Spec,
                                build="lifelong.strategies.regularizers.l2:L2")
    original = catalogue.REGULARIZERS[:]
    catalogue.REGULARIZERS.insert(0, entry)
    try:
        with pytest.raises(TypeError, match="L2 takes no strength"):
            catalogue.build(Spec(name="l2"))
    finally:
        catalogue.REGULARIZERS[:] = original


def test_the_catalogue_names_what_the_algorithms_implement():
    """The names a config may give are the ones the code can run (no entry without an
    implementation, no implementation a config cannot reach)."""
    from lifelong.privacy.clipping import MODES
    from lifelong.strategies.federated.server_optimizers import OPTIMIZERS

    assert catalogue.names("server_optimizer") == list(OPTIMIZERS)
    assert catalogue.names("clipping") == list(MODES)
