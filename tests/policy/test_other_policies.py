"""Policy-specific behaviour: LinTS, the River-regressor policies and the River baselines."""

from __future__ import annotations

import io
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
from river import bandit, linear_model, optim

from service.policy import EpsGreedy, LinTS, RiverThompson, RiverUCB, Softmax, loads

# --------------------------------------------------------------------------------- LinTS


def _normal_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def test_lin_ts_probabilities_estimate_the_exact_thompson_law() -> None:
    d, v = 3, 0.8
    rng = np.random.default_rng(0)
    policy = LinTS(v=v, epsilon=0.0, n_samples=40_000, seed=1)
    for _ in range(15):
        x = rng.normal(size=d)
        policy.update("a", x, float(x[0]))
        policy.update("b", x, float(x[1]))
    x = np.array([0.3, 0.2, -0.1])
    choice = policy.choose(["a", "b"], x)
    # exact: P(θ̃_a·x > θ̃_b·x) with independent Gaussian scalars
    mean, var = {}, {}
    for arm in ("a", "b"):
        i = policy.stats.index[arm]
        mean[arm] = policy.stats.theta[i] @ x
        var[arm] = v**2 * x @ policy.stats.A_inv[i] @ x
    exact = _normal_cdf((mean["a"] - mean["b"]) / math.sqrt(var["a"] + var["b"]))
    assert choice.probabilities["a"] == pytest.approx(exact, abs=0.01)
    assert choice.scores == pytest.approx(mean, rel=1e-5)  # the float32 scorer


def test_lin_ts_merge_equals_full_stream() -> None:
    rng = np.random.default_rng(2)
    X, r = rng.normal(size=(80, 4)), rng.normal(size=80)
    arms = ["a", "b"] * 40
    full, first, second = LinTS(seed=0), LinTS(seed=0), LinTS(seed=1)
    for i in range(80):
        full.update(arms[i], X[i], r[i])
        (first if i < 50 else second).update(arms[i], X[i], r[i])
    merged = first.merge(second)
    for arm in ("a", "b"):
        np.testing.assert_allclose(merged.estimate(arm), full.estimate(arm), atol=1e-9)
    assert merged.n_updates == 80


# ----------------------------------------------------------------- River-regressor policies


def _regressor():
    return linear_model.LinearRegression(optimizer=optim.SGD(0.1), intercept_lr=0.1)


def test_eps_greedy_scores_are_the_per_arm_river_predictions() -> None:
    rng = np.random.default_rng(3)
    policy = EpsGreedy(model=_regressor(), epsilon=0.2, seed=0)
    twins = {"a": _regressor(), "b": _regressor()}
    for _ in range(50):
        x = rng.normal(size=3)
        for arm, target in (("a", x[0]), ("b", -x[0])):
            policy.update(arm, x, float(target))
            twins[arm].learn_one(dict(enumerate(x.tolist())), float(target))
    x = np.array([1.0, 0.5, -0.5])
    choice = policy.choose(["a", "b"], x)
    expected = {arm: twins[arm].predict_one(dict(enumerate(x.tolist()))) for arm in twins}
    assert choice.scores == pytest.approx(expected, abs=1e-12)
    best = max(expected, key=expected.__getitem__)
    assert choice.probabilities[best] == pytest.approx(0.9)


def test_softmax_probabilities_are_exact() -> None:
    policy = Softmax(model=_regressor(), temperature=0.25, epsilon=0.1, seed=0)
    x = {"u": 1.0}
    for _ in range(40):
        policy.update("a", x, 1.0)
        policy.update("b", x, 0.5)
        policy.update("c", x, 0.0)
    choice = policy.choose(["a", "b", "c"], x)
    s = np.array([choice.scores[a] for a in "abc"])
    z = np.exp(s / 0.25)
    expected = 0.9 * z / z.sum() + 0.1 / 3
    assert [choice.probabilities[a] for a in "abc"] == pytest.approx(expected.tolist(), abs=1e-12)
    assert choice.probabilities["a"] > choice.probabilities["b"] > choice.probabilities["c"]


def test_regressor_policies_cannot_merge() -> None:
    with pytest.raises(NotImplementedError):
        EpsGreedy(seed=0).merge(EpsGreedy(seed=1))


# ------------------------------------------------------------------------ River baselines


def test_river_ucb_uses_rivers_statistics_and_rule() -> None:
    policy = RiverUCB(delta=0.3, epsilon=0.0, seed=0)
    twin = bandit.UCB(delta=0.3, seed=0)
    rng = np.random.default_rng(4)
    rewards: dict[str, list[float]] = {"a": [], "b": [], "c": []}
    for _ in range(200):
        arm = str(rng.choice(["a", "b", "c"]))
        reward = float(rng.random() < {"a": 0.7, "b": 0.5, "c": 0.2}[arm])
        policy.update(arm, None, reward)
        twin.update(arm, reward)
        rewards[arm].append(reward)
    expected = {  # UCB1: the mean reward plus delta·sqrt(2·ln n / n_arm)
        arm: np.mean(seen) + 0.3 * math.sqrt(2 * math.log(200) / len(seen))
        for arm, seen in rewards.items()
    }
    choice = policy.choose(["a", "b", "c"], None)
    assert choice.scores == pytest.approx(expected, abs=1e-12)
    assert choice.arm == twin.pull(["a", "b", "c"])
    assert [policy.pulls(a) for a in "abc"] == [len(rewards[a]) for a in "abc"]
    assert choice.probabilities[choice.arm] == 1.0


