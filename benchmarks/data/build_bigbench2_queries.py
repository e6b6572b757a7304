"""Build the pilot and final query files of benchmarks/data/bigbench2_outcomes.jsonl from
BIG-bench task files, in the labeled-dataset format `metallm record` reads: query_id, text,
task, label, options, metadata.subject.

    pip download --no-deps --no-binary :all: -d /tmp/bb bigbench==1.0.0
    python3 build_bigbench2_queries.py TARBALL pilot OUT              # 24 per PILOT_SUBJECTS task
    python3 build_bigbench2_queries.py TARBALL pilot2 OUT             # 16 per PILOT2_SUBJECTS task
    python3 build_bigbench2_queries.py TARBALL final OUT SUBJECT ...  # 70 per chosen task

Per task, the eligible examples (see below) are put in a random order ONCE, by a
random.Random seeded with f"{SEED}:{subject}" (so one task's sample does not depend on which
other tasks are in a file); the first PILOT_N of that order are the pilot queries, the next
FINAL_N the final ones: pilot and final queries are disjoint. Each query's options (the
target_scores keys) are shuffled with the same per-task rng (BIG-bench often lists the gold
option first, and metallm's multiple-choice prompt labels options A, B, C...). All rows of a
file are then shuffled together with random.Random(SEED).

Per example: gold = the option with the highest target score (examples with a tied top score are
skipped); text = the non-empty, stripped parts, joined with newlines, of: the task's task_prefix,
its example_input_prefix glued to the example's input (e.g. "Sentence: ...", "Q: Is the following
reply unsupportive, neutral, or supportive?\\n\\n..."), and its example_output_prefix only when that
is a question (ends with "?", e.g. anachronisms' "Does the preceding sentence contain
non-contemporaneous (anachronistic) elements?"; answer cues like "A:" or "Relation:" are left
out, the prompt template asks for the answer). Eligible only if text < 400 characters, 2-26
distinct non-empty options, and the (text, options) pair not already taken for that task.
"""

from __future__ import annotations

import json
import random
import sys
import tarfile
from pathlib import Path

ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/"
SEED = 20261204
MAX_CHARS = 400
PILOT_N = 24
FINAL_N = 70
TASK = "bigbench_mc"  # the one config task: multiple_choice, options per query
PILOT_SUBJECTS = [
    "multiemo/hotels_sentence_en",
    "multiemo/medicine_sentence_en",
    "emoji_movie",
    "fact_checker/fever",
    "misconceptions",
    "anachronisms",
    "implicatures",
    "entailed_polarity",
    "elementary_math_qa/question_only",
    "bbq_lite_json/race_ethnicity_disambig",
    "bbq_lite_json/age_ambig",
    "code_line_description",
    "social_support",
    "phrase_relatedness",
]
# A short second pilot (16 queries each: the first 16 of the same per-task order, so still
# disjoint from the final #24..#93).
PILOT2_N = 16
PILOT2_SUBJECTS = [
    "multiemo/products_sentence_en",
    "multiemo/reviews_sentence_en",
    "metaphor_boolean",
    "epistemic_reasoning",
    "cs_algorithms/valid_parentheses",
    "winowhy",
]
# Never sampled: the metallm demo's tasks (scripts/build_demo_data.py) and the 8 tasks of
# bigbench_outcomes.jsonl.
EXCLUDED = {
    "multiemo/all_sentence_en",
    "intent_recognition",
    "strategyqa",
    "social_iqa",
    "goal_step_wikihow/goal_inference",
    "date_understanding",
    "unit_conversion/unit_identification",
    "ruin_names",
    "hindu_knowledge",
    "logical_deduction/three_objects",
    "sports_understanding",
}


def slug(subject: str) -> str:
    return subject.replace("/", "-")


def compose(data: dict, example: dict) -> str:
    parts = [(data.get("task_prefix") or "").strip()]
    in_prefix = (data.get("example_input_prefix") or "").lstrip()
    if in_prefix.endswith(":"):
        in_prefix += " "  # "...math word problem?:" + input
    parts.append((in_prefix + example["input"].strip()).strip())
    out_prefix = (data.get("example_output_prefix") or "").strip()
    if out_prefix.endswith("?"):
        parts.append(out_prefix)
    return "\n".join(p for p in parts if p)


def ordered_eligible(tar: tarfile.TarFile, subject: str) -> tuple[list, int]:
    """All eligible (text, options, label) of a task, in the task's seeded random order."""
    data = json.load(tar.extractfile(ROOT + subject + "/task.json"))
    rng = random.Random(f"{SEED}:{subject}")
    eligible, seen = [], set()
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
        text = compose(data, example)
        if not text or len(text) >= MAX_CHARS:
            continue
        key = (text, tuple(sorted(options)))
        if key in seen:
            continue
        seen.add(key)
        eligible.append((text, options, max(scores, key=scores.get)))
    rng.shuffle(eligible)
    shuffled = []
    for text, options, label in eligible:
        options = options[:]
        rng.shuffle(options)
        shuffled.append((text, options, label))
    return shuffled, len(data["examples"])


def main(tarball: str, which: str, out: str, *subjects: str) -> None:
    if which == "pilot2":
        subjects = list(subjects) or PILOT2_SUBJECTS
    else:
        subjects = list(subjects) or PILOT_SUBJECTS
    assert not EXCLUDED & set(subjects), EXCLUDED & set(subjects)
    start, count = {"pilot": (0, PILOT_N), "pilot2": (0, PILOT2_N), "final": (PILOT_N, FINAL_N)}[
        which
    ]
    rows = []
    with tarfile.open(tarball) as tar:
        for subject in subjects:
            eligible, total = ordered_eligible(tar, subject)
            picked = eligible[start : start + count]
            for i, (text, options, label) in enumerate(picked):
                rows.append(
                    {
                        "query_id": f"bb2-{which}-{slug(subject)}-{start + i:04d}",
                        "text": text,
                        "task": TASK,
                        "label": label,
                        "options": options,
                        "metadata": {"subject": subject},
                    }
                )
            print(
                f"{subject}: {total} examples, {len(eligible)} eligible, "
                f"took #{start}..#{start + len(picked) - 1} ({len(picked)})"
            )
    random.Random(SEED).shuffle(rows)
    Path(out).write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
