"""`lifelong sweep`: configs × seeds through the flow, mean ± std written to Markdown and MLflow."""

import pytest

from lifelong.tracking import client_for

pytestmark = pytest.mark.integration


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
    # A second sweep replaces its section instead of appending another one.
    sweep_flow([str(cfg)], 1, [f'tracking.uri="{uri}"'], str(out))
    assert out.read_text().count("<!-- sweep:begin tiny -->") == 1
    client = client_for(uri)
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id],
                              "tags.`lifelong.flow` = 'sweep'")
    assert len(runs) == 2
    assert any(k.startswith("tiny/naive/avg_accuracy_mean") for k in runs[0].data.metrics)
