"""Checkpoints of the priced policies written by older code load into the same policies.

``data/checkpoints/priced/{kind}.ckpt`` were written by the code of commit c0e2d3c (before one
class kept every arm's running cost, :class:`~service.policy.base.RunningCosts`), each after
150 outcomes of :func:`run` (seed 1) on contexts of ``LAYOUT``; ``expected.json`` holds what
each did then on the probes of :func:`probe` (choices with their probabilities and scores, the
mean costs, the selector's scores), and again, by that code, after 60 more outcomes taught by
:func:`teach` (seed 2). Loaded now, each does exactly the same, float for float; after learning
more, the same choices and figures to the last bits that a CPU's BLAS kernels round otherwise
(the float32 scorers'; 1.5e-7 between an AVX-512 and an AVX2 kernel); and so does the policy
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


def teach(policy: RoutingPolicy, n: int, seed: int) -> None:
    """Teach ``n`` outcomes logged by a uniform router (each arm in turn, propensity 1/3),
    priced at λ = 0.3; one call in ten fails. The arms taught are not the policy's own
    choices, so what it learns does not hang on its last bits, which a CPU's BLAS kernels
    change (an AVX-512 machine rounds otherwise than an AVX2 one)."""
    pricing = Pricing(0.3, 0.001)
    truth = {"small": 0.4, "large": 0.85, "mid": 0.6}
    price = {"small": 1e-4, "large": 9e-4, "mid": 3e-4}
    for i, (x, u, fail) in enumerate(_stream(n, seed)):
        arm = ARMS[i % len(ARMS)]
        correct = float(u[0] < truth[arm] + 0.1 * x[1])
        cost = None if fail < 0.1 else price[arm] * (1 + u[1])
        policy.learn(arm, x, correct, cost, 1 / len(ARMS), pricing)  # type: ignore[attr-defined]


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


def same_to_rounding(got: object, expected: object, where: str = "") -> None:
    """Assert ``got`` equals ``expected`` (JSON values), floats within 1e-6."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), where
        for key in expected:
            same_to_rounding(got[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            same_to_rounding(g, e, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=1e-6, abs=1e-6), where
    else:
        assert got == expected, where


@pytest.mark.parametrize("kind", ["correctness_ucb", "arm_means", "auto"])
def test_priced_checkpoints_on_file_load_bit_for_bit(kind: str) -> None:
    expected = json.loads((DATA / "expected.json").read_text())[kind]
    stored = (DATA / f"{kind}.ckpt").read_bytes()
    for policy in (loads(stored), loads(loads(stored).dumps())):
        assert policy.kind == kind
        assert probe(policy) == expected["loaded"]  # exact: == on every float
        teach(policy, 60, 2)
        got, want = probe(policy), expected["after_more"]
        # what the outcomes alone decide, exactly; what the float32 scorers give, to rounding
        assert (got["mean_costs"], got["n_updates"]) == (want["mean_costs"], want["n_updates"])
        same_to_rounding(got, want)
