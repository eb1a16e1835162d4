"""Continuing a registered version when new data lands (flows/continuation.py): the lineage grows
by the new files only, from the version's weights and continual state; bad input is refused
before any run is opened, and the registry is left as it was."""

import json
import shutil

import numpy as np
import pytest
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from lifelong import registry
from lifelong.config import load_config
from lifelong.flows.continual import run_continual
from lifelong.flows.continuation import ContinuationError, drift_test
from lifelong.tasks.data import DatasetError
from lifelong.tracking import client_for

pytestmark = pytest.mark.integration

#: The arrivals: three class-incremental experiences of the 8×8 digits.
CLASSES = ((0, 1, 2), (3, 4, 5), (6, 7, 8, 9))
NAME = "loop"
GATES = ["avg_accuracy >= champion - 0.5"]


def write_experiences(folder, which, classes=CLASSES, permute=False):
    d = load_digits()
    x, y = (d.data.reshape(-1, 8, 8) / 16).astype(np.float32), d.target
    folder.mkdir(parents=True, exist_ok=True)
    for i in which:
        m = np.isin(y, classes[i])
        xi = x[m]
        if permute:  # the same classes, their pixels shuffled: a drifted arrival
            xi = xi.reshape(len(xi), -1)[:, np.random.default_rng(0).permutation(64)].reshape(xi.shape)
        np.savez(folder / f"exp{i}.npz", x=xi, y=y[m])


def config(tmp, *extra, strategy='{name="replay", mem_size=60}'):
    return load_config(None, [
        'stream.name="folder"', f'stream.path="{tmp / "data"}"', "stream.n_classes=10",
        'model.name="mlp"', "model.hidden=32", "model.standardize_input=false",
        "training.epochs=1", 'training.health_check="off"', f"strategies=[{strategy}]",
        f'tracking.uri="sqlite:///{tmp / "mlruns.db"}"', "tracking.log_plots=false",
        f'tracking.model_name="{NAME}"', f"tracking.gates={json.dumps(GATES)}", *extra,
    ])


def versions(tmp):
    try:
        return [v.version for v in registry.lineage(f"sqlite:///{tmp / 'mlruns.db'}", NAME)]
    except registry.RegistryLookupError:
        return []


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """v1 learns two files; the third lands and v2 continues from v1. Beside it, one run that
    learns all three in one go."""
    tmp = tmp_path_factory.mktemp("loop")
    write_experiences(tmp / "data", [0, 1])
    first = run_continual(config(tmp))
    idle = run_continual(config(tmp, 'tracking.continue_from="champion"'))
    write_experiences(tmp / "data", [2])
    second = run_continual(config(tmp, 'tracking.continue_from="champion"'))
    whole = tmp_path_factory.mktemp("whole")
    shutil.copytree(tmp / "data", whole / "data")
    at_once = run_continual(config(whole))
    return tmp, first, idle, second, at_once


def test_nothing_new_opens_no_run_and_registers_nothing(grown):
    tmp, first, idle, *_ = grown
    assert idle.nothing_new and "nothing new to learn" in idle.nothing_new and not idle.results
    assert versions(tmp) == ["1", "2"]  # v2 is the continuation below, not the idle check


def test_the_continuation_learns_only_the_new_file_and_records_its_parent(grown):
    tmp, first, _, second, _ = grown
    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    v2 = registry.show(uri, f"{NAME}/2")
    fields = registry.lineage_fields(v2)
    assert fields["parent"] == "1"
    assert fields["experiences"] == ["exp0.npz", "exp1.npz", "exp2.npz"]
    # The first two rows are v1's, widened; only the new experience was trained.
    m1, m2 = first.results[0].matrix, second.results[0].matrix
    assert m2.shape == (3, 3)
    np.testing.assert_allclose(m2[:2, :2], m1)
    assert np.isnan(m2[:2, 2]).all()
    assert second.results[0].train_iterations > first.results[0].train_iterations
    assert "drift_p_value" in v2.metrics


