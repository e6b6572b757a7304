"""LinUCB: closed-form estimates, merge, propensities, determinism, arms, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
from river import bandit

from service.policy import LinUCB, loads, make_policy
from service.policy.base import greedy_mix, greedy_mix_row, row_max
from service.policy.linear import BUFFER, RESYNC

ARMS = ["a", "b", "c"]
# Scores come from the float32 scorer (see service.policy.linear): they agree with the float64
# closed form to this relative tolerance; estimates, A, A⁻¹ and b are exact.
SCORE_RTOL = 1e-5


def _stream(n: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    arms = rng.choice(ARMS, size=n)
    rewards = rng.normal(size=n)
    return X, arms.tolist(), rewards


def _train(policy: LinUCB, X, arms, rewards) -> LinUCB:
    for x, a, r in zip(X, arms, rewards, strict=True):
        policy.update(a, x, r)
    return policy


@pytest.mark.parametrize("ridge", [0.5, 2.0])
def test_estimates_equal_closed_form_ridge(ridge: float) -> None:
    d = 6
    X, arms, rewards = _stream(3 * BUFFER + 7, d)  # crosses the lazy-A buffer boundary
    policy = _train(LinUCB(ridge=ridge), X, arms, rewards)
    arms_arr = np.array(arms)
    for arm in ARMS:
        Xa, ya = X[arms_arr == arm], rewards[arms_arr == arm]
        A = ridge * np.eye(d) + Xa.T @ Xa
        i = policy.stats.index[arm]
        np.testing.assert_allclose(policy.estimate(arm), np.linalg.solve(A, Xa.T @ ya), atol=1e-10)
        np.testing.assert_allclose(policy.stats.A[i], A, atol=1e-10)
        np.testing.assert_allclose(policy.stats.A_inv[i], np.linalg.inv(A), atol=1e-10)
        np.testing.assert_allclose(policy.stats.b[i], Xa.T @ ya, atol=1e-10)
        assert policy.stats.counts[i] == len(ya)
    assert policy.n_updates == len(arms)


def test_scores_are_ucb_of_closed_form() -> None:
    d, alpha = 4, 0.7
    X, arms, rewards = _stream(40, d, seed=3)
    policy = _train(LinUCB(alpha=alpha, epsilon=0.0, seed=0), X, arms, rewards)
    x = np.random.default_rng(9).normal(size=d)
    choice = policy.choose(ARMS, x)
    arms_arr = np.array(arms)
    for arm in ARMS:
        Xa, ya = X[arms_arr == arm], rewards[arms_arr == arm]
        A = np.eye(d) + Xa.T @ Xa
        expected = np.linalg.solve(A, Xa.T @ ya) @ x + alpha * np.sqrt(x @ np.linalg.solve(A, x))
        assert choice.scores[arm] == pytest.approx(expected, rel=SCORE_RTOL)
    best = max(ARMS, key=choice.scores.__getitem__)
    assert choice.arm == best and choice.probabilities[best] == 1.0


def test_merge_of_halves_equals_full_stream() -> None:
    d = 8
    X, arms, rewards = _stream(200, d, seed=1)
    arms[150:] = ["d"] * 50  # an arm only the second half knows
    full = _train(LinUCB(seed=0), X, arms, rewards)
    first = _train(LinUCB(seed=0), X[:100], arms[:100], rewards[:100])
    second = _train(LinUCB(seed=5), X[100:], arms[100:], rewards[100:])
    merged = first.merge(second)
    assert isinstance(merged, LinUCB)
    assert merged.n_updates == full.n_updates == 200
    assert sorted(merged.arms) == sorted(full.arms) == ["a", "b", "c", "d"]
    for arm in full.arms:
        i, j = full.stats.index[arm], merged.stats.index[arm]
        for name in ("A", "A_inv", "b", "theta"):
            np.testing.assert_allclose(
                getattr(merged.stats, name)[j], getattr(full.stats, name)[i], rtol=0, atol=1e-9
            )
        assert merged.stats.counts[j] == full.stats.counts[i]
    x = X[0]
    full_scores = full.choose(full.arms, x).scores
    merged_scores = merged.choose(full.arms, x).scores
    for arm in full.arms:
        assert merged_scores[arm] == pytest.approx(full_scores[arm], rel=SCORE_RTOL)
    # merging does not touch its inputs
    assert first.n_updates == 100 and second.n_updates == 100


def test_merge_rejects_incompatible_policies() -> None:
    a = _train(LinUCB(alpha=1.0), *_stream(10, 3))
    with pytest.raises(ValueError):
        a.merge(_train(LinUCB(alpha=2.0), *_stream(10, 3)))
    with pytest.raises(ValueError):
        a.merge(_train(LinUCB(alpha=1.0), *_stream(10, 4)))


@pytest.mark.parametrize("epsilon", [0.0, 0.05, 0.3, 1.0])
def test_probabilities_sum_to_one_with_floor(epsilon: float) -> None:
    d = 5
    policy = _train(LinUCB(epsilon=epsilon, seed=0), *_stream(60, d))
    arms = ARMS + ["z"]  # z: explored-first new arm
    rng = np.random.default_rng(2)
    for _ in range(20):
        choice = policy.choose(arms, rng.normal(size=d))
        p = np.array(list(choice.probabilities.values()))
        assert p.sum() == pytest.approx(1.0, abs=1e-12)
        assert p.min() >= epsilon / len(arms) - 1e-15
        assert choice.probabilities["z"] == pytest.approx(1 - epsilon + epsilon / len(arms))
        assert choice.propensity == choice.probabilities[choice.arm] > 0


def test_ties_are_split_evenly() -> None:
    policy = LinUCB(epsilon=0.2, seed=0)
    choice = policy.choose(ARMS, np.ones(3))  # all arms new: a three-way tie
    assert choice.probabilities == pytest.approx({a: 1 / 3 for a in ARMS})
    x = np.array([1.0, 0.0, 0.0])
    for arm in ARMS:
        policy.update(arm, x, 0.5)
    choice = policy.choose(ARMS, x)  # identical statistics: exact tie again
    assert choice.probabilities == pytest.approx({a: 1 / 3 for a in ARMS})


def test_draws_follow_the_reported_probabilities() -> None:
    d = 4
    policy = _train(LinUCB(epsilon=0.3, seed=11), *_stream(80, d))
    x = np.random.default_rng(4).normal(size=d)
    n = 6000
    picks = [policy.choose(ARMS, x).arm for _ in range(n)]
    probabilities = policy.choose(ARMS, x).probabilities
    for arm in ARMS:
        p = probabilities[arm]
        assert abs(picks.count(arm) / n - p) < 4 * np.sqrt(p * (1 - p) / n)


def test_seeded_runs_are_deterministic() -> None:
    def run(seed: int) -> list[str]:
        policy = LinUCB(epsilon=0.5, seed=seed)
        rng = np.random.default_rng(0)
        out = []
        for _ in range(100):
            x = rng.normal(size=4)
            choice = policy.choose(ARMS, x)
            policy.update(choice.arm, x, float(rng.normal()))
            out.append(choice.arm)
        return out

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_choose_many_matches_successive_choose() -> None:
    d = 6
    X, arms, rewards = _stream(50, d)
    one = _train(LinUCB(epsilon=0.4, seed=3), X, arms, rewards)
    many = _train(LinUCB(epsilon=0.4, seed=3), X, arms, rewards)
    Q = np.random.default_rng(8).normal(size=(30, d)).astype(np.float32)
    batch = many.choose_many(ARMS, Q)
    singles = [one.choose(ARMS, q) for q in Q]
    assert [c.arm for c in batch] == [c.arm for c in singles]
    for b, s in zip(batch, singles, strict=True):
        assert b.probabilities == pytest.approx(s.probabilities, abs=1e-12)
        assert b.scores == pytest.approx(s.scores, rel=SCORE_RTOL)


def test_new_arm_is_explored_and_others_keep_learning() -> None:
    d = 4
    policy = _train(LinUCB(epsilon=0.1, seed=0), *_stream(60, d))
    before = {arm: policy.estimate(arm) for arm in ARMS}
    choice = policy.choose(ARMS + ["new"], np.ones(d))
    assert choice.probabilities["new"] == pytest.approx(0.9 + 0.1 / 4)
    policy.update("new", np.ones(d), 1.0)
    policy.remove_arm("b")
    assert sorted(policy.arms) == ["a", "c", "new"]
    for arm in ("a", "c"):
        np.testing.assert_array_equal(policy.estimate(arm), before[arm])
    # an arm not offered is not a candidate but keeps its statistics
    choice = policy.choose(["a", "new"], np.ones(d))
    assert set(choice.probabilities) == {"a", "new"}
    np.testing.assert_array_equal(policy.estimate("c"), before["c"])
    with pytest.raises(KeyError):
        policy.remove_arm("b")


def test_float32_and_dict_contexts() -> None:
    policy = LinUCB(seed=0)
    policy.update("a", np.array([1, 2, 3], dtype=np.float32), 1.0)
    assert policy.stats.b.dtype == np.float64
    dict_policy = LinUCB(seed=0)
    dict_policy.update("a", {"z": 3.0, "x": 1.0, "y": 2.0}, 1.0)  # sorted keys: x, y, z
    np.testing.assert_array_equal(dict_policy.estimate("a"), policy.estimate("a"))
    dict_policy.update("a", {"x": 1.0}, 0.0)  # missing keys read as 0
    with pytest.raises(ValueError):
        dict_policy.update("a", {"w": 1.0}, 0.0)
    with pytest.raises(ValueError):
        policy.update("a", np.ones(4), 0.0)


def test_checkpoint_round_trip_after_arm_changes() -> None:
    d = 5
    policy = _train(LinUCB(alpha=0.8, epsilon=0.2, seed=9), *_stream(BUFFER + 5, d))
    policy.update("new", np.ones(d), 0.3)
    policy.remove_arm("b")
    policy.choose(["a", "c", "new"], np.ones(d))  # advance the random state
    restored = loads(policy.dumps())
    assert isinstance(restored, LinUCB)
    assert restored.arms == policy.arms
    assert restored.n_updates == policy.n_updates
    assert restored._get_params() == policy._get_params()
    for name in ("A", "A_inv", "b", "theta", "counts", "reward_sum"):
        np.testing.assert_array_equal(
            getattr(restored.stats, name)[: len(policy.arms)],
            getattr(policy.stats, name)[: len(policy.arms)],
        )
    rng = np.random.default_rng(0)
    for _ in range(50):
        x = rng.normal(size=d)
        arms = ["a", "c", "new", "b"]
        c1, c2 = policy.choose(arms, x), restored.choose(arms, x)
        assert c1 == c2
        policy.update(c1.arm, x, 1.0)
        restored.update(c2.arm, x, 1.0)
    assert restored.dumps() == policy.dumps()


def test_checkpoint_round_trip_with_projection_and_dict_contexts() -> None:
    policy = LinUCB(seed=4, project_dim=3)
    rng = np.random.default_rng(0)
    for _ in range(10):
        policy.update(
            str(rng.integers(3)), {f"f{j}": float(v) for j, v in enumerate(rng.normal(size=8))}, 1.0
        )
    restored = loads(policy.dumps())
    ctx = {f"f{j}": 0.5 for j in range(8)}
    assert restored.choose(["0", "1", "2"], ctx) == policy.choose(["0", "1", "2"], ctx)
    assert restored.stats.dim == 3
    np.testing.assert_array_equal(restored._projection, policy._projection)


def test_empty_policy_round_trip_and_bad_bytes() -> None:
    from service.policy import CheckpointError

    restored = loads(LinUCB(seed=1).dumps())
    assert restored.n_updates == 0 and restored.arms == []
    assert restored.choose(["a"], np.ones(2)) == LinUCB(seed=1).choose(["a"], np.ones(2))
    with pytest.raises(CheckpointError):
        loads(b"not a checkpoint at all")


def test_river_interface() -> None:
    policy = make_policy("linucb", seed=0)
    assert isinstance(policy, bandit.base.ContextualPolicy)
    arm = policy.pull(ARMS, context={"x": 1.0, "y": 0.0})
    assert arm in ARMS
    policy.update(arm, {"x": 1.0, "y": 0.0}, 1.0)
    assert policy.n_updates == 1
    assert isinstance(policy.clone(), LinUCB)
    with pytest.raises(ValueError):
        make_policy("nope")


def test_checkpoint_carries_the_budget_pacer_state() -> None:
    from service.pacing import BudgetPacer

    policy = _train(LinUCB(seed=2), *_stream(20, 3))
    policy.pacer = BudgetPacer(target_cost_per_query=1e-4, cost_unit=1e-3, lr=0.1)
    for cost in (3e-4, 0.0, 5e-4):
        policy.pacer.observe(cost)
    restored = loads(policy.dumps())
    assert restored.pacer == policy.pacer and restored.pacer.lam > 0
    assert loads(LinUCB().dumps()).pacer is None
    assert "n_updates=20" in repr(restored)


def test_float32_scorer_stays_close_to_the_closed_form_over_a_long_stream() -> None:
    """Thousands of rank-one and Woodbury updates on correlated unit-norm contexts (like
    sentence embeddings): the scores stay within SCORE_RTOL of the float64 closed form, and
    every RESYNC updates the scorer is re-derived from the exact A."""
    d, n = 48, 3 * RESYNC + 100
    rng = np.random.default_rng(7)
    basis = rng.normal(size=(8, d))  # a low-dimensional cluster plus noise: ill-conditioned A
    X = rng.normal(size=(n, 8)) @ basis + 0.05 * rng.normal(size=(n, d))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    rewards = rng.random(n)
    policy = LinUCB(alpha=1.0, epsilon=0.0, seed=0)
    t = 0
    while t < n:  # alternate single updates and batches of 20 for one arm
        if (t // 100) % 2:
            policy.update_many("a", X[t : t + 20], rewards[t : t + 20])
            t += 20
        else:
            policy.update("a", X[t], rewards[t])
            t += 1
        if t % 500 < 21:
            stats = policy.stats
            i = stats.index["a"]
            A = stats.A[i]
            Q = X[:50]
            mean, var = stats.mean_and_variance_many(Q, np.array([i]))
            exact_theta = np.linalg.solve(A, stats.b[i])
            np.testing.assert_allclose(mean[:, 0], Q @ exact_theta, rtol=0, atol=1e-4)
            exact_var = np.einsum("nd,nd->n", Q @ np.linalg.inv(A), Q)
            np.testing.assert_allclose(var[:, 0], exact_var, rtol=1e-3)
    i = policy.stats.index["a"]
    assert policy.stats.counts[i] == n
    policy.stats.resync(i)
    np.testing.assert_allclose(
        policy.stats.scorer[i], np.linalg.inv(policy.stats.A[i]), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("d", [64, 70, 385])
def test_block_triangle_quadratic_forms_equal_the_full_product(d: int) -> None:
    from service.policy.linear import _quadratic_forms

    rng = np.random.default_rng(d)
    M = rng.normal(size=(3, d, d))
    S = (M @ np.swapaxes(M, 1, 2) / d).astype(np.float32)  # symmetric positive definite
    X = rng.normal(size=(20, d)).astype(np.float32)  # n ≥ 16: the block path
    expected = np.einsum("nd,ade,ne->na", X.astype(np.float64), S.astype(np.float64), X)
    got = _quadratic_forms(S, np.ascontiguousarray(X.T))
    assert got.shape == (20, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_one_rows_mix_and_max_on_python_floats_are_numpys() -> None:
    """A single decision mixes its argmax on Python floats (base.greedy_mix_row, row_max):
    the same floats as greedy_mix and np.max on arrays, ties and NaN scores included."""
    rng = np.random.default_rng(0)
    for trial in range(500):
        k = int(rng.integers(1, 12))
        scores = rng.integers(0, 3, size=k).astype(float) + (trial % 2) * rng.random(k)
        if trial % 7 == 0:
            scores[rng.integers(k)] = np.nan
        epsilon = float(rng.choice([0.0, 0.02, 0.3, 1.0, rng.random()]))
        top = row_max(scores.tolist())
        assert np.array_equal([top], [scores.max()], equal_nan=True)
        greedy = scores == scores.max()
        with np.errstate(divide="ignore", invalid="ignore"):
            expected = greedy_mix(greedy, epsilon).tolist()
            got = greedy_mix_row(greedy.tolist(), epsilon)
        assert np.array_equal(got, expected, equal_nan=True)
        assert [v.hex() for v in got] == [v.hex() for v in expected]
