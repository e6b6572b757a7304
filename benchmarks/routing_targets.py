"""The routing targets, measured with the service's defaults, today's policy next to the new one.

    .venv/bin/python benchmarks/routing_targets.py            # ~1 h on 2 cores
    .venv/bin/python benchmarks/routing_targets.py --seeds 1 --policies correctness_ucb

Each file goes through `metallm bench` exactly as a user runs it — cold start, rewards delayed
100 queries, 5 seeds, the λ sweep, the service's defaults (METALLM_POLICY_PARAMS, the context
layout, λ and cost unit) — once per policy: LinUCB (today's default), correctness_ucb (learns
correctness, prices each arm with its running mean cost at decision time) and auto (the selector
of service/policy/selector.py: correctness_ucb, LinUCB and the per-task and overall arm means
learn together, scored off-policy; the confidently best serves). Per file and policy
it prints the APGR, the cost at 95 % of the best arm's accuracy, and the "never dominated"
margins, by the mean over seeds:

- **at the default λ**: the worst ``router accuracy − arm accuracy`` (points) over the single
  arms that cost less than the router; negative means an arm is cheaper AND more accurate;
- **on the curve**: the worst ``curve(arm's cost) − arm accuracy`` (points) over every single
  arm, where ``curve`` is the router's accuracy–cost curve (its λ-sweep points, made
  non-decreasing and linearly interpolated — mixing two λ reaches any point between — and flat
  beyond its ends); below −1 means an arm lies more than a point above the curve at its own cost.

A fourth row, "demo warm start", is the demo's outcomes as `make demo` meets them: the 200
queries it streams, after a full-information warm start on the recorded outcomes of the 120
others (disjoint; producers/demo.py). ``--params JSON`` adds parameters to every policy's (e.g.
``{"drift": 10}``); such a run does not overwrite the results file.

Targets (the routing issue): gsm8k APGR ≥ 0.60 and 95 % at ≤ 60 % of the best arm's cost; the
9-arm file (`benchmarks/data/llmrouter_outcomes.jsonl`) APGR ≥ 0.90 and 95 % at ≤ 25 %; the
demo's outcomes: the router at or above the best arm's accuracy at ≤ 70 % of its cost; never
dominated on every file (both margins ≥ 0 and ≥ −1 point).

Prints a markdown table and writes benchmarks/results/routing_targets.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "routing_targets.md"

FILES = [
    ("gsm8k", "tests/policy/data/gsm8k_outcomes.jsonl"),
    ("9-arm (LLMRouter)", "benchmarks/data/llmrouter_outcomes.jsonl"),
    ("demo outcomes", "producers/data/demo_outcomes.jsonl"),
]
#: `make demo` streams the first DEMO_STREAMED queries of the demo's outcomes and warm-starts
#: from the recorded outcomes of the others (producers/demo.py): the warm-start variant
DEMO_STREAMED = 200
WARM_DEMO = "demo warm start"
POLICIES = ("linucb", "correctness_ucb", "auto")
#: On top of the service's METALLM_POLICY_PARAMS (α 0.1 and ε 0.02, chosen for LinUCB), the
#: parameters a policy needs (correctness_ucb's α is in units of a right/wrong outcome's noise:
#: its own default, 0.5, adds about one posterior standard deviation)
PARAMS = {"correctness_ucb": {"alpha": 0.5}, "auto": {"alpha": 0.5}}


def bench(
    path: str, policy: str, seeds: int, out: Path, extra: dict | None = None, warm: float = 0.0
) -> dict:
    cmd = [sys.executable, "-m", "app.cli", "--log-level", "WARNING", "bench", path]
    cmd += ["--delay", "100", "--seeds", str(seeds), "--policy", policy]
    cmd += ["--policy-params", json.dumps({**PARAMS.get(policy, {}), **(extra or {})})]
    if warm:
        cmd += ["--warm-start", str(warm)]
    cmd += ["--no-plots", "--quiet", "--no-baselines", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "results.json").read_text())


def warm_demo_file(tmp: Path) -> tuple[str, float]:
    """The demo's outcomes as `make demo` meets them: the queries it does not stream first
    (the warm-start part), then the streamed ones; with the warm-start fraction."""
    lines = (ROOT / FILES[2][1]).read_text(encoding="utf-8").splitlines()
    path = tmp / "demo_warm.jsonl"
    path.write_text("\n".join(lines[DEMO_STREAMED:] + lines[:DEMO_STREAMED]) + "\n")
    return str(path), (len(lines) - DEMO_STREAMED) / len(lines)


def curve_at(points: list[dict], cost: float) -> float:
    """The router's curve (non-decreasing, interpolated, flat beyond its ends) at ``cost``."""
    pts = sorted((p["total_cost"], p["accuracy"]) for p in points)
    xs = np.array([c for c, _ in pts])
    ys = np.maximum.accumulate(np.array([a for _, a in pts]))
    return float(np.interp(cost, xs, ys))


