"""Build producers/data/demo_queries.jsonl: real labeled queries from BIG-bench task files.

BIG-bench (Apache-2.0) ships its tasks as JSON inside its PyPI sdist. Run once, by hand:

    pip download --no-deps -d /tmp/bb bigbench==1.0.0
    python scripts/build_demo_data.py /tmp/bb/bigbench-1.0.0.tar.gz

The output is committed, so nothing here runs at demo or test time.
"""

from __future__ import annotations

import json
import random
import sys
import tarfile
from pathlib import Path

ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/"
# (task file, our task name, how many, label mapping or None to keep, text prefix to strip)
PICKS = [
    (
        "multiemo/all_sentence_en",
        "sentiment",
        160,
        {"positive": "positive", "negative": "negative"},
        "",
    ),
    ("intent_recognition", "intent", 80, None, "Utterance: "),
    ("strategyqa", "yes_no", 80, {"Yes": "yes", "No": "no"}, ""),
]


def gold(example: dict) -> str:
    scores = example["target_scores"]
    return max(scores, key=scores.get)


def main(tarball: str, out: str = "producers/data/demo_queries.jsonl") -> None:
    rng = random.Random(20261127)
    rows = []
    with tarfile.open(tarball) as tar:
        for path, task, n, mapping, prefix in PICKS:
            data = json.load(tar.extractfile(ROOT + path + "/task.json"))
            examples = [e for e in data["examples"] if mapping is None or gold(e) in mapping]
            for i, e in enumerate(rng.sample(examples, n)):
                text = e["input"].strip()
                text = text[len(prefix) :] if prefix and text.startswith(prefix) else text
                label = gold(e) if mapping is None else mapping[gold(e)]
                qid = f"{task}-{i:04d}"
                rows.append({"query_id": qid, "text": text, "task": task, "label": label})
    rng.shuffle(rows)
    Path(out).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
