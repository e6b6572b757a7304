"""The evaluation figures of docs/evaluation.md, measured on the gsm8k outcomes (GPT-4 vs
Mixtral, real outcomes from RouteLLM; the copy in tests/policy/data).

    .venv/bin/python benchmarks/evaluation_gsm8k.py                       # ~3-5 min on 2 cores
    .venv/bin/python benchmarks/evaluation_gsm8k.py --through-service 300 # + the real path

1. The headline command, exactly as documented (cold start, delay 100, 5 seeds), through the
   CLI; its table, JSON and plots go to benchmarks/results/gsm8k-cold/.
2. Variants through the same code: a less exploratory LinUCB, and the paper's warm start
   (first half with full information, then online).
3. How much routing signal the query embedding carries at all: cross-validated AUC of a
   logistic regression predicting "only GPT-4 is right" from MiniLM, and what cost at 95 % of
   GPT-4's accuracy a ranking score of a given AUC would reach.
4. Speed: embedding with and without the cache, one router run, the whole benchmark.
5. Optionally the first N queries through Kafka → service → Postgres (local Tansu broker,
   Postgres from DATABASE_URL, default the local test database).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.bench import (  # noqa: E402
    BenchConfig,
    Problem,
    run_bench,
    stream_contexts,
)
from evaluation.embed_cache import CachedEmbedder, EmbeddingCache  # noqa: E402
from service.outcomes import read_outcomes  # noqa: E402

DATA = ROOT / "tests" / "policy" / "data" / "gsm8k_outcomes.jsonl"
OUT = ROOT / "benchmarks" / "results" / "gsm8k-cold"
GPT4, MIXTRAL = "gpt-4-1106-preview", "mixtral-8x7b-instruct"
HEADLINE = [
    "bench", str(DATA.relative_to(ROOT)), "--delay", "100", "--seeds", "5",
    "--policy", "linucb", "--policy-params", '{"alpha": 0.1, "epsilon": 0.02}',
    "--context-embedding", "raw",
    "--lambda", "0.1", "--cost-unit", "0.001", "--out", str(OUT.relative_to(ROOT)),
]  # fmt: skip


def pct(v: float | None) -> str:
    return "not reached" if v is None else f"{v:.1f} %"


def headline() -> tuple[float, dict]:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "app.cli", "--log-level", "WARNING", *HEADLINE, "--quiet"],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start, json.loads((OUT / "results.json").read_text())


def variants(problem: Problem) -> list[str]:
    rows = []
    default = {"alpha": 0.1, "epsilon": 0.02}
    old = {"alpha": 1.0, "epsilon": 0.05}
    for name, params, warm, embedding in [
        ("cold start, the service default (α 0.1, ε 0.02, context raw)", default, 0.0, "raw"),
        ("cold start, the previous default (α 1.0, embedding only)", old, 0.0, "legacy"),
        ("cold start, α 0.1, ε 0.02, context with no embedding", default, 0.0, "none"),
        ("warm start 50 %, the service default", default, 0.5, "raw"),
        ("warm start 50 %, the previous default", old, 0.5, "legacy"),
    ]:
        config = BenchConfig(
            delay=100, lam=0.1, cost_unit=0.001, seeds=range(5), policy_params=params,
            warm_start=warm, context_embedding=embedding,
        )  # fmt: skip
        contexts = stream_contexts(problem.records, problem.embeddings, config.new_context())
        r = run_bench(Problem.from_records(problem.records, contexts, problem.embeddings), config)
        c = r.curves
        rows.append(
            f"| {name} | {c['router']['apgr']:.3f} | {pct(c['router']['cost_at_95_pct'])} | "
            f"{pct(c['router']['cost_at_95_interpolated_pct'])} | "
            f"{c['linucb-offline']['apgr']:.3f} / {pct(c['linucb-offline']['cost_at_95_pct'])} | "
            f"{c['knn-offline']['apgr']:.3f} / {pct(c['knn-offline']['cost_at_95_pct'])} |"
        )
    return rows


def signal(problem: Problem) -> list[str]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import cross_val_predict

    g = problem.arms.index(GPT4)
    m = problem.arms.index(MIXTRAL)
    G, M = problem.correct[:, g], problem.correct[:, m]
    cg, cm = problem.cost[:, g], problem.cost[:, m]
    needed = G & ~M
    model = LogisticRegression(C=1.0, max_iter=2000)
    score = cross_val_predict(model, problem.embeddings, needed, cv=5, method="predict_proba")[:, 1]
    lengths = np.array([len(r.text) for r in problem.records])
    target = 0.95 * G.mean()

    def cost_at_95(s: np.ndarray) -> float | None:
        order = np.argsort(-s)
        for k in range(len(s) + 1):
            use = np.zeros(len(s), dtype=bool)
            use[order[:k]] = True
            if np.where(use, G, M).mean() >= target:
                return float(np.where(use, cg, cm).sum() / cg.sum() * 100)
        return None

    lines = [
        f"- Only GPT-4 right on {needed.mean():.1%} of the queries, only Mixtral on "
        f"{(M & ~G).mean():.1%}, both on {(G & M).mean():.1%}, neither on {(~G & ~M).mean():.1%}.",
        f'- AUC of "only GPT-4 is right" from MiniLM (logistic regression, 5-fold, full '
        f"information): {roc_auc_score(needed, score):.3f}; from the question's length: "
        f"{roc_auc_score(needed, lengths):.3f}. Routing GPT-4 by that score: cost at 95 % = "
        f"{pct(cost_at_95(score))}.",
        "- A ranking score of a given AUC (synthetic: `z·needed + N(0, 1)`), routing the "
        "top-ranked queries to GPT-4:",
        "",
        "| AUC | cost at 95 % of GPT-4's accuracy |",
        "|---|---|",
    ]
    rng = np.random.default_rng(0)
    for z in (0.0, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0):
        s = z * needed + rng.normal(size=len(needed))
        lines.append(f"| {roc_auc_score(needed, s):.2f} | {pct(cost_at_95(s))} |")
    return lines


def speed(records) -> list[str]:
    texts = [r.text for r in records]
    with tempfile.TemporaryDirectory() as tmp:
        cache = EmbeddingCache(Path(tmp) / "e.sqlite")
        t0 = time.perf_counter()
        embedder = CachedEmbedder.for_model(None, cache)
        X = embedder.embed(texts)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        CachedEmbedder.for_model(None, EmbeddingCache(Path(tmp) / "e.sqlite")).embed(texts)
        warm = time.perf_counter() - t0
    problem = Problem.from_records(records, X)
    t0 = time.perf_counter()
    run_bench(problem, BenchConfig(delay=100, lambdas=None, baselines=False))
    one = time.perf_counter() - t0
    return [
        f"- Embedding the {len(texts)} questions: {cold:.1f} s with the model (load included), "
        f"{warm * 1000:.0f} ms from the cache ({cold / warm:.0f}× faster).",
        f"- One router run over the {len(texts)} queries (LinUCB, d = 384, one BLAS thread): "
        f"{one:.2f} s ({len(texts) / one:,.0f} queries/s).",
    ]


def through_service(n: int) -> list[str]:
    """The first ``n`` queries through the real service, then off-policy estimates from the
    decisions it logged, checked against the truth the outcomes file knows (every arm's
    outcome on every query). The schema is dropped afterwards."""

    from evaluation import ope
    from service import storage
    from service.log.checkpoints import latest_checkpoint
    from service.migrate import drop_schema
    from service.policy import loads

    url = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    out = Path(tempfile.mkdtemp())
    args = [
        "bench", str(DATA), "--limit", str(n), "--delay", "100", "--no-sweep", "--no-baselines",
        "--no-plots", "--policy", "linucb", "--policy-params", '{"alpha": 0.1, "epsilon": 0.02}',
        "--lambda", "0.1", "--cost-unit", "0.001", "--through-service", "--local-broker",
        "--out", str(out), "--quiet",
    ]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "app.cli", "--log-level", "WARNING", *args],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": url},
        check=False,
        stdout=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - t0
    report = json.loads((out / "results.json").read_text())["through_service"]
    lines = [
        f"- Through Kafka → service → Postgres (local Tansu broker), first {n} queries: "
        f"{report['same_decisions']}/{report['queries']} decisions identical to the fast path, "
        f"{report['queries_per_second']} queries/s ({wall:.0f} s with start-up).",
        "",
        "## Off-policy estimates from the decisions the service logged",
        "",
        f"`metallm evaluate --from-db` on those {n} decisions (λ = 0.1); the truth is known here "
        "because the outcomes file has every arm's outcome on every query.",
        "",
        "| target | truth | IPS | SNIPS | DR | ESS |",
        "|---|---|---|---|---|---|",
    ]
    schema = report["schema"]
    engine = storage.make_engine(url, schema)
    try:
        data = ope.load_decisions(engine)
        with engine.connect() as conn:
            checkpoint = latest_checkpoint(conn).state
        targets = {
            "uniform": ope.uniform(data),
            **{f"arm: {a}": ope.fixed_arm(data, a) for a in data.arms},
            "greedy": "greedy",
            "checkpoint (router after the run, frozen)": ope.from_policy(data, loads(checkpoint)),
        }
        by_id = {r.query_id: r for r in read_outcomes(DATA)}
        R = np.array([[by_id[q].correct(a) - 0.1 * by_id[q].cost(a) / 0.001 for a in data.arms]
                      for q in data.query_ids])  # fmt: skip
        model = ope.fit_reward_model(data)
        for name, target in targets.items():
            pi = ope.greedy_target(data, model, 0.1, 0.001) if isinstance(target, str) else target
            est = ope.estimate(data, pi, 0.1, 0.001, model)
            truth = float((pi * R).sum(axis=1).mean())

            def cell(e: ope.Estimate, truth: float = truth) -> str:
                mark = "" if e.low <= truth <= e.high else " ✗"
                return f"{e.value:.3f} [{e.low:.3f}, {e.high:.3f}]{mark}"

            ess = ope.diagnostics(data, pi)["ess"]
            lines.append(
                f"| {name} | {truth:.3f} | {cell(est['ips'])} | {cell(est['snips'])} | "
                f"{cell(est['dr'])} | {ess:.0f} |"
            )
        lines.append("")
        lines.append("✗: the 95 % interval misses the truth.")
    finally:
        engine.dispose()
        drop_schema(url, schema)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--through-service", type=int, default=0, metavar="N")
    args = parser.parse_args()
    from evaluation.bench import one_blas_thread

    records = read_outcomes(DATA)
    lines = ["# gsm8k evaluation figures", ""]
    wall, result = headline()
    c = result["curves"]["router"]
    methods = result["methods"]
    lines += [
        "## Headline (cold start, delay 100, 5 seeds)",
        "",
        "```",
        "metallm " + " ".join(a if " " not in a else f"'{a}'" for a in HEADLINE),
        "```",
        "",
        f"- Router cost at 95 % of GPT-4's accuracy ({c['target_accuracy']:.2%}), as a share of "
        f"GPT-4-only cost: {pct(c['cost_at_95_pct'])} (measured λ points), "
        f"{pct(c['cost_at_95_interpolated_pct'])} (interpolated on the hull). Target ≤ 40 %.",
        f"- Router APGR {c['apgr']:.3f}, AIQ {c['aiq']:.4f} (random mixing: APGR 0.500).",
        f"- At λ = 0.1: accuracy {methods['router']['accuracy']['mean']:.2%} ± "
        f"{methods['router']['accuracy']['std']:.2%}, cost "
        f"{methods['router']['cost_pct_of_best_arm']['mean']:.1f} % of GPT-4.",
        f"- Wall time of the command: {wall:.0f} s (embeddings cached).",
        "",
    ]
    with one_blas_thread():
        problem = Problem.from_records(records, CachedEmbedder.for_model().embed(
            [r.text for r in records]))  # fmt: skip
        lines += [
            "## Variants (5 seeds each; offline columns: APGR / cost at 95 %)",
            "",
            "| router | APGR | cost at 95 % (measured) | (interpolated) | LinUCB offline "
            "| kNN offline |",
            "|---|---|---|---|---|---|",
            *variants(problem),
            "",
            "## Routing signal in the embedding",
            "",
            *signal(problem),
            "",
            "## Speed",
            "",
            *speed(records),
        ]
    if args.through_service:
        lines += through_service(args.through_service)
    text = "\n".join(lines) + "\n"
    (ROOT / "benchmarks" / "results" / "evaluation_gsm8k.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
