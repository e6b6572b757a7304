"""The mixed-fault soak (issue 25, item 5): two instances under a steady load of queries and
labels for 20 minutes (``--minutes``) while a seeded schedule of faults hits them one at a
time — the broker paused and its connections cut, a private Postgres restarted and its
connections cut, kill -9 of an instance, arm 5xx and timeout bursts, 5 % malformed events —
then the invariants checked and the targets reported (``tests/faults/soak_scenario.py`` runs
it; its docstring details each fault and each figure).

    .venv/bin/python benchmarks/soak.py                       # 20 minutes, writes results/soak.md
    .venv/bin/python benchmarks/soak.py --minutes 4 --rate 8 --seed 3 --out /tmp/soak.md

Invariants: 0 lost queries, 0 LLM calls for an already committed decision, 0 rewards applied
twice, 0 labels left beside their decision, every decision published, every malformed event
in the DLQ, every instance's policy equal to the reward log's replay to 1e-9. Targets:
readiness truthful in ≥ 99 % of the probes (not counting the 5 s after each change of state);
after each fault, decisions flowing again within 30 s of the return (p50 and max per kind); an
instance's resident memory growing ≤ 10 % from minute 5 to the end. Exits 1 if an invariant
is broken (the targets are reported, not asserted).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.faults.soak_scenario import (  # noqa: E402
    FAULTS,
    SETTLE_S,
    SoakFigures,
    SoakPlan,
    broken,
    run,
)

RESULTS = Path(__file__).resolve().parent / "results" / "soak.md"


# --------------------------------------------------------------------------- the report
def _spread(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "–"
    missing = f" ({len(values) - len(known)} never)" if len(known) < len(values) else ""
    return f"{statistics.median(known):.1f} / {max(known):.1f} s{missing}"


def report(f: SoakFigures, args: argparse.Namespace) -> str:
    truthful = f.probes_truthful / f.probes_counted if f.probes_counted else 0.0
    lines = [
        "# Mixed-fault soak",
        "",
        f"`benchmarks/soak.py --minutes {args.minutes:g} --rate {args.rate:g} --seed "
        f"{args.seed}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end): 2 instances, "
        f"{f.queries} queries and {f.labels_published} labels over {f.seconds / 60:.1f} min, "
        f"{f.malformed_published} malformed events, {len(f.faults)} faults, "
        f"{f.processes_started} processes started.",
        "",
        "## Invariants",
        "",
        "| what | figure |",
        "|---|---|",
        f"| lost queries / lost labels | {f.lost_decisions} / {f.lost_rewards} |",
        f"| decisions stored (one per query) | {f.decisions} of {f.queries} |",
        f"| LLM calls at the arms / after their decision was made | {f.calls} / "
        f"{f.calls_after_decided} |",
        f"| decisions whose arm failed (5xx, timeout; learnt as failures) | {f.arm_failures} |",
        f"| calls repeated before a decision (cut off by a kill / a rebalance: allowed) | "
        f"{f.repeated_after_kill} / {f.repeated_after_rebalance} |",
        f"| rewards stored / applied twice | {f.rewards_stored} / "
        f"{f.duplicate_reward_seqs + f.policy_update_mismatches} |",
        f"| labels pending at the end (beside their decision) | {f.labels_pending} "
        f"({f.labels_pending_beside_decision}) |",
        f"| policy difference vs the log's replay (final instances, a restart's) | "
        f"{f.max_policy_difference:.3g}, {f.restored_policy_difference:.3g} |",
        f"| decisions never published | {f.decision_events_missing} |",
        f"| malformed events missing from the DLQ | {f.malformed_missing_from_dlq} of "
        f"{f.malformed_published} |",
        f"| SIGTERM exit codes | {', '.join(map(str, f.exit_codes))} |",
        f"| instances that exited by themselves | {len(f.unexpected_exits)} |",
        f"| log follower failures logged (during Postgres faults) | {f.log_follower_failures} |",
        f"| the load's sends the broker never took | {f.failed_sends} |",
        "",
        f"Broken: {', '.join(broken(f)) or 'none'}.",
        "",
        "## Targets",
        "",
        "| target | figure | met |",
        "|---|---|---|",
        f"| readiness truthful in ≥ 99 % of probes (not counting {SETTLE_S:g} s after a change) "
        f"| {100 * truthful:.2f} % of {f.probes_counted} ({f.probes} probes) | "
        f"{'yes' if truthful >= 0.99 else 'no'} |",
    ]
    for kind in FAULTS:
        mine = [x for x in f.faults if x.kind == kind]
        if not mine:
            continue
        first = [x.first_decision_s for x in mine]
        ok = all(v is not None and v <= 30 for v in first)
        lines.append(
            f"| {kind} ×{len(mine)}: decisions flow within 30 s of the return (p50 / max); "
            f"backlog decided | {_spread(first)}; {_spread([x.backlog_s for x in mine])} | "
            f"{'yes' if ok else 'no'} |"
        )
    for name, (since, kb0, kb1) in sorted(f.rss.items()):
        growth = kb1 / kb0 - 1
        lines.append(
            f"| {name}: resident memory grows ≤ 10 % from minute {since:g} to the end | "
            f"{kb0 / 1024:.0f} → {kb1 / 1024:.0f} MB ({100 * growth:+.1f} %) | "
            f"{'yes' if growth <= 0.10 else 'no'} |"
        )
    for name, series in sorted(f.rss_by_minute.items()):
        shown = ", ".join(f"{kb / 1024:.0f}" for kb in series)
        lines += ["", f"{name}'s resident memory at each minute (MB): {shown}."]
    lines += ["", "## The faults", "", "| at | fault | lasted | first decision after | backlog |"]
    lines.append("|---|---|---|---|---|")
    t0 = f.faults[0].began if f.faults else 0.0
    for x in f.faults:
        lines.append(
            f"| +{x.began - t0:.0f} s | {x.kind} | {x.returned - x.began:.0f} s | "
            f"{'–' if x.first_decision_s is None else f'{x.first_decision_s:.1f} s'} | "
            f"{'–' if x.backlog_s is None else f'{x.backlog_s:.1f} s'} |"
        )
    if f.probes_wrong:
        lines += ["", "Wrong readiness probes (first ones): " + "; ".join(f.probes_wrong) + "."]
    if f.unexpected_exits:
        lines += ["", "Exits: " + "; ".join(f.unexpected_exits)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=20.0, help="how long the load runs (20)")
    p.add_argument("--rate", type=float, default=10.0, help="queries per second (10)")
    p.add_argument("--seed", type=int, default=25)
    p.add_argument(
        "--fault-seconds",
        type=float,
        nargs=2,
        default=(10.0, 60.0),
        metavar=("LO", "HI"),
        help="how long a dependency fault lasts, drawn in [LO, HI] (10 60)",
    )
    p.add_argument("--warmup", type=float, default=60.0, help="seconds before the first fault")
    p.add_argument("--gap", type=float, default=20.0, help="seconds between faults (20)")
    p.add_argument("--out", type=Path, default=RESULTS, help="the report (results/soak.md)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="metallm-soak-"))

    def say(line: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)

    say(f"soak: {args.minutes:g} min at {args.rate:g} queries/s; logs in {workdir}")
    plan = SoakPlan(
        args.minutes, args.rate, args.seed, tuple(args.fault_seconds), args.warmup, args.gap
    )
    figures = run(plan, workdir, say)
    text = report(figures, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    if args.json:
        print(json.dumps(figures.as_dict(), default=lambda o: o.__dict__, indent=1))
    return 1 if broken(figures) else 0


if __name__ == "__main__":
    sys.exit(main())