def margins(r: dict) -> tuple[float, float]:
    """(worst margin at the default λ, worst margin on the curve), in accuracy points."""
    m = r["methods"]
    router_acc = m["router"]["accuracy"]["mean"]
    router_cost = m["router"]["total_cost"]["mean"]
    at_lambda, on_curve = float("inf"), float("inf")
    for arm in r["arms"]:
        acc = m[f"arm: {arm}"]["accuracy"]["mean"]
        cost = m[f"arm: {arm}"]["total_cost"]["mean"]
        if cost < router_cost:
            at_lambda = min(at_lambda, 100 * (router_acc - acc))
        on_curve = min(on_curve, 100 * (curve_at(r["sweep"]["router"], cost) - acc))
    return at_lambda, on_curve


def pct(v: float | None) -> str:
    return "not reached" if v is None else f"{v:.1f} %"


def row(name: str, policy: str, r: dict) -> str:
    m = r["methods"]
    best, router = r["best_arm"], m["router"]
    curve = r["curves"]["router"]
    best_acc = m[f"arm: {best}"]["accuracy"]["mean"]
    at_lambda, on_curve = margins(r)
    at = "no cheaper arm" if at_lambda == float("inf") else f"{at_lambda:+.1f}"
    return (
        f"| {name} | {policy} | {curve['apgr']:.3f} | {pct(curve['cost_at_95_pct'])} | "
        f"{router['accuracy']['mean']:.1%} ± {router['accuracy']['std']:.1%} | "
        f"{router['cost_pct_of_best_arm']['mean']:.1f} % | {best_acc:.1%} | {at} | "
        f"{on_curve:+.1f} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--files", default=None, help="comma-separated names' prefixes")
    parser.add_argument(
        "--params", type=json.loads, default=None, help="JSON added to every policy's parameters"
    )
    args = parser.parse_args()
    policies = args.policies.split(",")
    files = [
        (name, path)
        for name, path in [*FILES, (WARM_DEMO, "")]
        if args.files is None or any(name.startswith(f) for f in args.files.split(","))
    ]
    lines = [
        "| file | policy | APGR | cost at 95 % of the best arm's accuracy | accuracy at the "
        "default λ | its cost, % of the best arm's | best arm's accuracy | never dominated: "
        "worst margin at the default λ (points) | on the curve (points) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    layout, params = "", {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, path) in enumerate(files):
            warm = 0.0
            if name == WARM_DEMO:
                path, warm = warm_demo_file(Path(tmp))
            for policy in policies:
                out = Path(tmp) / f"{i}-{policy}"
                result = bench(path, policy, args.seeds, out, args.params, warm)
                lines.append(row(name, policy, result))
                print(lines[-1], file=sys.stderr, flush=True)
                layout = result["config"]["context_layout"]
                params[policy] = result["config"]["policy_params"]
    text = (
        "# Routing targets, measured\n\n"
        f"Cold start, delay 100, {args.seeds} seed(s), the λ sweep; parameters "
        f"{json.dumps(params)} (the service's, plus the priced policies' α; their other defaults); "
        f"context `{layout}`. "
        "Margins: see `benchmarks/routing_targets.py` (≥ 0 at the default λ and ≥ −1 on the "
        "curve is never dominated).\n\n" + "\n".join(lines) + "\n"
    )
    full = args.seeds == 5 and args.files is None and set(policies) == set(POLICIES)
    if full and args.params is None:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
