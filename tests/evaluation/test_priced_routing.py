"""Replays of the priced router (correctness_ucb) through the benchmark: it finds the arm a
declared category calls for, and where no context helps it matches the best single arm."""

from __future__ import annotations

import numpy as np

from evaluation.bench import BenchConfig, Problem, run_bench, stream_contexts
from service.outcomes import OutcomeRecord

PRICES = {"cheap": 1e-4, "mid": 4e-4, "dear": 1e-3}


def stream(accuracy, n: int, seed: int, dim: int = 8) -> tuple[list[OutcomeRecord], np.ndarray]:
    """``n`` queries with a ``subject`` out of four; ``accuracy(arm, subject)`` is the chance
    that an arm is right; random unit embeddings (they carry nothing)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        subject = int(rng.integers(4))
        arms = {
            arm: {
                "prediction": "yes" if rng.random() < accuracy(arm, subject) else "no",
                "cost_usd": price,
            }
            for arm, price in PRICES.items()
        }
        records.append(
            OutcomeRecord.model_validate(
                {
                    "query_id": f"q{i}",
                    "task": "qa",
                    "text": "x" * int(rng.integers(20, 200)),
                    "label": "yes",
                    "metadata": {"subject": f"s{subject}"},
                    "arms": arms,
                }
            )
        )
    E = rng.normal(size=(n, dim))
    return records, E / np.linalg.norm(E, axis=1, keepdims=True)


def bench(records, embeddings, features=()) -> tuple[Problem, BenchConfig, dict]:
    config = BenchConfig(
        delay=20,
        lam=0.1,
        seeds=[0, 1],
        lambdas=None,
        baselines=False,
        policy="correctness_ucb",
        features=features,
    )
    contexts = stream_contexts(records, embeddings, config.new_context())
    problem = Problem.from_records(records, contexts, embeddings)
    return problem, config, run_bench(problem, config).router_runs


def test_the_router_finds_the_arm_a_declared_category_calls_for() -> None:
    # cheap is good on subjects 0-1 only; dear is good everywhere: priced at λ = 0.1, the
    # best choice is cheap on 0-1 and dear on 2-3
    def accuracy(arm: str, subject: int) -> float:
        return {"cheap": 0.9 if subject < 2 else 0.3, "mid": 0.5, "dear": 0.85}[arm]

    records, E = stream(accuracy, 1500, seed=0)
    problem, _, runs = bench(records, E, features=["subject:categorical"])
    subjects = np.array([int(r.metadata["subject"][1]) for r in records])
    late = np.arange(750, 1500)
    arms = problem.arms
    for run in runs.values():
        picked = np.array(arms)[run.choices[late]]
        low, high = subjects[late] < 2, subjects[late] >= 2
        assert (picked[low] == "cheap").mean() > 0.85
        assert (picked[high] == "dear").mean() > 0.85


def test_where_no_context_helps_the_router_matches_the_best_single_arm() -> None:
    def accuracy(arm: str, subject: int) -> float:
        return {"cheap": 0.55, "mid": 0.8, "dear": 0.85}[arm]

    records, E = stream(accuracy, 1500, seed=1)
    problem, config, runs = bench(records, E)  # the subject is not declared (and useless)
    late = np.arange(500, 1500)
    rewards = problem.rewards(config.lam, config.cost_unit)[late]
    best = rewards.mean(axis=0).max()  # mid: 0.8 − 0.04
    for run in runs.values():
        router = rewards[np.arange(len(late)), run.choices[late]].mean()
        assert router > best - 0.03
