"""Conservative mode (service/policy/conservative.py), measured: the router with and without a
baseline arm (the file's most accurate arm) and tolerance δ, on gsm8k and the demo's outcomes.

    .venv/bin/python benchmarks/conservative.py              # ~3 min on 2 cores
    .venv/bin/python benchmarks/conservative.py --tolerance 0.1 --seeds 1

Each run is `metallm bench FILE --baseline best --tolerance δ` (cold start, delay 100, the
service's defaults; correctness_ucb at α 0.5 as in routing_targets.py) next to the same run
without `--baseline`. Per file it prints accuracy and cost at the default λ, APGR, and the
constraint, measured on the realised rewards (mean over seeds): the worst ratio over the stream
of the router's cumulative reward to the baseline arm's (from query 20 on, where a ratio means
something), and how many queries the ratio spent below ``1 − δ``.

Prints a markdown table and writes benchmarks/results/conservative.md (with 5 seeds).
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
OUT = ROOT / "benchmarks" / "results" / "conservative.md"
FILES = [
    ("gsm8k", "tests/policy/data/gsm8k_outcomes.jsonl"),
    ("demo outcomes", "producers/data/demo_outcomes.jsonl"),
]
PARAMS = {"alpha": 0.5}


def bench(path: str, seeds: int, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "app.cli", "--log-level", "WARNING", "bench", path]
    cmd += ["--delay", "100", "--seeds", str(seeds), "--policy", "correctness_ucb"]
    cmd += ["--policy-params", json.dumps(PARAMS), "--no-plots", "--quiet", "--no-baselines"]
    cmd += ["--out", str(out), *extra]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "results.json").read_text())


def constraint(r: dict, tolerance: float, skip: int = 20) -> tuple[float, int]:
    """(worst cumulative ratio router / baseline arm from query ``skip`` on, queries below
    ``1 − tolerance``)."""
    router = np.array(r["cumulative_reward"]["router"])
    base = np.array(r["cumulative_reward"][f"arm: {r['best_arm']}"])
    ratio = router[skip:] / np.maximum(base[skip:], 1e-9)
    return float(ratio.min()), int(np.sum(ratio < 1 - tolerance))


def row(name: str, mode: str, r: dict, tolerance: float) -> str:
    router = r["methods"]["router"]
    worst, below = constraint(r, tolerance)
    return (
        f"| {name} | {mode} | {router['accuracy']['mean']:.1%} | "
        f"{router['cost_pct_of_best_arm']['mean']:.1f} % | {r['curves']['router']['apgr']:.3f} | "
        f"{worst:.3f} | {below} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--tolerance", type=float, default=0.05)
    args = parser.parse_args()
    lines = [
        "| file | router | accuracy | cost, % of the best arm's | APGR | worst cumulative "
        "reward / the baseline's | queries below 1 − δ |",
        "|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, path) in enumerate(FILES):
            for mode, extra in (
                ("unconstrained", []),
                (
                    f"conservative, δ = {args.tolerance}",
                    ["--baseline", "best", "--tolerance", str(args.tolerance)],
                ),
            ):
                r = bench(path, args.seeds, Path(tmp) / f"{i}-{len(extra)}", extra)
                lines.append(row(name, mode, r, args.tolerance))
                print(lines[-1], file=sys.stderr, flush=True)
    text = (
        "# Conservative mode, measured\n\n"
        f"Cold start, delay 100, {args.seeds} seed(s), correctness_ucb {json.dumps(PARAMS)}, "
        "the baseline = the file's most accurate arm; the ratio is of realised rewards at the "
        "default λ, mean over seeds, from query 20 on.\n\n" + "\n".join(lines) + "\n"
    )
    if args.seeds == 5:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