def test_continuing_from_weights_and_state_equals_learning_the_whole_stream_at_once(grown):
    """The exact test of "weights *and* continual state": replay memory, optimizer, clock and RNG
    restored, the continuation's last row is the one-go run's."""
    *_, second, at_once = grown
    np.testing.assert_allclose(second.results[0].matrix[-1], at_once.results[0].matrix[-1], atol=1e-6)


def test_the_lineage_command_shows_the_chain(grown):
    from lifelong.cli.main import app

    tmp = grown[0]
    out = CliRunner().invoke(app, ["registry", "lineage", NAME, "--tracking-uri", f"sqlite:///{tmp / 'mlruns.db'}"])
    assert out.exit_code == 0, out.output
    assert "v2" in out.output and "v1" in out.output


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """A lineage's v1 on two files, trained once for the file; each test gets its own copy."""
    tmp = tmp_path_factory.mktemp("started")
    write_experiences(tmp / "data", [0, 1])
    run_continual(config(tmp))
    return tmp


def copy_of(started, tmp):
    """The lineage's data folder and MLflow store (its artifacts stay where they are, read only)."""
    shutil.copytree(started / "data", tmp / "data")
    shutil.copy(started / "mlruns.db", tmp / "mlruns.db")
    return tmp


@pytest.fixture
def lineage(started, tmp_path):
    return copy_of(started, tmp_path)


@pytest.mark.parametrize("extra, strategy, expected", [
    ((), '{name="naive"}', "strategy 'replay'"),
    (("model.hidden=64",), '{name="replay", mem_size=60}', "model.hidden is 32 there and 64"),
])
def test_a_config_that_does_not_fit_the_version_is_refused(lineage, extra, strategy, expected):
    write_experiences(lineage / "data", [2])
    with pytest.raises(ContinuationError, match=expected):
        run_continual(config(lineage, 'tracking.continue_from="champion"', *extra, strategy=strategy))
    assert versions(lineage) == ["1"]


def test_a_rewritten_experience_is_refused(lineage):
    write_experiences(lineage / "data", [2])
    write_experiences(lineage / "data", [0], classes=((0, 1),))
    with pytest.raises(ContinuationError, match="exp0.npz changed since it was learned"):
        run_continual(config(lineage, 'tracking.continue_from="champion"'))
    assert versions(lineage) == ["1"]


def test_a_new_file_that_does_not_fit_the_inputs_or_outputs_is_refused(lineage):
    np.savez(lineage / "data" / "exp2.npz", x=np.zeros((80, 4, 4), np.float32), y=np.arange(80) % 10)
    with pytest.raises(DatasetError, match="exp2.npz has inputs of shape"):
        run_continual(config(lineage, 'tracking.continue_from="champion"'))
    np.savez(lineage / "data" / "exp2.npz", x=np.zeros((96, 8, 8), np.float32), y=np.arange(96) % 12)
    with pytest.raises(DatasetError, match="exp2.npz has class id 11"):
        run_continual(config(lineage, 'tracking.continue_from="champion"'))
    assert versions(lineage) == ["1"]


def test_an_unknown_version_or_a_lineage_not_started_is_refused(tmp_path, lineage):
    write_experiences(lineage / "data", [2])
    with pytest.raises(ContinuationError, match="has no version 7"):
        run_continual(config(lineage, "tracking.continue_from=7"))
    write_experiences(tmp_path / "fresh" / "data", [0])
    with pytest.raises(ContinuationError, match="start the lineage with a run without continue_from"):
        run_continual(config(tmp_path / "fresh", 'tracking.continue_from="champion"'))
    with pytest.raises(ContinuationError, match="lifelong registry promote"):
        run_continual(config(lineage, 'tracking.continue_from="best"'))


@pytest.mark.parametrize("extra, expected", [
    (('strategies=[{name="naive"}, {name="replay"}]',), "exactly one"),
    (("tracking.register_model=false",), "register_model"),
    (('tracking.continue_from="champion@x"',), "an alias"),
])
def test_a_continuation_config_that_cannot_work_is_refused(tmp_path, extra, expected):
    with pytest.raises(ValueError, match=expected):
        config(tmp_path, 'tracking.continue_from="champion"', *extra)


