"""CorrectnessUCB: the correctness model in closed form, pricing at decision time, the cost
estimate from the log, merge and checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

from service.context import ContextBuilder, ContextLayout, Feature
from service.policy import CorrectnessUCB, Pricing, loads
from service.policy.base import RunningCosts

LAYOUT = ContextLayout(
    embedding="raw",
    task_buckets=4,
    feature_buckets=4,
    features=(Feature("subject", "categorical"),),
)
EMB = 5


def _policy(**kw) -> CorrectnessUCB:
    policy = CorrectnessUCB(**{"seed": 0, **kw})
    policy.context = ContextBuilder(LAYOUT)
    return policy


def _stream(n: int, seed: int = 0):
    """(arm, context, correct, cost) rows on contexts of ``LAYOUT``'s shape."""
    rng = np.random.default_rng(seed)
    d = LAYOUT.dim(EMB)
    for _ in range(n):
        x = np.zeros(d)
        x[LAYOUT.block("bias")], length = 1.0, rng.normal()
        x[LAYOUT.block("length")] = length
        x[LAYOUT.block("task").start + rng.integers(4)] = 1.0
        x[LAYOUT.block("feature:subject").start + rng.integers(4)] = 1.0
        x[LAYOUT.block("embedding")] = rng.normal(size=EMB) / np.sqrt(EMB)
        arm = ["small", "large"][rng.integers(2)]
        correct = float(rng.random() < (0.5 if arm == "small" else 0.8) + 0.1 * length)
        cost = (1e-4 if arm == "small" else 9e-4) * (1 + 0.1 * rng.random())
        yield arm, x, correct, cost


def test_estimates_equal_the_closed_form_of_the_block_prior() -> None:
    policy = _policy(ridge=1.0, task_ridge=8.0, length_ridge=20.0, embedding_ridge=5.0)
    rows = list(_stream(300))
    for arm, x, correct, cost in rows:
        policy.learn(arm, x, correct, cost)
    rho = np.array([1.0, 20.0] + [8.0] * 4 + [8.0] * 4 + [5.0] * EMB)
    np.testing.assert_array_equal(policy.block_precisions(len(rho)), rho)
    x_new = rows[0][1]
    for name in ("small", "large"):
        X = np.array([x for a, x, _, _ in rows if a == name])
        y = np.array([c for a, _, c, _ in rows if a == name]) - policy.prior_mean
        theta = np.linalg.solve(np.diag(rho) + X.T @ X, X.T @ y)
        expected = policy.prior_mean + theta @ x_new
        assert policy.estimates([name], x_new)[name] == pytest.approx(expected, abs=1e-9)
        costs = [c for a, _, _, c in rows if a == name]
        assert policy.mean_costs()[name] == pytest.approx(np.mean(costs), rel=1e-12)


def test_one_learned_state_two_lambdas_two_choices() -> None:
    policy = _policy(alpha=0.0, epsilon=0.0)
    for arm, x, correct, cost in _stream(400):
        policy.learn(arm, x, correct, cost)
    x = next(_stream(1, seed=9))[1]
    before = policy.dumps()
    cheap = Pricing(lam=0.01, cost_unit=0.001)
    dear = Pricing(lam=2.0, cost_unit=0.001)
    assert policy.choose(["small", "large"], x, pricing=cheap).arm == "large"
    assert policy.choose(["small", "large"], x, pricing=dear).arm == "small"
    # the same statistics served both (only the draw's random state moved)
    assert loads(policy.dumps()).estimates(["large"], x) == loads(before).estimates(["large"], x)
    # explicit estimates override the learned means: a "large" priced as cheap wins again
    free = Pricing(lam=2.0, cost_unit=0.001, est_cost={"small": 1e-4, "large": 1e-4})
    assert policy.choose(["small", "large"], x, pricing=free).arm == "large"


def test_scores_are_the_priced_optimistic_estimates() -> None:
    policy = _policy(alpha=0.3, epsilon=0.1)
    for arm, x, correct, cost in _stream(200):
        policy.learn(arm, x, correct, cost)
    x = next(_stream(1, seed=3))[1]
    pricing = Pricing(lam=0.5, cost_unit=0.001)
    choice = policy.choose(["small", "large"], x, pricing=pricing)
    est, costs = policy.estimates(["small", "large"], x), policy.mean_costs()
    for arm in ("small", "large"):
        priced = est[arm] - 0.5 * costs[arm] / 0.001
        assert choice.scores[arm] > priced  # the optimism is positive ...
        assert choice.scores[arm] < priced + 0.3  # ... and, after 200 pulls, under alpha
    best = max(choice.scores, key=choice.scores.get)
    assert choice.probabilities[best] == pytest.approx(0.95)


