"""The selector (kind ``auto``): off-policy scores that cover the truth, switches on a clear
gain and never on noise, the same choice on every instance fed the same log, exact restarts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.context import ContextBuilder, ContextLayout
from service.policy import CorrectnessUCB, LinUCB, Pricing, Selector, loads
from service.policy.arm_means import ArmMeans

PRICING = Pricing(0.0, 0.001)
LAYOUT = ContextLayout("raw", task_buckets=4)


def _context(rng: np.random.Generator, task: int, noise_dim: int) -> np.ndarray:
    """A context of ``LAYOUT``: bias, length, the task's one-hot, a noise embedding."""
    x = np.zeros(LAYOUT.dim(noise_dim))
    x[LAYOUT.block("bias")], x[LAYOUT.block("length")] = 1.0, rng.normal()
    x[LAYOUT.block("task").start + task] = 1.0
    x[LAYOUT.block("embedding")] = rng.normal(size=noise_dim)
    return x


def _stream(n: int, values, noise_dim: int = 8, seed: int = 0):
    """``n`` (context, true P(correct) per arm) pairs; ``values[task]`` is the arm → P table."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        task = int(rng.integers(len(values)))
        yield _context(rng, task, noise_dim), values[task], rng.random()


def _selector(seed: int = 0, **params) -> Selector:
    policy = Selector(seed=seed, **params)
    policy.context = ContextBuilder(LAYOUT)
    return policy


def _serve(policy: Selector, stream, log: list | None = None) -> list[str]:
    """Serve a stream: choose, reveal the chosen arm's outcome, learn with the propensity."""
    picked = []
    for x, truth, u in stream:
        arms = list(truth)
        choice = policy.choose(arms, x, pricing=PRICING)
        correct = float(u < truth[choice.arm])
        policy.learn(choice.arm, x, correct, 1e-4, choice.propensity, PRICING)
        if log is not None:
            log.append((choice.arm, x, correct, choice.propensity))
        picked.append(choice.arm)
    return picked


def _true_distribution(policy: Selector, name: str, arms: list[str], x: np.ndarray):
    """What candidate ``name`` would choose from on ``x`` now (λ = 0: no price plays a part)."""
    c = policy.candidate(name)
    if isinstance(c, ArmMeans):
        return c.probabilities(arms, x, PRICING)
    probabilities = c.choose(arms, x).probabilities  # draws from the candidate's own RNG only
    return np.array([probabilities[a] for a in arms])


def test_doubly_robust_estimates_cover_each_candidates_true_value() -> None:
    """Truth: the mean over the stream of ``Σ_a π_c(a|x_t)·P(correct | a, x_t)`` with each
    candidate's distribution at the time; the estimate is within 3 standard errors of it."""
    values = [{"a": 0.8, "b": 0.4, "c": 0.5}, {"a": 0.3, "b": 0.7, "c": 0.5}]
    policy = _selector(min_scored=10**9)  # never switches: logging by correctness_ucb
    names = [s.name for s in policy.scores()]
    truth = dict.fromkeys(names, 0.0)
    n = 3000
    for x, p_correct, u in _stream(n, values):
        arms = list(p_correct)
        v = np.array([p_correct[a] for a in arms])
        for name in names:
            truth[name] += float(_true_distribution(policy, name, arms, x) @ v) / n
        choice = policy.choose(arms, x, pricing=PRICING)
        correct = float(u < p_correct[choice.arm])
        policy.learn(choice.arm, x, correct, 1e-4, choice.propensity, PRICING)
    for s in policy.scores():
        assert s.n == n
        assert abs(s.value - truth[s.name]) <= 3 * s.stderr, (s, truth[s.name])
    # the candidates differ: the non-contextual one cannot tell the tasks apart
    assert truth["arm"] < truth["arm_task"] - 0.1


def test_switches_to_the_clearly_better_candidate() -> None:
    """The best arm depends on the task alone and the embedding is noise: the per-task arm
    means learn it at once while the linear models explore the noise; the selector switches."""
    values = [{"a": 0.9, "b": 0.2, "c": 0.2}, {"a": 0.2, "b": 0.9, "c": 0.2}]
    policy = _selector()
    _serve(policy, _stream(3000, values, noise_dim=64))
    assert policy.serving == "arm_task"
    (switch,) = policy.switches
    assert (switch.old, switch.new) == ("correctness_ucb", "arm_task")
    assert switch.lower > 0 and switch.at >= policy.min_scored


@pytest.mark.parametrize("seed", [0, 1])
def test_does_not_switch_on_noise(seed: int) -> None:
    """Every arm is as good as the other everywhere: every candidate has the same value and
    the serving one stays."""
    values = [{"a": 0.6, "b": 0.6}, {"a": 0.6, "b": 0.6}]
    policy = _selector(seed=seed)
    _serve(policy, _stream(3000, values, seed=seed))
    assert policy.switches == ()
    assert policy.serving == "correctness_ucb"