def test_river_ucb_merge_sums_the_statistics() -> None:
    full, first, second = RiverUCB(seed=0), RiverUCB(seed=0), RiverUCB(seed=1)
    rewards = np.random.default_rng(5).random(60)
    for i, r in enumerate(rewards):
        arm = "ab"[i % 2]
        full.update(arm, None, r)
        (first if i < 25 else second).update(arm, None, r)
    merged = first.merge(second)
    assert merged.choose(["a", "b"], None).scores == pytest.approx(
        full.choose(["a", "b"], None).scores, abs=1e-12
    )
    assert merged.n_updates == 60
    assert [merged.pulls(a) for a in "ab"] == [full.pulls(a) for a in "ab"] == [30, 30]


def test_river_thompson_posteriors_and_merge() -> None:
    policy = RiverThompson(alpha=1, beta=1, epsilon=0.0, n_samples=2000, seed=0)
    for _ in range(30):
        policy.update("good", None, 1.0)  # rewards at 0/1 binarise deterministically
        policy.update("bad", None, 0.0)
    policy.update("bad", None, 1.0)
    assert policy.posterior("good") == (31, 1)
    assert policy.posterior("bad") == (2, 31)
    choice = policy.choose(["good", "bad"], None)
    assert choice.probabilities["good"] > 0.99
    other = RiverThompson(alpha=1, beta=1, epsilon=0.0, n_samples=2000, seed=3)
    other.update("good", None, 0.0)
    other.update("new", None, 1.0)
    merged = policy.merge(other)
    assert merged.posterior("good") == (31, 2)
    assert merged.posterior("new") == (2, 1)
    assert policy.posterior("good") == (31, 1)  # inputs untouched


def test_river_thompson_binarises_fractional_rewards_by_their_value() -> None:
    policy = RiverThompson(seed=0)
    for _ in range(2000):
        policy.update("a", None, 0.3)
        policy.update("b", None, -0.5)  # clipped to 0
    a_alpha, a_beta = policy.posterior("a")
    assert (a_alpha - 1) / (a_alpha + a_beta - 2) == pytest.approx(0.3, abs=0.03)
    assert policy.posterior("b") == (1, 2001)


# ------------------------------------------------------------------ checkpoints on file
CHECKPOINTS = Path(__file__).parent / "data" / "checkpoints"


@pytest.mark.parametrize("kind", ["eps_greedy", "softmax", "ucb", "thompson"])
def test_checkpoints_on_file_load_and_choose_as_they_did(kind: str) -> None:
    """``data/checkpoints/{kind}.ckpt``: each River-backed policy after 40 seeded updates,
    dumped (format version 2) when the four policies shared two modules; ``expected.json``
    holds the choices each made next. Loaded now, each makes the same choices with the same
    probabilities: the River objects in them unpickle, whatever module the policy is in, and
    the baselines ("ucb", "thompson"), which now keep their own statistics, take River's.
    Stored again in today's format, they still make those choices."""
    recorded = json.loads((CHECKPOINTS / "expected.json").read_text())
    expected = recorded["expected"][kind]
    stored = (CHECKPOINTS / f"{kind}.ckpt").read_bytes()
    policy = loads(stored)
    again = loads(policy.dumps())
    assert policy.kind == again.kind == kind
    assert policy.n_updates == again.n_updates == expected["n_updates"]
    for x, want in zip(recorded["probe"], expected["choices"], strict=True):
        for p in (policy, again):
            choice = p.choose(recorded["arms"], np.array(x))
            assert choice.arm == want["arm"]
            assert choice.probabilities == pytest.approx(want["probabilities"], abs=1e-12)


@pytest.mark.parametrize("kind", ["ucb", "thompson"])
def test_baseline_checkpoints_hold_arrays_not_river_objects(kind: str) -> None:
    """Today's baseline checkpoints keep the statistics as plain arrays (no pickle), and the
    statistics read from an older checkpoint's River object are the ones River kept."""
    old = loads((CHECKPOINTS / f"{kind}.ckpt").read_bytes())
    payload = old.dumps()
    _, _, length = struct.unpack_from(">8sHI", payload)
    with np.load(io.BytesIO(payload[14 + length :]), allow_pickle=False) as npz:
        assert sorted(npz.files) == sorted(["s_pulls", "s_means" if kind == "ucb" else "s_wins"])
    assert sum(old.pulls(a) for a in old.arms) == old.n_updates == 40
    if kind == "thompson":  # the posterior counts every pull as a win or a loss
        for arm in old.arms:
            a, b = old.posterior(arm)
            assert a + b == old.alpha + old.beta + old.pulls(arm)