def test_failed_calls_teach_correctness_but_not_cost() -> None:
    policy = _policy()
    x = next(_stream(1))[1]
    policy.learn("a", x, 1.0, 0.002)
    policy.learn("a", x, 0.0, None)
    assert policy.mean_costs() == {"a": 0.002}
    assert policy.n_updates == 2


def test_merge_is_the_exact_sum_of_two_halves() -> None:
    rows = list(_stream(240))
    whole, first, second = _policy(), _policy(), _policy(seed=1)
    for i, (arm, x, correct, cost) in enumerate(rows):
        whole.learn(arm, x, correct, cost)
        (first if i < 100 else second).learn(arm, x, correct, cost)
    merged = first.merge(second)
    assert merged.n_updates == whole.n_updates == 240
    x = rows[-1][1]
    for arm in ("small", "large"):
        assert merged.estimates([arm], x)[arm] == pytest.approx(
            whole.estimates([arm], x)[arm], abs=1e-12
        )
        assert merged.mean_costs()[arm] == pytest.approx(whole.mean_costs()[arm], rel=1e-12)
    np.testing.assert_allclose(merged.stats.A, whole.stats.A, atol=1e-10)
    other_layout = CorrectnessUCB(seed=0)  # no layout: a uniform prior, another scale
    other_layout.learn("small", x, 1.0, 1e-4)
    with pytest.raises(ValueError, match="layouts"):
        whole.merge(other_layout)


def test_checkpoint_round_trip_keeps_prior_costs_and_choices() -> None:
    policy = _policy(task_ridge=3.0)
    for arm, x, correct, cost in _stream(150):
        policy.learn(arm, x, correct, cost)
    restored = loads(policy.dumps())
    assert type(restored) is CorrectnessUCB and restored.task_ridge == 3.0
    assert restored.mean_costs() == policy.mean_costs()
    assert restored.dumps() == policy.dumps()
    pricing = Pricing(lam=0.3, cost_unit=0.001)
    for _, x, _, _ in _stream(20, seed=4):
        a = policy.choose(["small", "large"], x, pricing=pricing)
        b = restored.choose(["small", "large"], x, pricing=pricing)
        assert a == b


def test_running_costs_fit_the_price_per_character() -> None:
    costs = RunningCosts()
    for size in (100, 200, 400, 800):
        costs.observe("gpt", 1e-5 * size + 3e-4, size)  # input tokens grow with the prompt
        costs.observe("flat", 5e-5, size)
    assert costs.estimate(1000)["gpt"] == pytest.approx(1e-2 + 3e-4)
    assert costs.estimate(1000)["flat"] == pytest.approx(5e-5)
    assert costs.means()["gpt"] == pytest.approx(1e-5 * 375 + 3e-4)


def test_what_it_learns_does_not_depend_on_what_it_was_asked() -> None:
    """Scoring between outcomes (choices, batches of choices, distributions) only reads: the
    state after a stream with drift alarms, a removed arm and batch updates is the same, byte
    for byte, as that of the same stream learnt without them (d = 50, three arms)."""
    emb, arms = 40, ["small", "large", "mid"]
    pricing = Pricing(0.2, 0.001)
    quiet, asked = _policy(), _policy()
    rng = np.random.default_rng(5)
    d = LAYOUT.dim(emb)
    for t in range(900):
        x = np.zeros(d)
        x[LAYOUT.block("bias")], x[LAYOUT.block("length")] = 1.0, rng.normal()
        x[LAYOUT.block("task").start + rng.integers(4)] = 1.0
        x[LAYOUT.block("embedding")] = rng.normal(size=emb) / np.sqrt(emb)
        arm = arms[t] if t < 3 else arms[int(rng.integers(len(arms)))]  # slots: same order
        p_right = 0.9 if t < 450 or arm != "large" else 0.2  # "large" drops: an alarm
        correct = float(rng.random() < p_right)
        if t < 3:
            pass
        elif t % 3 == 0:
            asked.choose(arms, x, pricing=pricing)
        elif t % 3 == 1:
            asked.choose_many(arms, np.stack([x, x[::-1]]), pricing=pricing)
        else:
            asked.distribution(arms[::-1], x, pricing)
        for policy in (quiet, asked):
            policy.learn(arm, x, correct, 1e-4)
            if t % 5 == 0:  # the same query asked again, and its outcome learnt again
                if policy is asked:
                    asked.distribution(arms, x, pricing)
                policy.learn(arm, x, 1.0 - correct, 1e-4)
            if t == 600:
                policy.remove_arm("mid")
            if t % 97 == 0:
                policy.update_many(arm, np.stack([x, -x]), [1.0, 0.0])
        if t == 600:
            arms = ["small", "large"]
    assert asked.detector is not None and asked.detector.alarms > 0
    for policy in (quiet, asked):
        policy.reseed(0)  # the choices drew from the random stream; nothing else may differ
    assert asked.dumps() == quiet.dumps()
