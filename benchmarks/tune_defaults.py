"""How the router's defaults are chosen: one procedure over several outcomes files, never one.

    .venv/bin/python benchmarks/tune_defaults.py                  # ~15-30 min on 2 cores
    .venv/bin/python benchmarks/tune_defaults.py --files A.jsonl B.jsonl --seeds 3

Every candidate runs the product's own benchmark (:func:`evaluation.bench.run_bench`:
rewards delayed ``--delay`` queries, the λ sweep, ``--seeds`` seeds) with the service's
context builder, on every file, in two scenarios: a **cold start**, and a **warm start** on the
first half (the MetaLLM paper's setting). The second stands for a service that has run for a
while: a default must not cap what the router can learn from more data (our files are small;
the files it will meet may be 10× larger), nor be slow to start. The files (default: those
below that exist) are each a real recording of two arms:

- gsm8k: GPT-4 vs Mixtral on grade-school maths (RouteLLM's outcomes, tests/policy/data);
- demo: the two local llama.cpp models on the demo's three BIG-bench tasks (producers/data);
- bigbench: the same two local models on eight other BIG-bench multiple-choice tasks, with
  ``metadata.subject`` on every line (benchmarks/data; how it was recorded is in its README).

The procedure, in two stages so the grid stays small:

1. the context's embedding part (none, projections to 16/32/64 dimensions, the raw vector,
   and the legacy raw-vector-only context) crossed with LinUCB's α ∈ {0.1, 0.3}, at
   ε = 0.05 — plus the other learners: LinTS, the shared-learning hybrid LinUCB, and an online
   kNN router (below); α = 1.0 (the earlier default) is measured for the raw vector;
2. ε ∈ {0, 0.02, 0.05, 0.1} for the best stage-1 candidate (ridge 3 measured no different
   from 1 in earlier runs).

A seeded random projection is only as good as its matrix (one seed's luck is not a property
of the method): every ``project:K`` candidate is scored as the mean over three projection
seeds, the per-seed APGRs are kept in the JSON.

The score of a candidate is its **mean APGR over the scenarios and the files that have something
to route** (each file's APGR is the mean over seeds): a file counts when its most accurate arm
beats its cheapest by a margin a two-proportion z-test finds significant (z ≥ 2). On a file
where both arms score alike, the gain to recover (the denominator of APGR) is noise, and so is
APGR; such a file is still run and printed, not scored. The worst counted file's APGR and each
file's cost at 95 % of the best arm's accuracy are printed beside it. The default is the best
mean; between candidates within 0.005 of it, the simpler one (lower dimension, then larger ε).
Metadata features are not part of the search: a file's declared features are used when the file
has them (``--feature subject:categorical`` for the BIG-bench files).

The online kNN router (the issue's non-linear learner) keeps every labelled query seen so
far; for a new query it takes the ``K`` most similar (cosine on the embedding) of each arm's
pulls, estimates the arm's reward as their mean shrunk toward the arm's overall mean, adds a
UCB bonus ``α/sqrt(n)``, and mixes in ε like LinUCB. It is here, not in the service, unless it
beats the linear routers.

Writes benchmarks/results/tune_defaults.json and prints markdown tables (the run behind the
current defaults: benchmarks/results/tune_defaults.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.bench import (  # noqa: E402
    BenchConfig,
    Problem,
    run_bench,
    simulate,
    stream_contexts,
    sweep_lambdas,
)
from evaluation.embed_cache import CachedEmbedder, EmbeddingCache  # noqa: E402
from service.context import ContextBuilder  # noqa: E402
from service.outcomes import read_outcomes  # noqa: E402
from service.policy.base import Choice, greedy_mix  # noqa: E402

FILES = {
    "gsm8k": (ROOT / "tests/policy/data/gsm8k_outcomes.jsonl", ()),
    "demo": (ROOT / "producers/data/demo_outcomes.jsonl", ()),
    "bigbench": (ROOT / "benchmarks/data/bigbench_outcomes.jsonl", ("subject:categorical",)),
    "bigbench2": (ROOT / "benchmarks/data/bigbench2_outcomes.jsonl", ("subject:categorical",)),
}
OUT = ROOT / "benchmarks" / "results" / "tune_defaults.json"


@dataclass
class Candidate:
    name: str
    policy: str
    params: dict
    embedding: str

    @property
    def dim_rank(self) -> int:
        return {"none": 0, "project:16": 16, "project:32": 32, "project:64": 64}.get(
            self.embedding, 384
        )


def stage1() -> list[Candidate]:
    def linucb(alpha: float, emb: str) -> Candidate:
        return Candidate(
            f"linucb α={alpha} {emb}", "linucb", {"alpha": alpha, "epsilon": 0.05}, emb
        )

    out = [linucb(0.1, "none"), linucb(0.1, "project:16"), linucb(0.1, "project:32")]
    out += [linucb(0.3, "project:32"), linucb(0.1, "project:64")]
    out += [linucb(0.1, "raw"), linucb(0.3, "raw"), linucb(1.0, "raw")]
    out += [linucb(0.1, "legacy"), linucb(1.0, "legacy")]  # α 1.0 on legacy: the old default
    out.append(Candidate("lin_ts raw", "lin_ts", {"epsilon": 0.05}, "raw"))
    hybrid = {"alpha": 0.3, "epsilon": 0.05}
    out.append(Candidate("hybrid_linucb α=0.3 project:32", "hybrid_linucb", hybrid, "project:32"))
    out.append(Candidate("knn-online", "knn", {"k": 20, "alpha": 0.3}, "none"))
    return out


def stage2(best: Candidate) -> list[Candidate]:
    out = []
    for eps in (0.0, 0.02, 0.05, 0.1):
        params = {**best.params, "epsilon": eps}
        out.append(
            Candidate(
                f"{best.policy} {params} {best.embedding}", best.policy, params, best.embedding
            )
        )
    return out


class OnlineKNN:
    """The online kNN router of the module docstring. It duck-types the two methods of the
    policy interface that :func:`evaluation.bench.simulate` calls, on contexts that are
    the unit-normalised embeddings."""

    def __init__(self, k: int = 20, alpha: float = 0.3, epsilon: float = 0.05, seed: int = 0):
        self.k, self.alpha, self.epsilon = k, alpha, epsilon
        self._rng = np.random.default_rng(seed)
        self.X: dict[str, list[np.ndarray]] = {}
        self.r: dict[str, list[float]] = {}

    def choose_many(self, arms: Sequence[str], contexts: np.ndarray) -> list[Choice]:
        x = np.asarray(contexts, dtype=np.float64)[0]
        scores = np.empty(len(arms))
        unexplored = np.array([not self.r.get(a) for a in arms])
        for j, a in enumerate(arms):
            if unexplored[j]:
                scores[j] = np.inf
                continue
            X, r = np.asarray(self.X[a]), np.asarray(self.r[a])
            k = min(self.k, len(r))
            nn = np.argpartition(-(X @ x), k - 1)[:k]
            shrink = k / (k + 5.0)
            est = shrink * r[nn].mean() + (1 - shrink) * r.mean()
            scores[j] = est + self.alpha / np.sqrt(len(r))
        greedy = unexplored if unexplored.any() else scores == scores.max()
        p = greedy_mix(greedy, self.epsilon)
        j = min(int(np.searchsorted(np.cumsum(p), self._rng.random(), side="right")), len(arms) - 1)
        return [Choice(arms[j], dict(zip(arms, p.tolist(), strict=True)))]

    def update(self, arm: str, context: np.ndarray, reward: float) -> None:
        self.X.setdefault(arm, []).append(np.asarray(context, dtype=np.float64))
        self.r.setdefault(arm, []).append(float(reward))


def knn_summary(problem: Problem, config: BenchConfig, params: dict) -> dict:
    """The online kNN router's curve summary, through the bench's protocol and curve code."""
    from evaluation import metrics
    from evaluation.bench import curve_summary, score

    E = problem.embeddings / np.maximum(
        np.linalg.norm(problem.embeddings, axis=1, keepdims=True), 1e-12
    )
    on_embeddings = Problem.from_records(problem.records, E, problem.embeddings)
    grid = sweep_lambdas(problem, 0, config)
    acc = problem.correct.mean(axis=0)
    total = problem.cost.sum(axis=0)
    best, cheapest = problem.best_and_cheapest()
    curve = []
    for lam in grid:
        accs, costs = [], []
        for seed in config.seeds:
            policy = OnlineKNN(seed=seed, **params)
            result = simulate(on_embeddings, policy, 0, config.delay, lam, config.cost_unit)  # type: ignore[arg-type]
            s = score(problem, 0, result.choices, lam, config.cost_unit)
            accs.append(s["accuracy"])
            costs.append(s["total_cost"])
        curve.append(metrics.Point(float(np.mean(costs)), float(np.mean(accs))))
    return curve_summary(
        curve,
        metrics.Point(float(total[cheapest]), float(acc[cheapest])),
        metrics.Point(float(total[best]), float(acc[best])),
        float(total.min()),
        float(total.max()),
    )


def routable(problem: Problem) -> tuple[bool, float]:
    """Whether the most accurate arm beats the cheapest significantly (z ≥ 2), and z."""
    acc = problem.correct.mean(axis=0)
    best, cheapest = problem.best_and_cheapest()
    if best == cheapest:
        return False, 0.0
    n = problem.n
    pooled = (acc[best] + acc[cheapest]) / 2
    se = np.sqrt(2 * pooled * (1 - pooled) / n)
    z = float((acc[best] - acc[cheapest]) / se) if se > 0 else 0.0
    return z >= 2.0, z


def load(
    path: Path, features: Sequence[str], embedding: str, cache: EmbeddingCache, seed: int = 0
) -> Problem:
    """The file's problem with contexts of this embedding part (``seed``: the projection's)."""
    records = read_outcomes(path)
    embedder = CachedEmbedder.for_model(None, cache)
    embeddings = np.asarray(embedder.embed([r.text for r in records]))
    layout = BenchConfig(context_embedding=embedding, features=tuple(features)).layout()
    builder = ContextBuilder(dataclasses.replace(layout, seed=seed))
    contexts = stream_contexts(records, embeddings, builder)
    return Problem.from_records(records, contexts, embeddings)


def evaluate(
    cand: Candidate, problems: dict, args: argparse.Namespace, cache: EmbeddingCache
) -> dict:
    out = {}
    # a random projection is as good as its matrix: projections are scored over three of them
    projection_seeds = (0, 1, 2) if cand.embedding.startswith("project") else (0,)
    for name, (path, features) in problems.items():
        loaded = {
            seed: load(path, features, cand.embedding, cache, seed) for seed in projection_seeds
        }
        for scenario, warm in (("cold", 0.0), ("warm", 0.5)):
            if cand.policy == "knn" and warm:
                continue  # the kNN router is measured cold only
            runs = []
            for problem in loaded.values():
                config = BenchConfig(
                    delay=args.delay,
                    seeds=list(range(args.seeds)),
                    policy=cand.policy if cand.policy != "knn" else "linucb",
                    policy_params=dict(cand.params),
                    baselines=False,
                    warm_start=warm,
                    context_embedding=cand.embedding,
                    features=tuple(features),
                )
                if cand.policy == "knn":
                    runs.append(knn_summary(problem, config, cand.params))
                else:
                    runs.append(run_bench(problem, config).curves["router"])
            counted, z = routable(problem)
            reached = [r["cost_at_95_pct"] for r in runs if r["cost_at_95_pct"] is not None]
            out[f"{name} {scenario}"] = {
                "counted": counted,
                "z": round(z, 2),
                "apgr": float(np.mean([r["apgr"] for r in runs])),
                "apgr_by_projection": [r["apgr"] for r in runs],
                "cost_at_95_pct": float(np.mean(reached)) if len(reached) == len(runs) else None,
            }
    apgrs = [v["apgr"] for v in out.values() if v["counted"]] or [v["apgr"] for v in out.values()]
    return {
        "name": cand.name,
        "policy": cand.policy,
        "params": cand.params,
        "embedding": cand.embedding,
        "mean_apgr": float(np.mean(apgrs)),
        "worst_apgr": float(np.min(apgrs)),
        "files": out,
    }


def pick(rows: list[dict], cands: list[Candidate]) -> Candidate:
    top = max(r["mean_apgr"] for r in rows)
    close = [(r, c) for r, c in zip(rows, cands, strict=True) if r["mean_apgr"] >= top - 0.005]
    close.sort(key=lambda rc: (rc[1].dim_rank, -rc[1].params.get("epsilon", 0)))
    return close[0][1]


def table(rows: list[dict]) -> str:
    names = list(max(rows, key=lambda r: len(r["files"]))["files"])
    head = (
        "| candidate | mean APGR | worst | "
        + " | ".join(f"{n} APGR / cost@95" for n in names)
        + " |"
    )
    lines = [head, "|" + "---|" * (3 + len(names))]
    for r in sorted(rows, key=lambda r: -r["mean_apgr"]):
        cells = []
        for n in names:
            if n not in r["files"]:
                cells.append("—")
                continue
            f = r["files"][n]
            c = f["cost_at_95_pct"]
            mark = "" if f["counted"] else " (not counted)"
            cells.append(f"{f['apgr']:.3f} / {'—' if c is None else f'{c:.0f} %'}{mark}")
        lines.append(
            f"| {r['name']} | {r['mean_apgr']:.3f} | {r['worst_apgr']:.3f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", nargs="*", help="outcomes files (default: the three above)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--delay", type=int, default=100)
    ap.add_argument("--stage", type=int, choices=(1, 2), help="only this stage")
    args = ap.parse_args()
    problems = (
        {Path(f).stem: (Path(f), ()) for f in args.files}
        if args.files
        else {k: v for k, v in FILES.items() if v[0].exists()}
    )
    cache = EmbeddingCache(Path.home() / ".cache" / "metallm" / "embeddings.sqlite")
    results: dict = {"files": {k: str(v[0]) for k, v in problems.items()}, "seeds": args.seeds}
    began = time.perf_counter()
    cands = stage1()
    rows = []
    for i, cand in enumerate(cands, 1):
        rows.append(evaluate(cand, problems, args, cache))
        print(
            f"[{i}/{len(cands)}] {cand.name}: mean APGR {rows[-1]['mean_apgr']:.3f}",
            file=sys.stderr,
        )
    service_policies = [(r, c) for r, c in zip(rows, cands, strict=True) if c.policy != "knn"]
    best = pick([r for r, _ in service_policies], [c for _, c in service_policies])
    results["stage1"] = rows
    print("\n## Stage 1\n\n" + table(rows))
    if args.stage != 1:
        cands2 = stage2(best)
        rows2 = []
        for i, cand in enumerate(cands2, 1):
            rows2.append(evaluate(cand, problems, args, cache))
            print(f"[{i}/{len(cands2)}] {cand.name}: {rows2[-1]['mean_apgr']:.3f}", file=sys.stderr)
        best = pick(rows2, cands2)
        results["stage2"] = rows2
        print("\n## Stage 2\n\n" + table(rows2))
    results["chosen"] = {"policy": best.policy, "params": best.params, "embedding": best.embedding}
    results["seconds"] = round(time.perf_counter() - began, 1)
    print(f"\nchosen: {best.policy} {best.params} context embedding {best.embedding}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
