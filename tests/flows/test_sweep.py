"""`lifelong sweep`: configs × seeds through the flow, mean ± std written to Markdown and MLflow."""

import pytest

from lifelong.tracking import client_for

pytestmark = pytest.mark.integration


def parents(client, experiment_id: str) -> list:
    """The continual pipelines' parent runs (one per config × seed) of an experiment."""
    runs = client.search_runs([experiment_id], "tags.`lifelong.flow` = 'continual'")
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags]


def test_sweep_writes_mean_and_std_per_strategy(tmp_path):
    from lifelong.flows.sweep import sweep_flow

    uri = f"sqlite:///{tmp_path / 'sweep.db'}"
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(
        "# A tiny sweep\n[stream]\nn_experiences = 2\n[model]\nname = \"mlp\"\nhidden = 16\n"
        "[training]\nepochs = 1\neval_every = 5\n[tracking]\nlog_model = false\nlog_plots = false\n"
        "[[strategies]]\nname = \"naive\"\n[[strategies]]\nname = \"replay\"\nmem_size = 20\n"
    )
    out = tmp_path / "results.md"
    out.write_text("# Results\n\nkept text\n")
    tables = sweep_flow([str(cfg)], 2, [f'tracking.uri="{uri}"'], str(out))
    (t,) = tables
    assert t.title == "A tiny sweep" and len(t.run_ids) == 2
    assert set(t.values) == {"naive", "replay"}
    assert len(t.values["naive"]["avg_accuracy"]) == 2
    text = out.read_text()
    assert "kept text" in text and "<!-- sweep:begin tiny -->" in text
    assert "| naive |" in text and "±" in text
    assert t.costs["naive"]["updates"][0] > 0 and len(t.costs["replay"]["wall_s"]) == 2
    client = client_for(uri)
    sweep_exp = client.get_experiment_by_name("sweep").experiment_id
    assert len(parents(client, sweep_exp)) == 2
    # A second sweep of the same cells reads them back (resumes cell by cell) and replaces its
    # section instead of appending another one.
    again = sweep_flow([str(cfg)], 2, [f'tracking.uri="{uri}"'], str(out))[0]
    assert again.values == t.values
    assert len(parents(client, sweep_exp)) == 2  # nothing ran again
    assert out.read_text().count("<!-- sweep:begin tiny -->") == 1
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id],
                              "tags.`lifelong.flow` = 'sweep'")
    assert len(runs) == 2
    assert any(k.startswith("tiny/naive/avg_accuracy_mean") for k in runs[0].data.metrics)


PROTOCOL_SWEEP = """# A tiny protocol sweep
[stream]
n_experiences = 2
[model]
name = "mlp"
hidden = 16
[training]
epochs = 1
eval_every = 0
[tracking]
log_model = false
log_plots = false
[[strategies]]
name = "naive"
[[strategies]]
name = "replay"
mem_size = 20
[protocol]
validation_fraction = 0.2
[[protocol.tune]]
key = "strategies.1.mem_size"
grid = [2, 40]
[[protocol.claims]]
claim = "replay beats fine-tuning"
better = "replay"
baseline = "naive"
"""


def test_protocol_tunes_on_validation_and_judges_claims_by_the_rule(tmp_path):
    from lifelong.flows.sweep import sweep_flow

    uri = f"sqlite:///{tmp_path / 'sweep.db'}"
    cfg = tmp_path / "proto.toml"
    cfg.write_text(PROTOCOL_SWEEP)
    out = tmp_path / "results.md"
    (t,) = sweep_flow([str(cfg)], 2, [f'tracking.uri="{uri}"'], str(out))
    (tuned,) = t.tuning
    assert tuned.key == "strategies.1.mem_size" and set(tuned.scores) == {"2", "40"}
    assert tuned.chosen == max(tuned.scores, key=tuned.scores.get)
    # the tuning runs trained one strategy on the validation split, in their own experiment
    client = client_for(uri)
    tuning = parents(client, client.get_experiment_by_name("sweep-tuning").experiment_id)
    assert len(tuning) == 2 and all(r.data.params["stream.validation_fraction"] == "0.2" for r in tuning)
    assert all(r.data.params["strategies.0.name"] == "replay" for r in tuning)
    # the reported runs use the chosen value and the test split
    reported = parents(client, client.get_experiment_by_name("sweep").experiment_id)
    assert {r.data.params["strategies.1.mem_size"] for r in reported} == {tuned.chosen}
    assert {r.data.params["stream.validation_fraction"] for r in reported} == {"0.0"}
    ((claim, difference, verdict),) = t.verdicts
    assert difference.count("[") == 1  # mean [95% interval]
    assert claim.better == "replay" and verdict in ("reproduced", "not shown at this scale", "contradicted")
    text = out.read_text()
    assert "Chosen on validation data: `strategies.1.mem_size`" in text and f"**{verdict}**" in text
    assert "[" in t.cell("naive", "avg_accuracy")  # the 95% interval


@pytest.mark.parametrize("edit, seeds, message", [
    (lambda s: s, 1, "--seeds: 1 seed(s) give no interval"),
    (lambda s: s.replace("grid = [2, 40]", "grid = []"), 2, "the grid is empty"),
    (lambda s: s.replace("validation_fraction = 0.2", "validation_fraction = 0.0"), 2,
     "protocol.validation_fraction: must be in (0, 1)"),
    (lambda s: s.replace("validation_fraction = 0.2", "validation_fraction = 0.0005"), 2,
     "stream.validation_fraction: 0.0005 of the training split leaves class"),
    (lambda s: s.replace('baseline = "naive"', 'baseline = "naiv"'), 2, "no row 'naiv' in this sweep"),
    (lambda s: s.replace('key = "strategies.1.mem_size"', 'key = "strategies.1.mem_sise"'), 2, "mem_sise"),
    (lambda s: s.replace('key = "strategies.1.mem_size"', 'key = "training.lr"'), 2,
     "must name one strategy's key"),
])
def test_bad_protocol_input_is_refused_before_any_training(tmp_path, edit, seeds, message):
    from typer.testing import CliRunner

    from lifelong.cli.main import app as cli

    uri = f"sqlite:///{tmp_path / 'sweep.db'}"
    cfg = tmp_path / "proto.toml"
    cfg.write_text(edit(PROTOCOL_SWEEP))
    res = CliRunner().invoke(cli, ["sweep", str(cfg), "--seeds", str(seeds), "--set", f'tracking.uri="{uri}"',
                                   "--out", str(tmp_path / "r.md")])
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "sweep.db").exists() or client_for(uri).search_experiments(
        filter_string="name = 'sweep-tuning'") == []
