"""Drift: how many queries the router takes to move off an arm that got worse or dearer.

    .venv/bin/python benchmarks/drift.py               # ~2 min
    .venv/bin/python benchmarks/drift.py --seeds 1 --drift 5

The stream (evaluation/synthetic.py): 5,000 queries, 3 arms; at query 2,000 the best arm's
accuracy drops 0.90 → 0.60, or its price is multiplied by 10 (either makes it worse than the
second arm at the default λ). The router is the default policy (correctness_ucb, α 0.5,
ε 0.02) with drift off (``drift: 0``) and on (``drift`` = the CUSUM threshold, 10 by default:
service/policy/drift.py), replayed by the bench's own protocol (cold start, rewards revealed
100 queries late, each arm's cost estimated from its own calls). The figure: queries after the
change until the arm's share over the last 100 queries is at most half its share over the 500
before the change (mean and worst over seeds). Target: ≤ 500 for both changes.

Prints a markdown table and writes benchmarks/results/drift.md (with 5 seeds).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.bench import simulate  # noqa: E402
from evaluation.synthetic import drift_problem, queries_to_halve  # noqa: E402
from service.policy import make_policy  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "drift.md"
N, CHANGE_AT, DELAY = 5000, 2000, 100


def run(kind: str, drift: float, seed: int) -> tuple[int | None, float, int]:
    """(queries to halve, the arm's share before the change, the detector's alarms)."""
    problem = drift_problem(N, CHANGE_AT, kind, seed)
    params = {"alpha": 0.5, "epsilon": 0.02, "seed": seed, "drift": drift}
    policy = make_policy("correctness_ucb", **params)
    result = simulate(problem, policy, 0, DELAY, 0.1, 0.001)
    share = float(np.mean(result.choices[CHANGE_AT - 500 : CHANGE_AT] == 0))
    alarms = 0 if policy.detector is None else policy.detector.alarms
    return queries_to_halve(result.choices, 0, CHANGE_AT), share, alarms


def cell(values: list[int | None]) -> str:
    if any(v is None for v in values):
        return f"not within {N - CHANGE_AT} on {sum(v is None for v in values)} seed(s)"
    return f"{np.mean(values):.0f} (worst {max(values)})"  # type: ignore[type-var]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--drift", type=float, default=10.0, help="the threshold to measure (10)")
    args = parser.parse_args()
    lines = [
        "| change at query 2,000 | router | queries to halve its share | its share before | "
        "detector alarms (mean) |",
        "|---|---|---|---|---|",
    ]
    for kind, what in (("accuracy", "accuracy 0.90 → 0.60"), ("price", "price × 10")):
        for drift in (0.0, args.drift):
            runs = [run(kind, drift, seed) for seed in range(args.seeds)]
            mode = "drift off (`drift: 0`)" if drift == 0 else f"drift = {drift:g} (default)"
            lines.append(
                f"| {what} | {mode} | {cell([r[0] for r in runs])} | "
                f"{np.mean([r[1] for r in runs]):.0%} | {np.mean([r[2] for r in runs]):.1f} |"
            )
            print(lines[-1], file=sys.stderr, flush=True)
    text = (
        "# Drift, measured\n\n"
        f"{N:,} queries, 3 arms, the change at query {CHANGE_AT:,}, rewards {DELAY} queries "
        f"late, {args.seeds} seed(s); correctness_ucb α 0.5, ε 0.02, λ 0.1. Target: the "
        "changed arm's share halves within 500 queries.\n\n" + "\n".join(lines) + "\n"
    )
    if args.seeds == 5:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
