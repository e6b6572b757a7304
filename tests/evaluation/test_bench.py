"""The replay benchmark: delayed reveal order, the oracle bound, baselines, sweeps, budget mode."""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import pytest

from evaluation.bench import (
    BenchConfig,
    BenchError,
    Problem,
    make_router,
    run_bench,
    simulate,
)
from service.outcomes import OutcomeRecord
from service.policy import LinUCB
from service.reward import reward

GPT4, MIXTRAL = "gpt-4-1106-preview", "mixtral-8x7b-instruct"


def two_topics(n: int, seed: int = 0, fail_every: int = 0) -> Problem:
    """Queries from two topics (clear in the embedding): the cheap arm is right on topic A
    only, the expensive one on topic B only. A contextual router can be right everywhere; a
    non-contextual one at most about half the time."""
    rng = np.random.default_rng(seed)
    topic = rng.integers(2, size=n)
    centers = np.eye(8)[[0, 1]] * 3.0
    X = (centers[topic] + rng.normal(scale=0.3, size=(n, 8))).astype(np.float32)
    records = []
    for i, t in enumerate(topic):
        cheap_ok, big_ok = t == 0, t == 1
        failed = fail_every and i % fail_every == fail_every - 1
        records.append(
            OutcomeRecord.model_validate(
                {
                    "query_id": f"q{i}",
                    "text": f"query {i}",
                    "label": "yes",
                    "arms": {
                        "cheap": {"prediction": "yes" if cheap_ok else "no", "cost_usd": 0.0001},
                        "big": {
                            "prediction": None if failed else ("yes" if big_ok else "no"),
                            "cost_usd": 0.001,
                        },
                    },
                }
            )
        )
    return Problem.from_records(records, X)


class Spy:
    """A real LinUCB behind a recorder that logs what it is asked, identifying queries by
    their context."""

    def __init__(self, **kw) -> None:
        self.policy = LinUCB(**kw)
        self.log: list[tuple[str, int, float | None]] = []

    def choose_many(self, arm_ids, contexts):
        self.log.append(("choose", int(round(contexts[0, -1])), None))
        return self.policy.choose_many(arm_ids, contexts)

    def update(self, arm_id, context, reward):
        self.log.append(("update", int(round(float(context[-1]))), reward))
        self.policy.update(arm_id, context, reward)


def learned_after_each_decision(log: list[tuple[str, int, float | None]]) -> list[list[int]]:
    """A spy's log as, for each decision in turn, the queries it learned before the next."""
    out: list[list[int]] = []
    for kind, t, _ in log:
        if kind == "choose":
            out.append([])
        else:
            out[-1].append(t)
    return out


def simulated_reveal_order(n: int, delay: int, failed: Collection[int] = ()) -> list[list[int]]:
    """What :func:`simulate` has a policy learn after each decision, on a stream of ``n``
    queries where every arm's call failed on the queries in ``failed`` (and on no other)."""
    records = []
    for i in range(n):
        outcome = {"prediction": None if i in failed else "yes", "cost_usd": 0.0}
        records.append(
            OutcomeRecord.model_validate(
                {
                    "query_id": f"q{i}",
                    "text": f"query {i}",
                    "label": "yes",
                    "arms": {"a": outcome, "b": outcome},
                }
            )
        )
    problem = Problem.from_records(records, np.arange(n, dtype=np.float32)[:, None])
    spy = Spy(seed=0)
    simulate(problem, spy, 0, delay, 0.1, 0.001)
    return learned_after_each_decision(spy.log)


def test_reveal_order_by_hand() -> None:
    assert simulated_reveal_order(5, 2) == [[], [], [0], [1], [2, 3, 4]]
    assert simulated_reveal_order(3, 0) == [[0], [1], [2]]
    assert simulated_reveal_order(3, 10) == [[], [], [0, 1, 2]]
    # a failed call is learned at once; the others keep their place in the queue
    assert simulated_reveal_order(5, 1, failed={2}) == [[], [0], [2, 1], [], [3, 4]]
    assert simulated_reveal_order(4, 2, failed={1}) == [[], [1], [0], [2, 3]]


