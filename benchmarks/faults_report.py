"""Fault-injection figures: kill -9 the real service at seeded moments while queries and their
labels stream through, restart it each time, and count what went wrong.

    .venv/bin/python benchmarks/faults_report.py            # 2,000 queries, 10 + 2 kills
    .venv/bin/python benchmarks/faults_report.py --queries 500 --kills 4 --json

It runs the scenario of ``tests/faults/test_kill9.py`` (see ``tests/faults/kill_scenario.py``)
on a Tansu broker it starts and a fresh schema in the test database
(``METALLM_TEST_DATABASE_URL``, default ``postgresql://postgres@127.0.0.1:5432/test``).
LLM calls are counted at the arm (an OpenAI-compatible endpoint in this process), so calls made
by a process that was then killed are counted too. Exits 1 if any guarantee was broken.
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
from tests.faults import kill_scenario  # noqa: E402

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
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--kills", type=int, default=10, help="kills at seeded points of progress")
    p.add_argument("--startup-kills", type=int, default=2, help="kills right after a restart")
    p.add_argument("--seed", type=int, default=6)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--quiet", action="store_true", help="do not narrate the kills")
    args = p.parse_args(argv)

    schema = f"faults_{uuid.uuid4().hex[:10]}"
    upgrade(DATABASE_URL, schema)
    try:
        with LocalBroker() as broker, tempfile.TemporaryDirectory() as tmp:
            figures = kill_scenario.run(
                broker.bootstrap,
                DATABASE_URL,
                schema,
                Path(tmp),
                n=args.queries,
                progress_kills=args.kills,
                startup_kills=args.startup_kills,
                seed=args.seed,
                say=(lambda _: None) if args.quiet or args.json else print,
            )
    finally:
        drop_schema(DATABASE_URL, schema)
    problems = broken(figures)
    if args.json:
        print(json.dumps({**figures.as_dict(), "broken": problems}, indent=2))
    else:
        print(table(figures))
        print("guarantees: " + ("all held" if not problems else "BROKEN: " + "; ".join(problems)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