def test_two_instances_fed_the_same_log_select_the_same_candidate() -> None:
    """One instance serves; another, drawing with another seed, learns the same outcomes in
    the same order: the same scores, switches and serving candidate, bit for bit."""
    values = [{"a": 0.9, "b": 0.2, "c": 0.2}, {"a": 0.2, "b": 0.9, "c": 0.2}]
    serving, follower, log = _selector(seed=1), _selector(seed=2), []
    _serve(serving, _stream(2000, values, noise_dim=64), log)
    for arm, x, correct, propensity in log:
        follower.learn(arm, x, correct, 1e-4, propensity, PRICING)
    assert follower.scores() == serving.scores()
    assert follower.switches == serving.switches and serving.switches
    assert follower.serving == serving.serving


def test_a_checkpoint_mid_stream_continues_identically() -> None:
    values = [{"a": 0.9, "b": 0.2, "c": 0.2}, {"a": 0.2, "b": 0.9, "c": 0.2}]
    stream = list(_stream(2400, values, noise_dim=16))
    policy = _selector(seed=3)
    _serve(policy, stream[:1200])
    restored = loads(policy.dumps())
    assert type(restored) is Selector and restored.dumps() == policy.dumps()
    assert restored.context.layout == LAYOUT
    assert _serve(restored, stream[1200:]) == _serve(policy, stream[1200:])
    assert restored.scores() == policy.scores() and restored.switches == policy.switches
    assert restored.dumps() == policy.dumps()


def test_merge_adds_the_scores_and_every_candidates_statistics() -> None:
    values = [{"a": 0.8, "b": 0.3}, {"a": 0.3, "b": 0.8}]
    stream = list(_stream(600, values))
    left, right = _selector(seed=4), _selector(seed=5)
    _serve(left, stream[:300])
    _serve(right, stream[300:])
    merged = left.merge(right)
    assert merged.n_scored == 600 and merged.n_updates == 600
    for name in ("arm", "arm_task", "correctness_ucb", "linucb"):
        both = left.candidate(name).merge(right.candidate(name))
        both.context = merged.context
        assert merged.candidate(name).dumps() == both.dumps()
    values_sum = {s.name: s.value * 600 for s in merged.scores()}
    parts = {s.name: s.value * 300 for s in left.scores()}
    for s in right.scores():
        assert values_sum[s.name] == pytest.approx(parts[s.name] + s.value * 300)


def test_an_outcome_without_propensity_teaches_but_scores_nothing() -> None:
    policy = _selector()
    x = _context(np.random.default_rng(0), 0, 4)
    policy.learn("a", x, 1.0, 1e-4)  # e.g. a full-information warm start
    assert policy.n_scored == 0 and policy.n_updates == 1
    assert policy.mean_costs() == {"a": 1e-4}
    assert all(policy.candidate(s.name).n_updates == 1 for s in policy.scores())
    with pytest.raises(ValueError, match="propensity"):
        policy.learn("a", x, 1.0, 1e-4, 0.0, PRICING)


def test_the_bench_gives_every_outcome_its_propensity_and_pricing() -> None:
    """``metallm bench`` teaches the selector as the service does: every outcome, failed calls
    included, comes with the decision's propensity and λ, so every one is scored."""
    from evaluation.bench import Problem, simulate
    from service.outcomes import read_outcomes

    records = read_outcomes(Path(__file__).parent / "data" / "gsm8k_outcomes.jsonl")[:300]
    contexts = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    problem = Problem.from_records(records, contexts)
    policy = Selector(seed=0, min_scored=50)
    result = simulate(problem, policy, 0, delay=20, lam=0.1, cost_unit=0.001)
    assert policy.n_scored == policy.n_updates == 300
    assert all(s.n == 300 for s in policy.scores())
    assert len(result.choices) == 300


def test_each_candidate_learns_what_it_would_alone() -> None:
    """Scoring a candidate on an outcome reads its state and never changes what it learns:
    after a stream of scored outcomes, the linear candidates are, byte for byte, the policies
    taught the same outcomes alone (d = 70, three arms)."""
    policy = _selector(min_scored=10**6)
    alone = {
        "correctness_ucb": CorrectnessUCB(seed=0),
        "linucb": LinUCB(alpha=0.1, epsilon=0.02, seed=0),
    }
    for c in alone.values():
        c.context = policy.context
    rng = np.random.default_rng(3)
    arms, pricing = ["a", "b", "c"], Pricing(0.3, 0.001)
    for x, truth, u in _stream(600, [{"a": 0.8, "b": 0.5, "c": 0.3}] * 4, noise_dim=64):
        arm = arms[int(rng.integers(3))]
        correct, cost = float(u < truth[arm]), 1e-4 * (1 + arms.index(arm))
        policy.learn(arm, x, correct, cost, 1 / 3, pricing)
        alone["correctness_ucb"].learn(arm, x, correct, cost)
        alone["linucb"].update(arm, x, correct - 0.3 * cost / 0.001)
    assert policy.n_scored == 600
    for name, c in alone.items():
        assert policy.candidate(name).dumps() == c.dumps()
