import pytest

from service.config import ConfigError, load_config, parse_config
from service.reward import labels_match, reward


def test_reward_is_correctness_minus_priced_cost():
    assert reward(True, 0.0, 0.5, 0.001) == 1.0
    assert reward(False, 0.0, 0.5, 0.001) == 0.0
    assert reward(True, 0.002, 0.5, 0.001) == pytest.approx(0.0)
    assert reward(False, 0.001, 0.1, 0.001) == pytest.approx(-0.1)
    with pytest.raises(ValueError):
        reward(True, 0.1, 0.1, 0.0)


def test_labels_match_ignores_case_and_space_only():
    assert labels_match("Positive", " positive ")
    assert not labels_match("positive", "negative")
    assert not labels_match(None, "positive")


GOOD = {
    "tasks": {"s": {"kind": "classification", "labels": ["a", "b"]}},
    "arms": [
        {
            "name": "m",
            "provider": "llamacpp",
            "model": "gemma-3-270m",
            "input_price_per_1m": 1.0,
            "output_price_per_1m": 2.0,
        }
    ],
}


def test_valid_config_and_arm_cost():
    config = parse_config(GOOD)
    assert config.arm_names == ["m"]
    assert config.arm("m").cost_usd(1_000_000, 500_000) == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda c: c["arms"][0].update(provider="nope"), "arms.0.provider"),
        (lambda c: c["arms"][0].update(input_price_per_1m=-1), "arms.0.input_price_per_1m"),
        (lambda c: c["arms"][0].update(context_tokens=8), "arms.0.context_tokens"),
        (lambda c: c["arms"][0].update(context_tokens="big"), "arms.0.context_tokens"),
        (lambda c: c["tasks"]["s"].update(kind="regression"), "tasks.s.kind"),
        (lambda c: c["tasks"]["s"].update(labels=["a"]), "tasks.s.labels"),
        (lambda c: c["tasks"]["s"].update(template="no placeholder"), "tasks.s.template"),
        (lambda c: c["arms"].append(dict(c["arms"][0])), "arms"),
        (lambda c: c["arms"][0].update(provider="replay"), "arms.0"),
        (lambda c: c.update(extra=1), "extra"),
        (lambda c: c.pop("tasks"), "tasks"),
    ],
)
def test_invalid_config_names_the_bad_key(mutate, key):
    import copy

    config = copy.deepcopy(GOOD)
    mutate(config)
    with pytest.raises(ConfigError) as info:
        parse_config(config, source="x.yaml")
    assert f"  {key}:" in str(info.value)


def test_unreadable_and_non_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize(
    "name", ["metallm.example.yaml", "metallm.cloud.example.yaml", "metallm.open.example.yaml"]
)
def test_example_configs_are_valid(name):
    from pathlib import Path

    config = load_config(Path(__file__).parents[2] / "config" / name)
    assert len(config.arms) >= 2 and config.tasks
    for arm in config.arms:  # every fallback names a configured arm
        assert arm.fallback is None or arm.fallback in config.arm_names