def test_a_continuation_of_a_fixed_stream_is_refused():
    with pytest.raises(ValueError, match="new files of a folder stream"):
        load_config(None, ['tracking.continue_from="champion"'])


def test_a_drift_gate_without_a_continuation_is_refused(tmp_path):
    with pytest.raises(ValueError, match="drift is measured when a run continues"):
        config(tmp_path, f'tracking.gates={json.dumps(["drift_p_value >= 0.01"])}')


def test_a_drift_gate_holds_a_drifted_arrival_back(lineage):
    gate = f'tracking.gates={json.dumps(["drift_p_value >= 0.01"])}'
    write_experiences(lineage / "data", [2], classes=((0, 1, 2), (3, 4, 5), (0, 1, 2)), permute=True)
    result = run_continual(config(lineage, 'tracking.continue_from="champion"', gate))
    assert result.results
    uri = f"sqlite:///{lineage / 'mlruns.db'}"
    v2 = registry.show(uri, f"{NAME}/2")
    assert v2.metrics["drift_p_value"] < 0.01
    assert "champion" not in v2.aliases and "not promoted" in v2.promotion
    # The next check finds the refused try: it does not register the same refusal again.
    again = run_continual(config(lineage, 'tracking.continue_from="champion"', gate))
    assert again.nothing_new and "v2 already continued v1 on these files" in again.nothing_new
    assert versions(lineage) == ["1", "2"]


def test_an_interrupted_continuation_resumes_to_the_unbroken_one(started, tmp_path, monkeypatch):
    import lifelong.flows.continual as fc

    more = ((0, 1, 2), (3, 4, 5), (6, 7), (8, 9))
    last_rows = []
    for name, interrupt in (("unbroken", False), ("interrupted", True)):
        tmp = copy_of(started, tmp_path / name)
        write_experiences(tmp / "data", [2, 3], classes=more)
        cfg = config(tmp, 'tracking.continue_from="champion"')
        if not interrupt:
            last_rows.append(run_continual(cfg).results[0].matrix[-1])
            continue
        original = fc.train_experience

        def failing(learner, i):
            if i == 3:
                raise RuntimeError("power cut")
            return original.fn(learner, i)

        monkeypatch.setattr(fc, "train_experience", failing)
        with pytest.raises(RuntimeError, match="power cut"):
            run_continual(cfg)
        monkeypatch.setattr(fc, "train_experience", original)
        assert versions(tmp) == ["1"]  # nothing registered by the interrupted run
        client = client_for(cfg.tracking.uri)
        exp = client.get_experiment_by_name("lifelong").experiment_id
        parent = next(r.info.run_id for r in client.search_runs([exp], order_by=["attributes.start_time DESC"])
                      if "mlflow.parentRunId" not in r.data.tags)
        resumed = run_continual(cfg, resume=parent)
        last_rows.append(resumed.results[0].matrix[-1])
        assert versions(tmp) == ["1", "2"]
        assert registry.lineage_fields(registry.show(cfg.tracking.uri, f"{NAME}/2"))["parent"] == "1"
    np.testing.assert_allclose(last_rows[1], last_rows[0], atol=1e-6)


# --------------------------------------------------------------------------- the test itself


def test_the_drift_test_flags_a_shift_and_not_a_resample():
    rng = np.random.default_rng(0)
    old = rng.normal(size=(400, 16))
    assert drift_test(old, rng.normal(size=(400, 16)))["p_value"] > 0.05
    shifted = rng.normal(size=(400, 16))
    shifted[:, 3] += 0.5
    out = drift_test(old, shifted)
    assert out["p_value"] < 1e-4 and out["features_drifted"] == pytest.approx(1 / 16)


def test_the_drift_p_value_is_bonferroni_corrected_by_hand():
    from scipy.stats import ks_2samp

    rng = np.random.default_rng(1)
    old, new = rng.normal(size=(50, 3)), rng.normal(0.3, size=(60, 3))
    by_hand = min(1.0, 3 * min(ks_2samp(old[:, j], new[:, j]).pvalue for j in range(3)))
    assert drift_test(old, new)["p_value"] == pytest.approx(by_hand)
