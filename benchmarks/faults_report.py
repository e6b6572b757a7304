"""Fault-injection figures: kill -9 the real service at seeded moments while queries and their
labels stream through, restart it each time, and count what went wrong; then the same with
several instances in one consumer group, scaled 1 → 3 → 2 mid-stream.

    .venv/bin/python benchmarks/faults_report.py            # both scenarios
    .venv/bin/python benchmarks/faults_report.py --only kill --queries 500 --kills 4 --json
    .venv/bin/python benchmarks/faults_report.py --only scale --scale-seed 3

``kill``: the scenario of ``tests/faults/test_kill9.py`` (``tests/faults/kill_scenario.py``):
one instance, 2,000 queries, 10 + 2 kills. ``scale``: that of ``tests/faults/test_scale_out.py``
(``tests/faults/scale_scenario.py``): 3,000 queries over 6 partitions, one instance, then
three, then two (SIGTERM), a random instance killed at 4 + 1 seeded points; every instance's
policy is compared with the reward log's replay. Each runs on a Tansu broker it starts and a
fresh schema in the test database (``METALLM_TEST_DATABASE_URL``, default
``postgresql://postgres@127.0.0.1:5432/test``). LLM calls are counted at the arm (an
OpenAI-compatible endpoint in this process), so calls made by a process that was then killed
are counted too. Exits 1 if any guarantee was broken.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from producers.local_broker import LocalBroker  # noqa: E402
from service.migrate import drop_schema, upgrade  # noqa: E402
from tests.faults import kill_scenario, scale_scenario  # noqa: E402

DATABASE_URL = os.environ.get(
    "METALLM_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


def broken(f: kill_scenario.KillFigures) -> list[str]:
    """The guarantees this run broke (empty: none)."""
    checks = {
        "a query without its decision": f.lost_decisions == 0 and f.decisions == f.queries,
        "an LLM call for a decision already committed": f.duplicated_calls == 0,
        "a label never applied": f.lost_rewards == 0,
        "a reward applied twice": f.double_applied_rewards == 0 and f.policy_updates == f.queries,
        "the recovered policy differs from an uninterrupted run": f.max_policy_difference <= 1e-9,
        "SIGTERM did not exit 0 after a full checkpoint": f.final_exit_code == 0
        and f.final_checkpoint_updates == f.queries,
        "a decision never published": f.decision_events_missing == 0,
    }
    return [what for what, ok in checks.items() if not ok]


def broken_scale(f: scale_scenario.ScaleFigures) -> list[str]:
    """The guarantees the multi-instance run broke (empty: none)."""
    checks = {
        "a query without its decision": f.lost_decisions == 0 and f.decisions == f.queries,
        "an LLM call after its query's decision was made": f.calls_after_decided == 0
        and f.discarded_elsewhere_logged == 0,
        "a label never applied": f.lost_rewards == 0 and f.labels_pending == 0,
        "a reward applied twice": f.duplicate_reward_seqs == 0 and f.policy_update_mismatches == 0,
        "a label left waiting beside its decision": f.labels_pending_beside_decision == 0,
        "an instance's policy differs from the log's replay": f.max_policy_difference <= 1e-9
        and f.max_stopped_policy_difference <= 1e-9
        and f.restored_policy_difference <= 1e-9
        and f.final_watermark_lag == 0,
        "an instance stopped following the log": f.log_follower_failures == 0,
        "decisions without their instance's seed": f.decisions_without_seed == 0
        and f.seed_mismatches == 0
        and f.most_seeds_per_instance == 1,
        "SIGTERM did not exit 0 after a full checkpoint": all(c == 0 for c in f.exit_codes)
        and f.final_checkpoint_updates == f.queries,
        "a decision never published": f.decision_events_missing == 0,
    }
    return [what for what, ok in checks.items() if not ok]


def _aligned(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def table_scale(f: scale_scenario.ScaleFigures) -> str:
    rows = [
        (
            "events",
            f"{f.queries} queries + {f.labels_published} labels over {f.partitions} partitions "
            f"({f.early_labels} before their query, {f.duplicate_labels_published} repeats)",
        ),
        (
            "instances",
            f"1 → {f.max_instances} → {f.final_instances} (+{f.scaled_out}, −{f.scaled_in} by "
            f"SIGTERM); {f.processes_started} processes started",
        ),
        ("kills (kill -9) / restarts", f"{f.kills} / {f.restarts}"),
        ("SIGTERM exit codes", ", ".join(map(str, f.exit_codes))),
        (
            "decisions stored",
            f"{f.decisions} (one row per query), by {f.deciding_instances} instances "
            f"with {f.distinct_seeds} seeds",
        ),
        ("lost queries / lost labels", f"{f.lost_decisions} / {f.lost_rewards}"),
        ("LLM calls at the arms", f"{f.calls}"),
        ("calls after their decision was made", f"{f.calls_after_decided}"),
        (
            "calls repeated before a decision",
            f"{f.repeated_calls} ({f.repeated_after_kill} cut off by a kill, "
            f"{f.repeated_after_rebalance} by a rebalance: allowed)",
        ),
        (
            "calls discarded (logged by the instances)",
            f"{f.discarded_at_rebalance_logged} at a rebalance, "
            f"{f.discarded_elsewhere_logged} decided elsewhere",
        ),
        (
            "rewards stored / applied twice",
            f"{f.rewards_stored} / {f.duplicate_reward_seqs + f.policy_update_mismatches}",
        ),
        (
            "labels pending (beside their decision)",
            f"{f.labels_pending} ({f.labels_pending_beside_decision})",
        ),
        (
            "duplicate labels counted (published)",
            f"{f.duplicate_labels_counted} ({f.duplicate_labels_published})",
        ),
        (
            "max policy difference vs the log's replay",
            f"{f.max_policy_difference:.3g} ({f.final_policies} instances at the end), "
            f"{f.max_stopped_policy_difference:.3g} (stopped mid-stream), "
            f"{f.restored_policy_difference:.3g} (a restart's)",
        ),
        ("log follower failures", f"{f.log_follower_failures}"),
        ("decisions never published", f"{f.decision_events_missing}"),
        ("wall time", f"{f.seconds:.0f} s"),
    ]
    return _aligned(rows)


def table(f: kill_scenario.KillFigures) -> str:
    rows = [
        (
            "events",
            f"{f.queries} queries + {f.labels_published} labels "
            f"({f.early_labels} before their query, {f.duplicate_labels_published} repeats)",
        ),
        ("kills (kill -9)", f"{f.kills}"),
        (
            "restarts",
            f"{f.restarts} (+ the first start; SIGTERM at the end → exit {f.final_exit_code})",
        ),
        ("decisions stored", f"{f.decisions} (one row per query)"),
        ("lost queries / lost labels", f"{f.lost_decisions} / {f.lost_rewards}"),
        ("LLM calls at the arms", f"{f.calls}"),
        ("duplicated calls (decision already committed)", f"{f.duplicated_calls}"),
        (
            "calls repeated for a batch in flight at a kill",
            f"{f.recalled_after_kill} (not committed: allowed)",
        ),
        ("rewards stored / policy updates", f"{f.rewards_stored} / {f.policy_updates}"),
        ("double-applied rewards", f"{f.double_applied_rewards}"),
        ("max policy difference vs uninterrupted", f"{f.max_policy_difference:.3g}"),
        ("decisions never published", f"{f.decision_events_missing}"),
        (
            "duplicate labels counted (published)",
            f"{f.duplicate_labels_counted} ({f.duplicate_labels_published}; "
            "a label redelivered after a kill is not counted)",
        ),
        ("wall time", f"{f.seconds:.0f} s"),
    ]
    return _aligned(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["kill", "scale"], help="run one scenario (default: both)")
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--kills", type=int, default=10, help="kills at seeded points of progress")
    p.add_argument("--startup-kills", type=int, default=2, help="kills right after a restart")
    p.add_argument("--seed", type=int, default=6)
    p.add_argument("--scale-queries", type=int, default=3000)
    p.add_argument("--scale-kills", type=int, default=4, help="multi-instance: kill -9s")
    p.add_argument("--scale-startup-kills", type=int, default=1)
    p.add_argument("--scale-seed", type=int, default=16)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--quiet", action="store_true", help="do not narrate the kills")
    args = p.parse_args(argv)
    say = (lambda _: None) if args.quiet or args.json else print

    def kill(bootstrap: str, schema: str, tmp: Path) -> kill_scenario.KillFigures:
        return kill_scenario.run(
            bootstrap,
            DATABASE_URL,
            schema,
            tmp,
            n=args.queries,
            progress_kills=args.kills,
            startup_kills=args.startup_kills,
            seed=args.seed,
            say=say,
        )

    def scale(bootstrap: str, schema: str, tmp: Path) -> scale_scenario.ScaleFigures:
        return scale_scenario.run(
            bootstrap,
            DATABASE_URL,
            schema,
            tmp,
            n=args.scale_queries,
            kills=args.scale_kills,
            startup_kills=args.scale_startup_kills,
            seed=args.scale_seed,
            say=say,
        )

    scenarios = {
        "kill": ("one instance, kill -9 and restart", kill, table, broken),
        "scale": ("several instances, scaled 1 → 3 → 2, kill -9", scale, table_scale, broken_scale),
    }
    results: dict[str, dict] = {}
    failed = False
    for name, (title, scenario, tabulate, check) in scenarios.items():
        if args.only not in (None, name):
            continue
        schema = f"faults_{uuid.uuid4().hex[:10]}"
        upgrade(DATABASE_URL, schema)
        try:
            with LocalBroker() as broker, tempfile.TemporaryDirectory() as tmp:
                figures = scenario(broker.bootstrap, schema, Path(tmp))
        finally:
            drop_schema(DATABASE_URL, schema)
        problems = check(figures)
        failed = failed or bool(problems)
        results[name] = {**figures.as_dict(), "broken": problems}
        if not args.json:
            print(f"\n## {name}: {title}\n")
            print(tabulate(figures))
            verdict = "all held" if not problems else "BROKEN: " + "; ".join(problems)
            print(f"guarantees: {verdict}")
    if args.json:
        print(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
