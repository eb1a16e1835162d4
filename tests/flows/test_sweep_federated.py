"""`lifelong sweep` over variants of one config: federated DP rows (no DP, clipped + noised),
epsilon, the ledger's per-client spread, noise multiplier and noise per coordinate in the table, the accuracy-vs-epsilon plot in MLflow."""

import pytest
from typer.testing import CliRunner

from lifelong.cli.main import app as cli
from lifelong.config import ConfigError
from lifelong.flows.sweep import _toml_value, read_variants, sweep_flow, variant_configs
from lifelong.tracking import client_for, metric_key

TINY = """# A tiny federated DP sweep
flow = "federated"
[stream]
n_experiences = 2
[model]
name = "mlp"
hidden = 16
[training]
epochs = 1
optimizer = "adam"
lr = 0.01
[federated]
clients = 2
rounds = 1
[[strategies]]
name = "replay"
mem_size = 20
[tracking]
log_model = false
log_plots = false
"""

VARIANTS = """
[[variants]]
label = "no DP"
set = { "privacy.clipping" = "off" }

[[variants]]
label = "flat z=1"
set = { "privacy.clipping" = "flat", "privacy.clip" = 0.5, "privacy.noise_multiplier" = 1.0 }
"""


def write(tmp_path, text, name="tiny_fed.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_variants_are_applied_as_overrides_with_their_labels(tmp_path):
    path = write(tmp_path, TINY + VARIANTS)
    (off, off_cfg), (flat, flat_cfg) = variant_configs(path, ["federated.rounds=3"], ["seed=7"])
    assert (off.label, flat.label) == ("no DP", "flat z=1")
    assert flat.overrides == ('privacy.clipping="flat"', "privacy.clip=0.5", "privacy.noise_multiplier=1.0")
    assert off_cfg.privacy.clipping == "off" and off_cfg.privacy.noise_multiplier is None
    assert (flat_cfg.privacy.clipping, flat_cfg.privacy.clip, flat_cfg.privacy.noise_multiplier) == ("flat", 0.5, 1.0)
    # The sweep's --set and the seed reach every variant; the rest of the file is untouched.
    assert {c.federated.rounds for c in (off_cfg, flat_cfg)} == {3}
    assert {c.seed for c in (off_cfg, flat_cfg)} == {7}
    assert flat_cfg.model.hidden == 16 and flat_cfg.flow == "federated"


def test_a_config_without_variants_is_one_unlabelled_row(tmp_path):
    ((v, cfg),) = variant_configs(write(tmp_path, TINY))
    assert v.label is None and v.overrides == () and cfg.federated.clients == 2


def test_override_values_are_written_as_toml():
    assert [_toml_value(v) for v in ("a\"b", 1, 2.5, 1e-6, True, [1, "x"])] == [
        '"a\\"b"', "1", "2.5", "1e-06", "true", '[1, "x"]']


@pytest.mark.parametrize("variants, message", [
    ('[[variants]]\nlabel = "x"\nset = { "privacy.clippng" = "flat" }\n',
     ["variant 'x'", "privacy.clippng", "unknown key", "allowed keys here"]),
    ('[[variants]]\nlabel = "x"\nsett = { "privacy.clipping" = "flat" }\n', ["variants[0]", "'sett'"]),
    ('[[variants]]\nset = { "privacy.clipping" = "flat" }\n', ["variants[0]", "'label'"]),
    ('[[variants]]\nlabel = "x"\n[[variants]]\nlabel = "x"\n', ["variants[1]", "'x' is used twice"]),
    ('[[variants]]\nlabel = "x"\nset = { "privacy.clipping" = "flat" }\n',  # neither z nor target epsilon
     ["variant 'x'", "exactly one of noise_multiplier and target_epsilon"]),
])
def test_a_bad_variant_is_refused_before_any_run(tmp_path, variants, message):
    uri = f"sqlite:///{tmp_path / 'sweep.db'}"
    good = write(tmp_path, TINY + VARIANTS, "good.toml")
    bad = write(tmp_path, TINY + variants, "bad.toml")
    with pytest.raises(ConfigError) as err:
        sweep_flow([str(good), str(bad)], 2, [f'tracking.uri="{uri}"'], None)  # the good one runs first
    assert all(m in str(err.value) for m in message), str(err.value)
    assert client_for(uri).search_experiments(filter_string="name = 'sweep'") == []  # nothing ran
    # The CLI says the same, as a one-line error, and exits 2.
    res = CliRunner().invoke(cli, ["sweep", str(good), str(bad), "--seeds", "2", "--set", f'tracking.uri="{uri}"'])
    assert res.exit_code == 2 and message[0] in res.output


def test_read_variants_refuses_a_table_instead_of_an_array(tmp_path):
    with pytest.raises(ConfigError, match="non-empty array of tables"):
        read_variants({"label": "x"}, tmp_path / "c.toml")


@pytest.mark.integration
def test_tiny_federated_sweep_fills_epsilon_and_logs_the_plot(tmp_path):
    uri = f"sqlite:///{tmp_path / 'sweep.db'}"
    path = write(tmp_path, TINY + VARIANTS)
    out = tmp_path / "results.md"
    (t,) = sweep_flow([str(path)], 2, [f'tracking.uri="{uri}"'], str(out))
    assert list(t.values) == ["no DP", "flat z=1"] and len(t.run_ids) == 4  # 2 variants × 2 seeds
    assert t.clipping == {"no DP": "off", "flat z=1": "flat"}
    assert t.cell("no DP", "epsilon") == "n/a" and t.cell("no DP", "noise_multiplier") == "n/a"
    assert t.values["flat z=1"]["noise_multiplier"] == [1.0, 1.0]
    assert t.costs["flat z=1"]["updates"] == [2, 2]  # 2 experiences × 1 round, each seed
    client = client_for(uri)
    # The table's epsilon is the DP run's own last logged privacy/epsilon.
    dp_run = t.run_ids[1]
    logged = client.get_metric_history(dp_run, "privacy/epsilon")
    assert len(logged) == 2 and t.values["flat z=1"]["epsilon"][0] == max(m.value for m in logged)
    assert 0 < t.values["flat z=1"]["epsilon"][0] < float("inf")
    # Beside it, the ledger's per-client spread as the run logged it after its last round, and the
    # noise per coordinate of the averaged update, z·C/S: 1 × 0.5 / 2 clients (fraction 1).
    for col, key in (("client_eps_p50", "privacy/client_epsilon_p50"), ("client_eps_max", "privacy/client_epsilon_max")):
        assert t.values["flat z=1"][col][0] == client.get_run(dp_run).data.metrics[key] > 0
    assert t.values["flat z=1"]["noise_std"] == [0.25, 0.25] and t.cell("flat z=1", "noise_std") == "0.25"
    assert t.cell("no DP", "client_eps_max") == "n/a"
    text = out.read_text()
    assert ("| variant | avg_accuracy | avg_forgetting | epsilon | client_eps_p50 | client_eps_max | noise_multiplier "
            "| noise_std | updates | wall (s) |") in text
    assert f"| flat z=1 | {t.cell('flat z=1', 'avg_accuracy')} | " in text
    assert "tiny_fed_accuracy_vs_epsilon.png" in text and "4 runs in" in text
    (sweep_run,) = client.search_runs([client.get_experiment_by_name("sweep").experiment_id],
                                      "tags.`lifelong.flow` = 'sweep'")
    assert {a.path for a in client.list_artifacts(sweep_run.info.run_id)} >= {
        "sweep_results.md", "tiny_fed_accuracy_vs_epsilon.png"}
    key = metric_key("tiny_fed/flat z=1/epsilon_mean")  # MLflow's names have no "="
    assert sweep_run.data.metrics[key] == pytest.approx(t.values["flat z=1"]["epsilon"][0])
