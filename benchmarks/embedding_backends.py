"""Embedding backends: speed, drift from float32 PyTorch, and what drift does to routing.

For each backend of :class:`service.embedding.Embedder` (``torch``, ``onnx``, ``onnx-int8``):

- **speed**: texts/s on the demo queries (``producers/data/demo_queries.jsonl``), called in
  batches of 64 like the service, interleaved across backends, median of the rounds;
- **drift**: cosine similarity of each vector to the ``torch`` one, on the demo queries and the
  1,319 gsm8k questions (min and mean);
- **routing**: the gsm8k bandit replay of ``benchmarks/policy_speed.py --reward`` (cold start,
  λ = 0.2, LinUCB d = 384) on each backend's embeddings: mean reward ± sd over seeds, and how
  often the arm chosen differs from the one chosen with ``torch`` embeddings (same seed).

    .venv/bin/python benchmarks/embedding_backends.py            # ~2 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

BATCH = 64


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from service.embedding import BACKENDS, Embedder
    from service.outcomes import read_outcomes
    from service.policy import make_policy
    from service.policy.warm_start import replay

    demo = [
        json.loads(line)["text"]
        for line in (ROOT / "producers" / "data" / "demo_queries.jsonl").read_text().splitlines()
    ]
    texts = (demo * 2)[:640]
    records = read_outcomes(ROOT / "tests" / "policy" / "data" / "gsm8k_outcomes.jsonl")
    embedders = {b: Embedder(backend=b) for b in BACKENDS}
    print(f"cores: {os.cpu_count()}; load: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")

    rates: dict[str, list[float]] = {b: [] for b in BACKENDS}
    for e in embedders.values():
        e.embed(texts[:BATCH])  # warm-up
    for _ in range(args.rounds):
        for backend, e in embedders.items():
            start = time.perf_counter()
            for i in range(0, len(texts), BATCH):
                e.embed(texts[i : i + BATCH])
            rates[backend].append(len(texts) / (time.perf_counter() - start))

    demo_vecs = {b: e.embed(demo) for b, e in embedders.items()}
    gsm_vecs = {b: e.embed([r.text for r in records]) for b, e in embedders.items()}
    arms = list(records[0].arms)
    unit = float(np.mean([r.cost(arms[0]) for r in records]))
    lam = 0.2
    reference: dict[int, list[str]] = {}
    print(
        f"\n{'backend':<10} {'texts/s':>8} {'× torch':>8} {'cos demo min/mean':>18} "
        f"{'cos gsm8k min/mean':>19} {'reward ± sd':>16} {'arms differ':>11}"
    )
    base = statistics.median(rates["torch"])
    for backend in BACKENDS:
        rewards, differ = [], []
        for seed in range(args.seeds):
            policy = make_policy("linucb", seed=seed)
            result = replay(policy, records, gsm_vecs[backend].astype(np.float64), lam, unit)
            rewards.append(float(np.mean(result.rewards)))
            chosen = list(result.arms)
            reference.setdefault(seed, chosen)
            differ.append(np.mean([a != b for a, b in zip(chosen, reference[seed], strict=True)]))
        cos_demo = (demo_vecs[backend] * demo_vecs["torch"]).sum(axis=1)
        cos_gsm = (gsm_vecs[backend] * gsm_vecs["torch"]).sum(axis=1)
        rate = statistics.median(rates[backend])
        print(
            f"{backend:<10} {rate:>8.0f} {rate / base:>7.2f}× "
            f"{cos_demo.min():>9.4f}/{cos_demo.mean():.4f} "
            f"{cos_gsm.min():>10.4f}/{cos_gsm.mean():.4f} "
            f"{np.mean(rewards):>9.4f} ± {np.std(rewards):.4f} {np.mean(differ):>10.1%}"
        )
    print(f"  speed runs: { {b: [round(r) for r in v] for b, v in rates.items()} }")
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
