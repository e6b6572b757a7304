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
    .venv/bin/python benchmarks/embedding_backends.py --batch-sizes 4,8,64   # ~3 minutes

``--batch-sizes`` measures only speed: texts/s of each backend at each ``batch_size`` (texts
embedded per model run) on 640 texts, ``--call-size`` texts per ``embed`` call (64, a poll
batch of the service; 640 for the offline tools, which embed whole lists), interleaved,
median of the rounds; ``*`` marks the backend's default (``DEFAULT_BATCH_SIZES``).
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


def load() -> str:
    """The load average (1, 5, 15 min): other processes on the cores skew every figure."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--batch-sizes", help="comma-separated batch sizes: speed only")
    parser.add_argument("--call-size", type=int, default=BATCH, help="with --batch-sizes")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.batch_sizes:
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        return batch_size_speed(sizes, args.call_size, args.rounds)

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
    print(f"cores: {os.cpu_count()}; load: {load()}")

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
    print(f"load average at the end: {load()}")
    return 0


def batch_size_speed(sizes: list[int], call_size: int, rounds: int) -> int:
    """Texts/s of every backend at every batch size, interleaved, ``call_size`` texts per
    call (the ONNX backends spread a call's runs over their threads)."""
    from producers.demo_data import demo_rows
    from service.embedding import BACKENDS, DEFAULT_BATCH_SIZES, Embedder

    rows = demo_rows()
    texts = [f"{rows[i % len(rows)]['text']} ({i})" for i in range(640)]  # each text unique
    embedders = {(b, n): Embedder(backend=b, batch_size=n) for b in BACKENDS for n in sizes}
    print(f"cores: {os.cpu_count()}; texts per call: {call_size}; load: {load()}")
    for e in embedders.values():
        e.embed(texts[:BATCH])  # warm-up
    rates: dict[tuple[str, int], list[float]] = {key: [] for key in embedders}
    for _ in range(rounds):
        for key, e in embedders.items():
            start = time.perf_counter()
            for i in range(0, len(texts), call_size):
                e.embed(texts[i : i + call_size])
            rates[key].append(len(texts) / (time.perf_counter() - start))
    print(f"\n{'backend':<10} " + " ".join(f"{n:>9}" for n in sizes) + "   (texts/s)")
    for b in BACKENDS:
        cells = [
            f"{statistics.median(rates[b, n]):>8.0f}{'*' if n == DEFAULT_BATCH_SIZES[b] else ' '}"
            for n in sizes
        ]
        print(f"{b:<10} " + " ".join(cells))
    print(f"  runs: { {f'{b}@{n}': [round(r) for r in v] for (b, n), v in rates.items()} }")
    print(f"load average at the end: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