@pytest.mark.parametrize("delay", [0, 1, 7])
def test_rewards_are_revealed_delay_queries_later_in_order(delay: int) -> None:
    problem = two_topics(40, fail_every=6)
    problem.contexts[:, -1] = np.arange(problem.n)  # the query's index, for the spy
    lam, unit = 0.5, 0.001
    spy = Spy(seed=3)
    result = simulate(problem, spy, 0, delay, lam, unit)

    failed = problem.failed[np.arange(problem.n), result.choices]
    learned_after = learned_after_each_decision(spy.log)
    assert len(learned_after) == problem.n
    last = problem.n - 1
    for t, learned in enumerate(learned_after):
        # a failed call's reward right after its own decision, then the others delay
        # decisions later (the rest after the last decision), oldest first
        due = [s for s in range(problem.n) if (s if failed[s] else min(s + delay, last)) == t]
        assert learned == sorted(due, key=lambda s: not failed[s]), t
    assert failed.any()  # the failure path really ran
    for kind, s, r in spy.log:
        if kind == "update":
            j = result.choices[s]
            if problem.failed[s, j]:  # as the service: wrong, at no cost
                assert r == reward(False, 0.0, lam, unit)
            else:
                assert r == reward(problem.correct[s, j], problem.cost[s, j], lam, unit)


def test_oracle_beats_every_method(gsm8k_problem) -> None:
    records = gsm8k_problem.records[:300]
    problem = Problem.from_records(records, gsm8k_problem.contexts[:300])
    for lam in (0.0, 0.4):
        config = BenchConfig(delay=20, lam=lam, seeds=[0, 1], lambdas=None, offline_folds=3)
        result = run_bench(problem, config)
        oracle = result.methods["oracle"]
        assert oracle["regret"]["max"] == 0.0
        for name, m in result.methods.items():
            assert m["regret"]["min"] >= -1e-9, name
            assert oracle["mean_reward"]["mean"] >= m["mean_reward"]["max"] - 1e-12, name
            if lam == 0.0:  # at λ = 0 the oracle is right whenever any arm is
                assert oracle["accuracy"]["mean"] >= m["accuracy"]["max"], name
        any_right = problem.correct.any(axis=1).mean()
        assert result.methods["oracle"]["accuracy"]["mean"] == pytest.approx(any_right)
    expected = {"router", f"arm: {GPT4}", f"arm: {MIXTRAL}", "oracle", "always-cheapest"}
    expected |= {"random", "linucb-offline", "knn-offline", "river-ucb", "river-thompson"}
    assert set(result.methods) == expected


def test_single_arm_rows_are_the_arms_own_figures(gsm8k_problem) -> None:
    result = run_bench(gsm8k_problem, BenchConfig(lam=0.1, lambdas=None, baselines=False))
    for j, arm in enumerate(gsm8k_problem.arms):
        m = result.methods[f"arm: {arm}"]
        assert m["accuracy"]["mean"] == pytest.approx(gsm8k_problem.correct[:, j].mean())
        assert m["total_cost"]["mean"] == pytest.approx(gsm8k_problem.cost[:, j].sum())
    assert result.best_arm == GPT4 and result.cheapest_arm == MIXTRAL
    assert result.methods[f"arm: {GPT4}"]["cost_pct_of_best_arm"]["mean"] == pytest.approx(100)
    assert round(result.methods[f"arm: {GPT4}"]["accuracy"]["mean"], 4) == 0.8567  # the NOTICE


