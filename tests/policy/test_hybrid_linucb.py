"""Hybrid LinUCB: its estimates are the joint ridge regression's, merges and checkpoints are
exact, and the shared part lets an arm learn from the other arms' pulls."""

from __future__ import annotations

import numpy as np
import pytest

from service.policy import HybridLinUCB, loads

D = 5
ARMS = ["a", "b", "c"]


def _stream(n: int, seed: int) -> list[tuple[str, np.ndarray, float]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.normal(size=D)
        arm = ARMS[int(rng.integers(3))]
        r = float(x[0] - 0.5 * x[1] + (0.3 if arm == "a" else 0.0) * x[2] + 0.1 * rng.normal())
        out.append((arm, x, r))
    return out


def _joint_ridge(stream, ridge: float) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The closed form: ridge regression on φ = [x, e_a ⊗ x] with prior precision ``ridge``."""
    width = D * (1 + len(ARMS))
    G = np.eye(width) * ridge
    g = np.zeros(width)
    for arm, x, r in stream:
        phi = np.zeros(width)
        phi[:D] = x
        j = 1 + ARMS.index(arm)
        phi[j * D : (j + 1) * D] = x
        G += np.outer(phi, phi)
        g += r * phi
    w = np.linalg.solve(G, g)
    return w[:D], {a: w[(1 + i) * D : (2 + i) * D] for i, a in enumerate(ARMS)}


@pytest.mark.parametrize("ridge", [1.0, 3.0])
def test_estimates_equal_the_joint_ridge_closed_form(ridge: float) -> None:
    stream = _stream(200, seed=0)
    policy = HybridLinUCB(ridge=ridge, seed=0)
    for arm, x, r in stream:
        policy.update(arm, x, r)
    beta, thetas = _joint_ridge(stream, ridge)
    for arm in ARMS:
        got_beta, got_theta = policy.estimate(arm)
        np.testing.assert_allclose(got_beta, beta, atol=1e-9)
        np.testing.assert_allclose(got_theta, thetas[arm], atol=1e-9)
    # the greedy score is the model's prediction
    greedy = HybridLinUCB(alpha=0.0, ridge=ridge, epsilon=0.0, seed=0)
    for arm, x, r in stream:
        greedy.update(arm, x, r)
    x = np.random.default_rng(1).normal(size=D)
    scores = greedy.choose(ARMS, x).scores
    for arm in ARMS:
        assert scores[arm] == pytest.approx(float(x @ (beta + thetas[arm])), abs=1e-9)


def test_merge_is_exact_and_keeps_the_random_state() -> None:
    stream = _stream(300, seed=2)
    whole, left, right = (HybridLinUCB(seed=4) for _ in range(3))
    for i, (arm, x, r) in enumerate(stream):
        whole.update(arm, x, r)
        (left if i % 3 else right).update(arm, x, r)
    merged = left.merge(right)
    assert merged.n_updates == whole.n_updates == 300
    for arm in ARMS:
        for got, want in zip(merged.estimate(arm), whole.estimate(arm), strict=True):
            np.testing.assert_allclose(got, want, atol=1e-10)
    X = np.random.default_rng(3).normal(size=(8, D))
    a = merged.choose_many(ARMS, X)
    b = whole.choose_many(ARMS, X)
    for ca, cb in zip(a, b, strict=True):
        assert ca.probabilities == pytest.approx(cb.probabilities, abs=1e-12)
        assert ca.scores == pytest.approx(cb.scores, abs=1e-9)
    with pytest.raises(ValueError):
        left.merge(HybridLinUCB(alpha=2.0))


def test_checkpoint_round_trip_is_bit_exact() -> None:
    policy = HybridLinUCB(alpha=0.5, epsilon=0.1, seed=9)
    for arm, x, r in _stream(120, seed=5):
        policy.update(arm, x, r)
    restored = loads(policy.dumps())
    assert isinstance(restored, HybridLinUCB) and restored.n_updates == 120
    X = np.random.default_rng(6).normal(size=(20, D))
    assert [c.arm for c in restored.choose_many(ARMS, X)] == [
        c.arm for c in policy.choose_many(ARMS, X)
    ]
    for arm in ARMS:
        for got, want in zip(restored.estimate(arm), policy.estimate(arm), strict=True):
            np.testing.assert_array_equal(got, want)


def test_an_arm_learns_the_shared_part_from_the_other_arms_pulls() -> None:
    """Only arm "a" is pulled; the shared β carries "x[0] pays" to arm "b" as well, which a
    disjoint model could not know."""
    rng = np.random.default_rng(8)
    policy = HybridLinUCB(alpha=0.0, epsilon=0.0, seed=0)
    for _ in range(200):
        x = rng.normal(size=D)
        policy.update("a", x, float(x[0]))
    policy.update("b", np.zeros(D), 0.0)  # b known, with no information about x
    x = np.eye(D)[0]
    assert policy.choose(["a", "b"], x).scores["b"] > 0.4
