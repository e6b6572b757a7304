"""Conservative mode on a synthetic stream: the router's cumulative expected reward never falls
more than δ below the baseline's, at any step, while it still learns the better arm."""

from __future__ import annotations

import numpy as np

from service.learning import LivePolicy
from service.log.rows import AppliedReward
from service.policy import Pricing, make_policy
from service.policy.conservative import Conservative, ConservativeGuard

MEANS = {"baseline": 0.6, "better": 0.8, "worse": 0.3}
PRICING = Pricing(0.0, 0.001)
DELTA = 0.05


def run(guarded: bool, seed: int, n: int = 3000) -> tuple[np.ndarray, list[str]]:
    """The router's cumulative expected reward after each step, and its arms."""
    rng = np.random.default_rng(seed)
    policy = make_policy("arm_means", alpha=0.5, epsilon=0.05, seed=seed)
    guard = ConservativeGuard({"qa": Conservative("baseline", DELTA)})
    x, arms, earned, played = np.ones(1), list(MEANS), [], []
    for _ in range(n):
        choice = policy.choose(arms, x, pricing=PRICING)
        if guarded:
            choice = guard.guard("qa", choice, PRICING)
        guard.played("qa", choice.arm)
        correct = float(rng.random() < MEANS[choice.arm])
        policy.learn(choice.arm, x, correct, 0.0)
        guard.learned("qa", choice.arm, correct, 0.0)
        earned.append(MEANS[choice.arm])
        played.append(choice.arm)
    return np.cumsum(earned), played


def test_the_constraint_holds_at_every_step_and_the_better_arm_is_still_learnt():
    steps = np.arange(1, 3001)
    floor = (1 - DELTA) * MEANS["baseline"] * steps
    for seed in range(3):
        cumulative, played = run(True, seed)
        assert np.all(cumulative >= floor - 1e-9), int(np.argmax(cumulative < floor))
        last = played[-1000:]
        assert last.count("better") >= 900  # the better arm serves in the end


def test_without_the_guard_the_same_learner_breaks_the_constraint_early():
    steps = np.arange(1, 3001)
    floor = (1 - DELTA) * MEANS["baseline"] * steps
    broken = [np.any(run(False, seed)[0] < floor) for seed in range(3)]
    assert all(broken)


def test_a_policy_rebuilt_from_the_log_counts_each_outcome_once():
    """A checkpoint of another policy configuration is rebuilt from the whole reward log: the
    guard's outcomes (a projection of that log) are learnt again once, not added to the
    restored ones."""
    rules = {"t": Conservative("a", 0.1)}
    stored = LivePolicy("linucb", {"alpha": 0.1}, conservative=rules)
    log = [
        AppliedReward(
            i + 1,
            f"q{i}",
            "b",
            np.ones(4),
            1.0,
            layout=stored.context.spec,
            correct=i % 2 == 0,
            cost_usd=0.001,
            task="t",
        )
        for i in range(5)
    ]
    stored.apply(log)
    snap = stored.snapshot()
    restarted = LivePolicy("linucb", {"alpha": 0.2}, conservative=rules)  # other parameters
    assert not restarted.load(snap.state, snap.watermark, snap.decision_watermark, "ckpt")
    restarted.apply(log)  # what the caller does: replay the whole reward log
    fresh = LivePolicy("linucb", {"alpha": 0.2}, conservative=rules)
    fresh.apply(log)
    assert restarted.guard.to_dict()["sums"] == fresh.guard.to_dict()["sums"]
