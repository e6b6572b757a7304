"""The contract every policy meets, checked for every ``make_policy`` name."""

from __future__ import annotations

import numpy as np
import pytest
from river import bandit

from service.policy import POLICIES, Choice, RoutingPolicy, loads, make_policy
from service.policy.checkpoint import POLICIES as REGISTRY

D = 6
ARMS = ["a", "b", "c"]
PARAMS: dict[str, dict] = {
    "linucb": {"epsilon": 0.1},
    "lin_ts": {"epsilon": 0.1, "n_samples": 64},
    "hybrid_linucb": {"epsilon": 0.1},
    "eps_greedy": {"epsilon": 0.1},
    "softmax": {"epsilon": 0.1, "temperature": 0.5},
    "ucb": {"epsilon": 0.1},
    "thompson": {"epsilon": 0.1, "n_samples": 64},
    "correctness_ucb": {"epsilon": 0.1},
    "arm_means": {"epsilon": 0.1},
    "auto": {"epsilon": 0.1},
}
NAMES = sorted(POLICIES)


def _policy(name: str, seed: int = 0) -> RoutingPolicy:
    return make_policy(name, seed=seed, **PARAMS[name])


def _play(policy: RoutingPolicy, n: int, seed: int = 1, arms=ARMS) -> list[str]:
    """Bandit loop on a synthetic problem where arm ``a`` is best when x[0] > 0."""
    rng = np.random.default_rng(seed)
    picked = []
    for _ in range(n):
        x = rng.normal(size=D)
        choice = policy.choose(arms, x)
        reward = float(choice.arm == ("a" if x[0] > 0 else "b")) + 0.1 * rng.normal()
        policy.update(choice.arm, x, reward)
        picked.append(choice.arm)
    return picked


def _check_distribution(choice: Choice, arms: list[str], epsilon: float) -> None:
    assert list(choice.probabilities) == arms
    p = np.array(list(choice.probabilities.values()))
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    assert p.min() >= epsilon / len(arms) - 1e-15
    assert choice.arm in arms and choice.propensity > 0


def test_the_contract_covers_every_registered_policy() -> None:
    """``make_policy`` builds from the registry ``loads`` dispatches on; each of its classes
    is checked below."""
    assert POLICIES is REGISTRY
    assert set(PARAMS) == set(POLICIES)


def test_a_class_is_loaded_by_the_kind_it_declares_itself() -> None:
    from service.policy import CheckpointError, LinUCB

    class Tuned(LinUCB):  # inherits LinUCB's kind: does not take LinUCB's place
        pass

    assert POLICIES["linucb"] is LinUCB
    with pytest.raises(CheckpointError, match="two policy classes declare kind 'linucb'"):

        class Rival(LinUCB):
            kind = "linucb"

    assert POLICIES["linucb"] is LinUCB
    assert type(make_policy("linucb")) is LinUCB


@pytest.mark.parametrize("name", NAMES)
def test_is_a_river_contextual_policy(name: str) -> None:
    policy = _policy(name)
    assert isinstance(policy, bandit.base.ContextualPolicy)
    arm = policy.pull(ARMS, context=np.ones(D))
    assert arm in ARMS
    policy.update(arm, np.ones(D), 1.0)
    assert policy.n_updates == 1
    assert policy.kind == name


@pytest.mark.parametrize("name", NAMES)
def test_distributions_are_valid_with_epsilon_floor(name: str) -> None:
    policy = _policy(name)
    _play(policy, 40)
    rng = np.random.default_rng(5)
    for _ in range(10):
        _check_distribution(policy.choose(ARMS, rng.normal(size=D)), ARMS, 0.1)
    for choice in policy.choose_many(ARMS, rng.normal(size=(5, D)).astype(np.float32)):
        _check_distribution(choice, ARMS, 0.1)


@pytest.mark.parametrize("name", NAMES)
def test_draws_follow_the_logged_probabilities(name: str) -> None:
    policy = _policy(name, seed=3)
    _play(policy, 40)
    x = np.random.default_rng(7).normal(size=D)
    n = 3000
    counts = dict.fromkeys(ARMS, 0)
    mean_p = dict.fromkeys(ARMS, 0.0)
    for _ in range(n):
        choice = policy.choose(ARMS, x)
        counts[choice.arm] += 1
        for arm in ARMS:
            mean_p[arm] += choice.probabilities[arm] / n
    for arm in ARMS:
        p = mean_p[arm]
        assert abs(counts[arm] / n - p) <= 4.5 * np.sqrt(p * (1 - p) / n) + 1e-9


