"""Build the queries of benchmarks/data/bigbench_outcomes.jsonl: a deterministic sample of
BIG-bench multiple-choice tasks (none of those the metallm demo uses), in the labeled-dataset
format `metallm record` reads: query_id, text, task, label, options, metadata.subject.

    pip download --no-deps --no-binary :all: -d /tmp/bb bigbench==1.0.0
    python3 benchmarks/data/build_bigbench_queries.py /tmp/bb/bigbench-1.0.0.tar.gz [PER_TASK] [OUT]

Per example: gold = the option with the highest target score (examples with a tied top score
are skipped); text = the task's own task_prefix (when it has one) + the example's input,
stripped; only examples whose text is < 400 characters are eligible; the options are the
target_scores keys in a seeded random order (BIG-bench often lists the gold option first, and
metallm's multiple-choice prompt labels options A, B, C, ..., so keeping the source order
would reward a model that always answers "A"). Rows of all tasks are then shuffled together.
"""

from __future__ import annotations

import json
import random
import sys
import tarfile
from pathlib import Path

ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/"
SEED = 20261203
MAX_CHARS = 400
TASK = "bigbench_mc"  # the one config task: multiple_choice, options per query
SUBJECTS = [
    "social_iqa",
    "goal_step_wikihow/goal_inference",
    "date_understanding",
    "unit_conversion/unit_identification",
    "ruin_names",
    "hindu_knowledge",
    "logical_deduction/three_objects",
    "sports_understanding",
]
# The metallm demo's BIG-bench tasks (scripts/build_demo_data.py); never sampled here.
DEMO_TASKS = {"multiemo/all_sentence_en", "intent_recognition", "strategyqa"}


def slug(subject: str) -> str:
    return subject.replace("/", "-")


def main(tarball: str, per_task: int = 75, out: str = "bigbench_queries.jsonl") -> None:
    assert not DEMO_TASKS & set(SUBJECTS) and not any(s.startswith("multiemo") for s in SUBJECTS)
    rng = random.Random(SEED)
    rows = []
    with tarfile.open(tarball) as tar:
        for subject in SUBJECTS:
            data = json.load(tar.extractfile(ROOT + subject + "/task.json"))
            prefix = (data.get("task_prefix") or "").strip()
            eligible = []
            for example in data["examples"]:
                scores = example.get("target_scores")
                if not scores or len(scores) < 2 or len(scores) > 26:
                    continue
                options = list(scores)
                if any(not o.strip() for o in options) or len(set(options)) != len(options):
                    continue
                top = max(scores.values())
                if sum(v == top for v in scores.values()) != 1:
                    continue  # tied gold
                text = example["input"].strip()
                if prefix:
                    text = f"{prefix}\n{text}"
                if not text or len(text) >= MAX_CHARS:
                    continue
                label = max(scores, key=scores.get)
                eligible.append((text, options, label))
            picked = rng.sample(eligible, per_task)
            for i, (text, options, label) in enumerate(picked):
                options = options[:]
                rng.shuffle(options)
                rows.append(
                    {
                        "query_id": f"bb-{slug(subject)}-{i:04d}",
                        "text": text,
                        "task": TASK,
                        "label": label,
                        "options": options,
                        "metadata": {"subject": subject},
                    }
                )
            print(
                f"{subject}: {len(data['examples'])} examples, {len(eligible)} eligible, "
                f"sampled {per_task}"
            )
    rng.shuffle(rows)
    Path(out).write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0], *([int(args[1])] if len(args) > 1 else []), *args[2:3])
