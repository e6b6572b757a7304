"""The routing targets, measured with the service's own defaults on every outcomes file we have.

    .venv/bin/python benchmarks/routing_targets.py            # ~5-10 min on 2 cores

Each file goes through `metallm bench` exactly as a user runs it — cold start, rewards delayed
100 queries, 5 seeds, the λ sweep, the defaults of `metallm serve` (METALLM_POLICY,
METALLM_POLICY_PARAMS, METALLM_CONTEXT_*), a file's declared feature where it has one — and
the figures are compared with the targets of the routing issue:

- gsm8k (GPT-4 vs Mixtral): APGR ≥ 0.62, and 95 % of GPT-4's accuracy at ≤ 60 % of its cost;
- the demo's recorded outcomes: the router (at the default λ) at or above the best single arm's
  accuracy at ≤ 70 % of its cost; also with the 200 queries and ~32-query label delay that
  `make demo` streams;
- the BIG-bench recordings (`--feature subject:categorical`): reported, no target (both local
  models are weak there).

Prints a markdown table and writes benchmarks/results/routing_targets.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "routing_targets.md"

RUNS = [
    ("gsm8k", "tests/policy/data/gsm8k_outcomes.jsonl", []),
    ("demo outcomes", "producers/data/demo_outcomes.jsonl", []),
    ("`make demo` stream", "producers/data/demo_outcomes.jsonl", ["--limit", "200"]),
    ("bigbench", "benchmarks/data/bigbench_outcomes.jsonl", ["--feature", "subject:categorical"]),
    ("bigbench2", "benchmarks/data/bigbench2_outcomes.jsonl", ["--feature", "subject:categorical"]),
]


def bench(path: str, extra: list[str], out: Path) -> dict:
    delay = "32" if "--limit" in extra else "100"
    cmd = [sys.executable, "-m", "app.cli", "--log-level", "WARNING", "bench", path]
    cmd += ["--delay", delay, "--seeds", "5", "--no-plots", "--quiet", "--out", str(out), *extra]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "results.json").read_text())


def pct(v: float | None) -> str:
    return "not reached" if v is None else f"{v:.1f} %"


def row(name: str, r: dict) -> str:
    m = r["methods"]
    best, router = r["best_arm"], m["router"]
    curve = r["curves"]["router"]
    best_acc = m[f"arm: {best}"]["accuracy"]["mean"]
    return (
        f"| {name} | {r['n_evaluated']} | {curve['apgr']:.3f} | "
        f"{r['curves'].get('linucb-offline', {}).get('apgr', float('nan')):.3f} | "
        f"{pct(curve['cost_at_95_pct'])} | {router['accuracy']['mean']:.1%} ± "
        f"{router['accuracy']['std']:.1%} | {router['cost_pct_of_best_arm']['mean']:.1f} % | "
        f"{best} {best_acc:.1%} |"
    )


def main() -> int:
    lines = [
        "| file | queries | router APGR | offline LinUCB APGR | router cost at 95 % of the best "
        "arm's accuracy | router accuracy at the default λ | its cost, % of the best arm's | "
        "best arm |",
        "|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, path, extra) in enumerate(RUNS):
            if not (ROOT / path).exists():
                continue
            result = bench(path, extra, Path(tmp) / str(i))
            lines.append(row(name, result))
            print(lines[-1], file=sys.stderr)
            if i == 0:
                layout = result["config"]["context_layout"]
                config = result["config"]
                policy = f"{config['policy']} {json.dumps(config['policy_params'])}"
    text = (
        "# Routing targets, measured\n\nCold start, delay 100 (the `make demo` stream: 200 "
        f"queries, delay 32), 5 seeds; policy {policy}; context `{layout}` (plus the subject "
        "feature on the BIG-bench files). On the BIG-bench files both arms score alike "
        "(the gain an APGR divides by is within noise), so their APGR says little.\n\n"
        + "\n".join(lines)
        + "\n"
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