def test_a_contextual_router_learns_what_the_context_tells() -> None:
    problem = two_topics(600)
    config = BenchConfig(delay=10, lam=0.05, seeds=[0, 1], lambdas=None, offline_folds=3)
    result = run_bench(problem, config)
    m = result.methods
    for seed, run in result.router_runs.items():
        late = run.choices[300:]
        acc = problem.correct[np.arange(300, 600), late].mean()
        assert acc > 0.9, seed  # learned online which arm each topic needs
    assert m["knn-offline"]["accuracy"]["mean"] > 0.95
    assert m["linucb-offline"]["accuracy"]["mean"] > 0.95
    # without the context, no policy can do much better than one arm for everything
    assert m["river-ucb"]["accuracy"]["mean"] < 0.7
    assert m["router"]["accuracy"]["mean"] > m["river-ucb"]["accuracy"]["mean"] + 0.2
    assert m["router"]["regret"]["mean"] < m["random"]["regret"]["mean"] / 3


def test_seeds_reproduce_and_differ() -> None:
    problem = two_topics(200)
    config = BenchConfig(delay=5, seeds=[4, 5], lambdas=None, baselines=False)
    a, b = run_bench(problem, config), run_bench(problem, config)
    for seed in (4, 5):
        np.testing.assert_array_equal(a.router_runs[seed].choices, b.router_runs[seed].choices)
        np.testing.assert_array_equal(
            a.router_runs[seed].propensities, b.router_runs[seed].propensities
        )
    assert not np.array_equal(a.router_runs[4].choices, a.router_runs[5].choices)
    assert a.methods["router"]["runs"] == 2


def test_warm_start_trains_on_the_first_part_and_scores_the_rest() -> None:
    problem = two_topics(400)
    config = BenchConfig(delay=50, lam=0.05, warm_start=0.25, lambdas=None)
    result = run_bench(problem, config)
    assert result.start == 100
    assert len(result.router_runs[0].choices) == 300
    rest = problem.correct[100:]
    assert result.methods["arm: cheap"]["accuracy"]["mean"] == pytest.approx(rest[:, 0].mean())
    # trained with full information, the router is right from its first evaluated query,
    # even though its first 50 rewards are not back yet
    first = result.router_runs[0].choices[:50]
    assert problem.correct[np.arange(100, 150), first].mean() > 0.9
    with pytest.raises(BenchError):
        BenchConfig(warm_start=1.0)


def test_sweep_curve_and_summaries() -> None:
    problem = two_topics(300)
    config = BenchConfig(delay=5, lam=0.1, lambdas=[0.0, 0.5, 5.0, 50.0], seeds=[0, 1])
    result = run_bench(problem, config)
    router = result.sweep["router"]
    assert [p["lambda"] for p in router] == [0.0, 0.5, 5.0, 50.0]
    costs = [p["total_cost"] for p in router]
    assert costs[-1] < costs[0]  # a high price of cost moves traffic to the cheap arm
    assert result.curves["random-mix"]["apgr"] == pytest.approx(0.5)
    assert set(result.curves) == {"router", "knn-offline", "linucb-offline", "random-mix"}
    # here the router beats random mixing and reaches 95 % of the best arm's accuracy
    assert result.curves["router"]["apgr"] > 0.6
    assert result.curves["router"]["cost_at_95_pct"] is not None


def test_default_grid_spans_the_best_arms_cost(gsm8k_problem) -> None:
    from evaluation.bench import DEFAULT_PENALTIES, sweep_lambdas

    config = BenchConfig(cost_unit=0.001)
    grid = sweep_lambdas(gsm8k_problem, 0, config)
    mean_gpt4 = gsm8k_problem.cost[:, 0].mean()
    assert len(grid) == len(DEFAULT_PENALTIES)
    assert grid[-1] * mean_gpt4 / 0.001 == pytest.approx(DEFAULT_PENALTIES[-1], rel=1e-4)


def test_budget_mode_meets_its_target(gsm8k_problem) -> None:
    mean_gpt4 = float(gsm8k_problem.cost[:, 0].mean())
    target = 0.4 * mean_gpt4
    config = BenchConfig(
        delay=100, budget=target, cost_unit=mean_gpt4, lambdas=None, baselines=False
    )
    result = run_bench(gsm8k_problem, config)
    run = result.router_runs[0]
    spent = gsm8k_problem.cost[np.arange(gsm8k_problem.n), run.choices]
    assert spent[660:].mean() == pytest.approx(target, rel=0.15)
    assert run.lams.max() > 0.1  # λ moved to hold the budget