@pytest.mark.parametrize("name", NAMES)
def test_seeded_runs_are_deterministic(name: str) -> None:
    assert _play(_policy(name, seed=11), 60) == _play(_policy(name, seed=11), 60)
    runs = {tuple(_play(_policy(name, seed=s), 60)) for s in (1, 2, 3)}
    assert len(runs) > 1  # the seed matters


@pytest.mark.parametrize("name", NAMES)
def test_choose_many_equals_successive_choose(name: str) -> None:
    one, many = _policy(name, seed=4), _policy(name, seed=4)
    _play(one, 30)
    _play(many, 30)
    X = np.random.default_rng(9).normal(size=(12, D))
    batch = many.choose_many(ARMS, X)
    singles = [one.choose(ARMS, x) for x in X]
    assert [c.arm for c in batch] == [c.arm for c in singles]
    for b, s in zip(batch, singles, strict=True):
        assert b.probabilities == pytest.approx(s.probabilities, abs=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_new_arm_is_explored_and_removed_arm_is_forgotten(name: str) -> None:
    policy = _policy(name)
    _play(policy, 40, arms=["a", "b"])
    choice = policy.choose(["a", "b", "new"], np.ones(D))
    assert choice.probabilities["new"] == pytest.approx(0.9 + 0.1 / 3)
    policy.update("new", np.ones(D), 0.5)
    assert set(policy.arms) == {"a", "b", "new"}
    before = policy.choose(["a", "b"], np.ones(D)).scores
    policy.remove_arm("new")
    assert set(policy.arms) == {"a", "b"}
    with pytest.raises(KeyError):
        policy.remove_arm("new")
    # the others' learning is intact: same scores as before the removal (up to the float32
    # scorer's rounding, which may depend on how many arms the stacked product holds)
    assert policy.choose(["a", "b"], np.ones(D)).scores == pytest.approx(before, rel=1e-6)
    # offering only some arms keeps the others' statistics
    assert list(policy.choose(["b"], np.ones(D)).probabilities) == ["b"]
    assert "a" in policy.arms


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip_after_arms_added_and_removed(name: str) -> None:
    policy = _policy(name, seed=8)
    _play(policy, 50, arms=["a", "b", "c"])
    _play(policy, 10, seed=2, arms=["a", "c", "d"])
    policy.remove_arm("b")
    restored = loads(policy.dumps())
    assert type(restored) is type(policy)
    assert restored.arms == policy.arms
    assert restored.n_updates == policy.n_updates == 60
    assert restored.dumps() == policy.dumps()
    arms = ["a", "c", "d", "e"]
    assert _play(restored, 30, seed=3, arms=arms) == _play(policy, 30, seed=3, arms=arms)
    assert restored.dumps() == policy.dumps()


@pytest.mark.parametrize("name", NAMES)
def test_dict_contexts(name: str) -> None:
    policy = _policy(name)
    ctx = {f"f{j}": float(j) / D for j in range(D)}
    choice = policy.choose(ARMS, ctx)
    policy.update(choice.arm, ctx, 1.0)
    _check_distribution(policy.choose(ARMS, ctx), ARMS, 0.1)


@pytest.mark.parametrize("name", NAMES)
def test_empty_or_duplicate_arm_lists_are_rejected(name: str) -> None:
    policy = _policy(name)
    with pytest.raises(ValueError):
        policy.choose([], np.ones(D))
    with pytest.raises(ValueError):
        policy.choose(["a", "a"], np.ones(D))


def test_a_subclass_that_inherits_kind_does_not_hijack_loads() -> None:
    import numpy as np

    from service.policy import LinUCB, loads

    class Tweaked(LinUCB):  # e.g. a test double; inherits kind "linucb"
        pass

    policy = LinUCB(alpha=0.3, seed=1)
    policy.update("a", np.ones(3), 1.0)
    restored = loads(policy.dumps())
    assert type(restored) is LinUCB and restored.alpha == 0.3
    assert Tweaked.kind == "linucb"
