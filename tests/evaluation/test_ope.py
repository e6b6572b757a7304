"""Off-policy estimates on synthetic logs whose true value is known."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation import ope
from evaluation.ope import LoggedData

COSTS = np.array([0.0001, 0.0005, 0.002])
UNIT = 0.001
BETA = np.array([[1.0, -1.0, 0.0], [-0.5, 1.0, 0.5], [0.5, 0.5, 1.0]])
BIAS = np.array([0.0, 0.3, 0.8])


def p_correct(X: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(X @ BETA.T + BIAS)))


def logging_probs(X: np.ndarray) -> np.ndarray:
    """A stochastic logging policy that prefers different arms in different regions."""
    z = X @ np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, -1.0]]).T
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return 0.85 * p + 0.15 / 3


def target_rule(X: np.ndarray) -> np.ndarray:
    """A deterministic router: the arm with the best true reward at λ = 0.3."""
    pi = np.zeros((len(X), 3))
    pi[np.arange(len(X)), (p_correct(X) - 0.3 * COSTS / UNIT).argmax(axis=1)] = 1.0
    return pi


def synthetic_log(n: int, rng: np.random.Generator) -> LoggedData:
    X = rng.normal(size=(n, 3))
    probs = logging_probs(X)
    actions = (rng.random((n, 1)) > probs.cumsum(axis=1)).sum(axis=1)
    correct = rng.random(n) < p_correct(X)[np.arange(n), actions]
    return LoggedData(
        query_ids=[str(i) for i in range(n)],
        arms=["a", "b", "c"],
        contexts=X,
        actions=actions,
        propensities=probs[np.arange(n), actions],
        logged_probs=probs,
        candidates=np.ones((n, 3), dtype=bool),
        correct=correct,
        cost=COSTS[actions],
        logged_reward=correct - 0.1 * COSTS[actions] / UNIT,
        logged_lambda=np.full(n, 0.1),
    )


def true_value(policy, lam: float) -> float:
    X = np.random.default_rng(12345).normal(size=(400_000, 3))
    return float((policy(X) * (p_correct(X) - lam * COSTS / UNIT)).sum(axis=1).mean())


@pytest.mark.parametrize("lam", [0.0, 0.3])
def test_estimators_are_unbiased_and_intervals_cover(lam: float) -> None:
    truth = true_value(target_rule, lam)
    rng = np.random.default_rng(7)
    reps, n = 150, 1000
    values = {k: [] for k in ("ips", "snips", "dr")}
    covered = {k: 0 for k in values}
    for _ in range(reps):
        log = synthetic_log(n, rng)
        for name, e in ope.estimate(log, target_rule(log.contexts), lam, UNIT).items():
            values[name].append(e.value)
            covered[name] += e.low <= truth <= e.high
    for name in values:
        v = np.array(values[name])
        assert abs(v.mean() - truth) < 3 * v.std() / np.sqrt(reps) + 0.004, name
        assert covered[name] / reps >= 0.88, (name, covered[name] / reps)
    # the reward model takes most of the noise out
    assert np.std(values["dr"]) < 0.8 * np.std(values["ips"])


def test_a_wrong_target_is_told_apart_from_a_good_one() -> None:
    log = synthetic_log(3000, np.random.default_rng(1))
    good = ope.estimate(log, target_rule(log.contexts), 0.3, UNIT)["dr"]
    always_c = ope.estimate(log, ope.fixed_arm(log, "c"), 0.3, UNIT)["dr"]
    assert always_c.high < good.low  # intervals do not overlap
    assert always_c.low <= true_value(lambda X: np.tile([0, 0, 1.0], (len(X), 1)), 0.3)


def test_the_logging_policy_estimates_to_what_was_observed() -> None:
    log = synthetic_log(500, np.random.default_rng(2))
    est = ope.estimate(log, ope.logged_policy(log), 0.2, UNIT)
    observed = log.rewards(0.2, UNIT).mean()
    assert est["ips"].value == pytest.approx(observed)
    assert est["snips"].value == pytest.approx(observed)
    d = ope.diagnostics(log, ope.logged_policy(log))
    assert d["ess"] == pytest.approx(500) and d["unsupported_mass"] == 0.0


def test_rewards_are_rescored_at_any_lambda() -> None:
    log = synthetic_log(50, np.random.default_rng(3))
    np.testing.assert_allclose(log.rewards(0.1, UNIT), log.logged_reward)
    np.testing.assert_allclose(log.rewards(2.0, UNIT), log.correct - 2.0 * log.cost / UNIT)


def test_greedy_target_and_policies_as_targets() -> None:
    from service.policy import LinUCB

    log = synthetic_log(2000, np.random.default_rng(4))
    model = ope.fit_reward_model(log)
    greedy = ope.greedy_target(log, model, 0.3, UNIT)
    assert np.all(greedy.sum(axis=1) == 1.0)
    # fitted on the log, the greedy router agrees with the true best arm most of the time
    agree = (greedy.argmax(axis=1) == target_rule(log.contexts).argmax(axis=1)).mean()
    assert agree > 0.8
    policy = LinUCB(alpha=0.1, epsilon=0.1, seed=0)
    for i in range(200):
        policy.update(log.arms[log.actions[i]], log.contexts[i], float(log.correct[i]))
    pi = ope.from_policy(log, policy)
    np.testing.assert_allclose(pi.sum(axis=1), 1.0)
    assert pi.min() >= 0.1 / 3 - 1e-12  # ε-mixing: every candidate keeps ε/k
    log.candidates[:10, 2] = False  # arm c was not offered on the first rows
    pi = ope.from_policy(log, policy)
    assert np.all(pi[:10, 2] == 0.0)
    assert ope.diagnostics(log, ope.fixed_arm(log, "c"))["unsupported_mass"] == pytest.approx(
        10 / 2000
    )
