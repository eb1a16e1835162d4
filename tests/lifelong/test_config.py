"""Config validation: every mistake is refused before any work, naming the key and what it accepts."""

import pytest

from lifelong.config import ConfigError, apply_override, load_config, validate_config


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_are_valid_and_flatten():
    cfg = load_config(None)
    flat = cfg.flat()
    assert flat["stream.name"] == "split_digits"
    assert flat["strategies.0.name"] == "naive"


def test_shipped_configs_are_valid():
    from pathlib import Path

    configs = sorted(Path(__file__).parents[2].joinpath("configs").glob("*.toml"))
    assert configs, "configs/ ships example configs"
    for path in configs:
        load_config(path)


def test_unknown_key_names_key_and_allowed_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "[training]\nepochz = 3\n"))
    msg = str(e.value)
    assert "training.epochz" in msg and "unknown key" in msg and "epochs" in msg


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(ConfigError, match=r"trainng: unknown key; allowed keys here: .*training"):
        load_config(write(tmp_path, "[trainng]\nepochs = 3\n"))


def test_unknown_strategy_lists_the_allowed_ones(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, '[[strategies]]\nname = "ewcc"\n'))
    msg = str(e.value)
    assert "strategies.0" in msg and "'ewcc'" in msg
    for name in ("naive", "replay", "joint"):
        assert name in msg


def test_unknown_key_inside_a_strategy(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, '[[strategies]]\nname = "replay"\nmemsize = 10\n'))
    msg = str(e.value)
    assert "strategies.0.memsize" in msg and "mem_size" in msg


def test_wrong_type_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"training.batch_size: .*integer"):
        load_config(write(tmp_path, '[training]\nbatch_size = "big"\n'))


def test_impossible_class_split_is_refused_with_the_possible_values():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["stream.n_experiences=7"])
    msg = str(e.value)
    assert "stream.n_experiences" in msg and "7" in msg and "10 classes" in msg and "[1, 2, 5, 10]" in msg


def test_scenario_must_fit_the_stream():
    with pytest.raises(ConfigError, match=r"stream.scenario: 'permuted_digits' can be 'domain'"):
        load_config(None, ['stream.name="permuted_digits"', 'stream.scenario="class"'])


def test_npz_needs_a_path():
    with pytest.raises(ConfigError, match=r"stream.path"):
        load_config(None, ['stream.name="npz"'])


def test_out_of_range_value():
    with pytest.raises(ConfigError, match=r"stream.test_fraction"):
        load_config(None, ["stream.test_fraction=1.5"])


def test_duplicate_strategy_labels_are_refused(tmp_path):
    text = '[[strategies]]\nname = "naive"\n[[strategies]]\nname = "naive"\n'
    with pytest.raises(ConfigError, match="labels must be unique"):
        load_config(write(tmp_path, text))
    text += 'label = "naive-2"\n'
    assert len(load_config(write(tmp_path, text)).strategies) == 2


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[stream\n"))


def test_overrides_parse_toml_values_and_address_list_items(tmp_path):
    path = write(tmp_path, '[[strategies]]\nname = "naive"\n[[strategies]]\nname = "replay"\n')
    cfg = load_config(path, ["training.epochs=3", "strategies.1.mem_size=50", "training.lr=0.5",
                             'model.name="mlp"'])
    assert cfg.training.epochs == 3 and cfg.training.lr == 0.5 and cfg.model.name == "mlp"
    assert cfg.strategies[1].mem_size == 50


def test_bad_overrides():
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_override({}, "training.epochs")
    with pytest.raises(ConfigError, match="not an index"):
        apply_override({"strategies": [{}]}, "strategies.3.name=x")


def test_validate_config_accepts_a_dict():
    cfg = validate_config({"seed": 3, "strategies": [{"name": "replay", "mem_size": 10}]})
    assert cfg.seed == 3 and cfg.strategies[0].mem_size == 10


@pytest.mark.parametrize("extra, message", [
    (['strategies=[{name="naive", plugins=[{name="ewc"}]}]'], "ewc cannot be combined with sample-level DP"),
    (['strategies=[{name="replay"}]'], "replay cannot be combined with sample-level DP"),
    (['flow="federated"', 'strategies=[{name="replay"}]'], "replay cannot be combined with sample-level DP"),
    (['flow="multitask"'], "sample-level DP is for the continual and federated flows"),
    (['privacy.sample.grad_sample_mode="ghost"', 'privacy.sample.clipping="per_layer"'], "ghost clipping supports"),
])
def test_sample_dp_refuses_what_would_break_the_guarantee(extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["privacy.sample={noise_multiplier=1.0}", *extra])


def test_user_level_dp_is_for_federated_runs():
    with pytest.raises(ConfigError, match="user-level DP is for federated runs"):
        load_config(None, ['privacy.clipping="flat"', "privacy.noise_multiplier=1.0"])


def test_a_federated_run_takes_a_task_stream():
    cfg = load_config(None, ['flow="federated"', 'stream.scenario="task"'])
    assert cfg.stream.resolved_scenario == "task"


@pytest.mark.parametrize("flow", ["continual", "federated"])
@pytest.mark.parametrize("extra, message", [
    (['strategies=[{name="naive", plugins=[{name="center_loss"}]}]'], "center_loss needs a single-head classifier"),
    (["pretrain.epochs=1", "stream.holdout_fraction=0.2"], "pretraining is for single-head models"),
    (["privacy.sample={noise_multiplier=1.0}"], "sample-level DP needs a single-head model"),
])
def test_a_task_stream_refuses_what_needs_a_single_head(flow, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f'flow="{flow}"', 'stream.scenario="task"', *extra])


def test_federated_oneprompt_is_accepted_with_user_level_dp_but_not_sample_level():
    base = ['flow="federated"', 'model.name="vit"', 'strategies=[{name="oneprompt"}]']
    assert load_config(None, base).strategies[0].name == "oneprompt"
    private = load_config(None, [*base, 'privacy.clipping="per_layer"', "privacy.noise_multiplier=1.0"])
    assert private.strategies[0].name == "oneprompt" and private.privacy.clipping == "per_layer"
    with pytest.raises(ConfigError, match="oneprompt cannot be combined with sample-level DP"):
        load_config(None, [*base, "privacy.sample={noise_multiplier=1.0}"])