def test_arms_must_match_on_every_line() -> None:
    a = OutcomeRecord.model_validate(
        {
            "query_id": "1",
            "text": "t",
            "label": "x",
            "arms": {
                "p": {"prediction": "x", "cost_usd": 0.0},
                "q": {"prediction": "y", "cost_usd": 0.0},
            },
        }
    )
    b = OutcomeRecord.model_validate(
        {
            "query_id": "2",
            "text": "t",
            "label": "x",
            "arms": {
                "p": {"prediction": "x", "cost_usd": 0.0},
                "r": {"prediction": "y", "cost_usd": 0.0},
            },
        }
    )
    with pytest.raises(BenchError, match="line 2"):
        Problem.from_records([a, b], np.zeros((2, 3)))


class ReadLog(np.ndarray):
    """A cost matrix that records every cell read by (row, column) integer indexing."""

    reads: list[tuple[int, int]]

    def __getitem__(self, key):
        if (
            isinstance(key, tuple)
            and len(key) == 2
            and all(isinstance(k, int | np.integer) for k in key)
        ):
            self.reads.append((int(key[0]), int(key[1])))
        elif not (isinstance(key, tuple) and all(isinstance(k, int | np.integer) for k in key)):
            raise AssertionError(f"the stream read the cost matrix by {key!r}, not cell by cell")
        return super().__getitem__(key)


@pytest.mark.parametrize("policy", ["linucb", "correctness_ucb"])
def test_the_router_never_reads_the_cost_of_an_arm_it_did_not_choose(policy: str) -> None:
    """Choosing uses what the router's own calls cost (their running means); the recorded cost
    of an arm it did not call is never read, neither for choosing nor for learning."""
    problem = two_topics(300, fail_every=7)
    problem.cost = problem.cost.view(ReadLog)
    problem.cost.reads = []
    config = BenchConfig(delay=10, lam=0.5, policy=policy, lambdas=None)
    router = make_router(config, 0)
    result = simulate(problem, router, 0, config.delay, config.lam, config.cost_unit)
    chosen = set(enumerate(result.choices.tolist()))
    assert problem.cost.reads  # the chosen calls' costs were read
    assert set(problem.cost.reads) <= chosen


def test_a_priced_router_learns_correctness_once_for_every_lambda() -> None:
    """The priced router (correctness_ucb) finds each topic's right arm, and a higher λ moves
    traffic to the cheap arm where the expensive one is right too."""
    problem = two_topics(600)
    config = BenchConfig(
        delay=10,
        lam=0.05,
        seeds=[0],
        lambdas=[0.0, 50.0],
        policy="correctness_ucb",
        baselines=False,
    )
    result = run_bench(problem, config)
    late = result.router_runs[0].choices[300:]
    assert problem.correct[np.arange(300, 600), late].mean() > 0.9
    costs = [p["total_cost"] for p in result.sweep["router"]]
    assert costs[1] < costs[0]


def test_a_priced_router_holds_the_budget_within_ten_percent(gsm8k_problem) -> None:
    """Budget mode with a router that prices each choice at the pacer's current λ (and learns
    nothing priced at a stale one): over the second half it spends within ±10 % of the target."""
    mean_gpt4 = float(gsm8k_problem.cost[:, 0].mean())
    target = 0.4 * mean_gpt4
    config = BenchConfig(
        delay=100,
        budget=target,
        cost_unit=mean_gpt4,
        lambdas=None,
        baselines=False,
        policy="correctness_ucb",
    )
    run = run_bench(gsm8k_problem, config).router_runs[0]
    spent = gsm8k_problem.cost[np.arange(gsm8k_problem.n), run.choices]
    assert spent[660:].mean() == pytest.approx(target, rel=0.10)
    assert run.lams.max() > 0.1
