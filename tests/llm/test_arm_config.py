"""Arm settings: defaults, validation messages naming the bad key, fallback resolution."""

from __future__ import annotations

import pytest

from service.config import ConfigError, parse_config

TASKS = {"t": {"kind": "classification", "labels": ["yes", "no"]}}


def config(*arms: dict, **top):
    return parse_config({"tasks": TASKS, "arms": list(arms), **top})


def arm(name: str = "a", **extra) -> dict:
    return {"name": name, "provider": "openai", "model": "m", "base_url": "http://x/v1", **extra}


def test_defaults() -> None:
    cfg = config(arm())
    a = cfg.arm("a")
    assert (a.answer_mode, a.calibrate, a.api, a.constrain) == ("generate", False, "chat", "none")
    assert (a.timeout_seconds, a.max_retries, a.max_in_flight) == (60.0, 2, 16)
    assert (a.retry_backoff_seconds, a.retry_backoff_max_seconds) == (0.5, 8.0)
    assert (a.breaker_failures, a.breaker_cooldown_seconds, a.fallback) == (5, 30.0, None)
    assert (cfg.gateway.max_in_flight, cfg.gateway.fallback_arm) == (64, None)


@pytest.mark.parametrize(
    ("arms", "top", "message"),
    [
        ([arm(provider="anthropic", answer_mode="score")], {}, "arms.0: Value error, answer_mode"),
        ([arm(calibrate=True)], {}, "calibrate applies to answer_mode 'score' only"),
        ([arm(api_key_env="sk-live-abc")], {}, "NAME of an environment variable"),
        ([arm(fallback="nope")], {}, "fallback 'nope' is not an arm"),
        ([arm(fallback="a")], {}, "cannot be its own fallback"),
        ([arm()], {"gateway": {"fallback_arm": "zz"}}, "gateway.fallback_arm 'zz'"),
        ([arm(max_in_flight=0)], {}, "arms.0.max_in_flight"),
        ([arm(provider="azure")], {}, "arms.0.provider"),
        ([arm(answer_mode="vote")], {}, "arms.0.answer_mode"),
    ],
)
def test_invalid_arms_name_the_key(arms, top, message) -> None:
    with pytest.raises(ConfigError) as err:
        config(*arms, **top)
    assert message in str(err.value)


def test_a_key_value_is_never_echoed_in_the_error() -> None:
    with pytest.raises(ConfigError) as err:
        config(arm(api_key_env="sk-live-abc"))
    assert "sk-live-abc" not in str(err.value)


def test_fallback_resolution() -> None:
    cfg = config(arm("a", fallback="c"), arm("b"), arm("c"), gateway={"fallback_arm": "b"})
    assert cfg.fallback_for("a") == "c"  # the arm's own wins
    assert cfg.fallback_for("c") == "b"  # the default
    assert cfg.fallback_for("b") is None  # never itself


def test_score_mode_is_allowed_where_log_probabilities_exist() -> None:
    openai = config(arm(answer_mode="score", calibrate=True)).arm("a")
    assert (openai.answer_mode, openai.calibrate) == ("score", True)
    local = {"name": "l", "provider": "llamacpp", "model": "gemma-3-270m", "answer_mode": "score"}
    assert config(local).arm("l").answer_mode == "score"
