"""Checkpoints of the priced policies written by older code load into the same policies.

``data/checkpoints/priced/{kind}.ckpt`` were written by the code of commit c0e2d3c (before one
class kept every arm's running cost, :class:`~service.policy.base.RunningCosts`), each after
150 outcomes of :func:`run` (seed 1) on contexts of ``LAYOUT``; ``expected.json`` holds what
each did then on the probes of :func:`probe` (choices with their probabilities and scores, the
mean costs, the selector's scores), and again after 60 more outcomes (seed 2). Loaded now, each
does exactly the same, float for float, before and after learning more, and so does the policy
stored again in today's format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.context import ContextLayout, Feature
from service.policy import Pricing, RoutingPolicy, loads

DATA = Path(__file__).parent / "data" / "checkpoints" / "priced"
LAYOUT = ContextLayout(
    embedding="raw",
    task_buckets=4,
    feature_buckets=4,
    features=(Feature("subject", "categorical"),),
)
EMB = 6
ARMS = ["small", "large", "mid"]


def _stream(n: int, seed: int):
    """(context, uniforms, failure draw) rows; the context's blocks filled as in c0e2d3c."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        x = np.zeros(LAYOUT.dim(EMB))
        x[LAYOUT.block("bias")], x[LAYOUT.block("length")] = 1.0, rng.normal()
        x[LAYOUT.block("task").start + rng.integers(4)] = 1.0
        x[LAYOUT.block("feature:subject").start + rng.integers(4)] = 1.0
        x[LAYOUT.block("embedding")] = rng.normal(size=EMB) / np.sqrt(EMB)
        yield x, rng.random(3), rng.random()


def run(policy: RoutingPolicy, n: int, seed: int) -> None:
    """Serve ``n`` queries priced at λ = 0.3; one call in ten fails (its cost unknown)."""
    pricing = Pricing(0.3, 0.001)
    truth = {"small": 0.4, "large": 0.85, "mid": 0.6}
    price = {"small": 1e-4, "large": 9e-4, "mid": 3e-4}
    for x, u, fail in _stream(n, seed):
        c = policy.choose(ARMS, x, pricing=pricing)  # type: ignore[call-arg]
        correct = float(u[0] < truth[c.arm] + 0.1 * x[1])
        cost = None if fail < 0.1 else price[c.arm] * (1 + u[1])
        policy.learn(c.arm, x, correct, cost, c.propensity, pricing)


def probe(policy: RoutingPolicy) -> dict:
    """Choices on six contexts at two prices and none, the mean costs, the selector's scores."""
    choices = []
    for x, _, _ in _stream(6, 99):
        for pricing in (Pricing(0.3, 0.001), Pricing(2.0, 0.001), None):
            c = policy.choose(ARMS, x, pricing=pricing)  # type: ignore[call-arg]
            choices.append({"arm": c.arm, "probabilities": c.probabilities, "scores": c.scores})
    scores = None
    if policy.kind == "auto":
        scores = [
            [float(s.n), s.value, s.stderr, s.gain, s.gain_lower]
            for s in policy.scores()  # type: ignore[attr-defined]
        ]
    return {
        "choices": choices,
        "mean_costs": policy.mean_costs(),  # type: ignore[attr-defined]
        "n_updates": policy.n_updates,
        "scores": scores,
        "serving": getattr(policy, "serving", None),
    }


@pytest.mark.parametrize("kind", ["correctness_ucb", "arm_means", "auto"])
def test_priced_checkpoints_on_file_load_bit_for_bit(kind: str) -> None:
    expected = json.loads((DATA / "expected.json").read_text())[kind]
    stored = (DATA / f"{kind}.ckpt").read_bytes()
    for policy in (loads(stored), loads(loads(stored).dumps())):
        assert policy.kind == kind
        assert probe(policy) == expected["loaded"]  # exact: == on every float
        run(policy, 60, 2)
        assert probe(policy) == expected["after_more"]
