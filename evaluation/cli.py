"""The evaluation subcommands of ``metallm``: ``record``, ``bench`` and ``evaluate``.

``app.cli`` adds them with :func:`add_commands` (this module is one of its
``COMMAND_MODULES``)::

    metallm record data.jsonl --out outcomes.jsonl          # or: metallm record --builtin ...
    metallm bench outcomes.jsonl --delay 100 --seeds 5 --out bench-out
    metallm bench outcomes.jsonl --through-service --local-broker --limit 300
    metallm evaluate --from-db --lambda 0.05 --lambda 0.2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.arguments import iso_datetime, positive_int
from service.settings import Settings

if TYPE_CHECKING:
    from evaluation.bench import BenchConfig, BenchResult, Problem

log = logging.getLogger(__name__)

Handler = Callable[[Settings, argparse.Namespace], int]


def _fail(message: str) -> int:
    print(f"metallm: {message}", file=sys.stderr)
    return 2


# ------------------------------------------------------------------------------ record
def cmd_record(settings: Settings, args: argparse.Namespace) -> int:
    from evaluation.record import RecordError, builtin_dataset, load_dataset, record
    from service.config import load_config

    if bool(args.dataset) == bool(args.builtin):
        return _fail("give a dataset file or --builtin (not both)")
    path = builtin_dataset() if args.builtin else Path(args.dataset)
    config_path = Path(args.config) if args.config else settings.config
    try:
        dataset = load_dataset(path)
        if args.limit is not None:
            dataset = dataset[: args.limit]
        config = load_config(config_path)
        summary = record(
            dataset,
            config,
            Path(args.out),
            concurrency=args.concurrency,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except RecordError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: {args.out} holds every query finished so far; "
            "run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    resumed = f" (resumed after {summary.resumed_from})" if summary.resumed_from else ""
    print(f"wrote {summary.written} queries to {summary.path}{resumed} in {summary.seconds:.1f} s")
    for arm, stats in summary.per_arm.items():
        print(
            f"  {arm}: accuracy {stats['accuracy']:.1%}, cost ${stats['cost_usd']:.6f}, "
            f"failed calls {int(stats['failed'])}"
        )
    return 0


# ------------------------------------------------------------------------------ bench
def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of numbers: {text!r}"
        ) from None


def _budget(text: str) -> tuple[float, bool]:
    """``0.0004`` (USD per query) or ``40%`` (of the most accurate arm's mean cost)."""
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0, True
        return float(text), False
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a budget: {text!r} (e.g. 0.0004 or 40%)") from None


def _bench_features(args: argparse.Namespace) -> list[str]:
    """``--feature`` specs, and those the tasks of ``--config`` declare."""
    features = list(args.feature or [])
    if args.config:
        from service.config import load_config

        for task in load_config(Path(args.config)).tasks.values():
            features.extend(f"{key}:{kind}" for key, kind in task.features.items())
    return list(dict.fromkeys(features))


def _load_problem(args: argparse.Namespace, settings: Settings, context):
    import numpy as np

    from evaluation.bench import Problem, stream_contexts
    from evaluation.embed_cache import CachedEmbedder, EmbeddingCache, default_cache_path
    from service.outcomes import read_outcomes

    records = read_outcomes(args.outcomes)
    if args.limit is not None:
        records = records[: args.limit]
    cache = EmbeddingCache(
        Path(args.embedding_cache) if args.embedding_cache else default_cache_path()
    )
    embedder = CachedEmbedder.for_model(args.embedding_model or settings.embedding_model, cache)
    embeddings = np.asarray(embedder.embed([r.text for r in records]))
    if not args.quiet:
        print(
            f"embeddings: {embedder.hits} from the cache, {embedder.misses} computed "
            f"({embedder.name}, {cache.path})",
            file=sys.stderr,
        )
    contexts = stream_contexts(records, embeddings, context)
    return Problem.from_records(records, contexts, embeddings), embedder


def _progress(quiet: bool):
    if quiet:
        return contextlib.nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), transient=True
    )


def cmd_bench(settings: Settings, args: argparse.Namespace) -> int:
    from evaluation.bench import BenchConfig, BenchError
    from service.config import ConfigError
    from service.outcomes import OutcomesError

    if args.through_service and args.budget is not None:
        return _fail("--through-service replays a fixed λ: drop --budget")
    if args.through_service and args.baseline is not None:
        return _fail("--through-service does not run conservative mode: drop --baseline")
    if args.local_broker and not args.through_service:
        return _fail("--local-broker goes with --through-service")
    try:
        params = _policy_params(settings, args.policy_params)
    except json.JSONDecodeError as exc:
        return _fail(f"--policy-params is not JSON: {exc}")
    try:
        context = _bench_context(settings, args)
        problem, embedder = _load_problem(args, settings, BenchConfig(**context).new_context())
        config = _bench_config(settings, args, problem, params, context)
        result = _run_with_progress(problem, config, args.quiet)
    except (OutcomesError, BenchError, ConfigError, ValueError) as exc:
        return _fail(str(exc))

    out = Path(args.out or f"bench-{Path(args.outcomes).stem}")
    out.mkdir(parents=True, exist_ok=True)
    if args.through_service:
        try:
            _check_through_service(settings, args, problem, config, result, embedder)
        except _ReplayFailed as exc:
            return _fail(str(exc))
    _write_bench_report(result, args, out)
    through = result.extra.get("through_service")
    if through is not None and not through["identical"]:
        mismatch = through.get("first_mismatch")
        print(f"metallm: the service decided differently: {mismatch}", file=sys.stderr)
        return 1
    return 0


def _policy_params(settings: Settings, given: str | None) -> dict[str, Any]:
    """The router's parameters: the settings' (but their seed: the bench gives each run its
    own), updated with ``--policy-params``."""
    params = dict(settings.policy_params)
    params.pop("seed", None)
    if given:
        params.update(json.loads(given))
    return params


def _bench_context(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`BenchConfig` fields of the router's context: the flags, else the settings."""
    return {
        "context_embedding": args.context_embedding or settings.context_embedding,
        "task_buckets": settings.context_task_buckets,
        "feature_buckets": settings.context_feature_buckets,
        "features": _bench_features(args),
    }


def _bench_config(
    settings: Settings,
    args: argparse.Namespace,
    problem: Problem,
    params: dict[str, Any],
    context: dict[str, Any],
) -> BenchConfig:
    """What to run, from the flags and the settings; a relative ``--budget`` is resolved
    against the most accurate arm's mean cost on the evaluated part."""
    from evaluation.bench import BenchConfig, split

    start = split(problem.n, args.warm_start)  # its message, for a --warm-start too large
    budget = None
    if args.budget is not None:
        value, relative = args.budget
        if relative:
            best, _ = problem.best_and_cheapest(start)
            value *= float(problem.cost[start:, best].mean())
        budget = value
    baseline = args.baseline
    if baseline == "best":  # the most accurate arm of the evaluated part (in hindsight)
        baseline = problem.arms[problem.best_and_cheapest(start)[0]]
    return BenchConfig(
        delay=args.delay,
        lam=settings.reward_lambda if args.lam is None else args.lam,
        cost_unit=settings.cost_unit_usd if args.cost_unit is None else args.cost_unit,
        budget=budget,
        budget_lr=args.budget_lr,
        warm_start=args.warm_start,
        seeds=list(range(args.seed, args.seed + args.seeds)),
        policy=args.policy or settings.policy,
        policy_params=params,
        lambdas=None if args.no_sweep else (args.lambdas or ()),
        knn_k=args.knn_k,
        offline_folds=args.offline_folds,
        baselines=not args.no_baselines,
        baseline=baseline,
        tolerance=args.tolerance,
        **context,
    )


def _run_with_progress(problem: Problem, config: BenchConfig, quiet: bool) -> BenchResult:
    """:func:`~evaluation.bench.run_bench`, with a progress bar per stage."""
    from evaluation.bench import one_blas_thread, run_bench

    with _progress(quiet) as bar, one_blas_thread():
        tasks: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if bar is None:
                return
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        return run_bench(problem, config, progress)


class _ReplayFailed(Exception):
    """The through-service replay raised (the message says what)."""


def _check_through_service(
    settings: Settings,
    args: argparse.Namespace,
    problem: Problem,
    config: BenchConfig,
    result: BenchResult,
    embedder,
) -> None:
    """Replay the first seed's run through the service (on a broker of its own with
    ``--local-broker``), and put the query-by-query comparison in ``result.extra``."""
    from evaluation.through_service import compare, run_through_service

    seed = config.seeds[0]
    warm = _warm_state(problem, config, seed, result.start)
    with contextlib.ExitStack() as stack:
        if args.local_broker:
            settings = _on_local_broker(settings, stack)
        bar = stack.enter_context(_progress(args.quiet))
        task = None if bar is None else bar.add_task("through the service", total=None)

        def tick(done: int, total: int) -> None:
            if bar is not None:
                bar.update(task, completed=done, total=total)

        try:
            run = run_through_service(
                problem,
                Path(args.outcomes),
                settings,
                config,
                seed,
                result.start,
                embedder,
                warm_state=warm,
                schema=args.db_schema,
                progress=tick,
            )
        except Exception as exc:
            log.exception("the through-service replay failed")
            raise _ReplayFailed(f"the through-service replay failed: {exc}") from exc
    result.extra["through_service"] = compare(problem, result.start, result.router_runs[seed], run)


def _on_local_broker(settings: Settings, stack: contextlib.ExitStack) -> Settings:
    """``settings`` on a Tansu broker of their own, which ``stack`` stops."""
    from producers.local_broker import LocalBroker

    broker = stack.enter_context(LocalBroker())
    return settings.model_copy(
        update={
            "kafka_bootstrap": broker.bootstrap,
            "session_timeout_ms": 2000,
            "heartbeat_interval_ms": 500,
        }
    )


def _warm_state(problem: Problem, config: BenchConfig, seed: int, start: int) -> bytes | None:
    """The checkpoint the service starts from: the router of ``seed`` warm-started on the
    first ``start`` queries, with its context builder having seen them (None: a cold start)."""
    import numpy as np

    from evaluation.bench import context_after, make_router, one_blas_thread, warmed

    if not start:
        return None
    with one_blas_thread():
        policy = warmed(
            make_router(config, seed), problem, np.arange(start), config.lam, config.cost_unit
        )
        policy.context = context_after(config.new_context(), problem.records[:start])
        return policy.dumps()


def _write_bench_report(result: BenchResult, args: argparse.Namespace, out: Path) -> None:
    """results.md (also printed), results.json and, unless ``--no-plots``, the PNG plots."""
    from evaluation import plots, report

    title = f"metallm bench {Path(args.outcomes).name}"
    text = report.markdown(result, title)
    (out / "results.md").write_text(text, encoding="utf-8")
    report.write_json(result, out / "results.json")
    if not args.no_plots:
        plots.accuracy_vs_cost(result, out / "accuracy_vs_cost.png", title)
        plots.cumulative_reward(result, out / "cumulative_reward.png", title)
    print(text)
    files = "results.md, results.json" + ("" if args.no_plots else ", 2 PNG plots")
    print(f"wrote {files} to {out}/", file=sys.stderr)


# ------------------------------------------------------------------------------ evaluate
def _targets(specs: list[str] | None, data, engine) -> dict[str, Any]:
    """Target policies by name: logged, uniform, arm:NAME, greedy, checkpoint, file:PATH."""
    from evaluation import ope
    from service.log.checkpoints import latest_checkpoint
    from service.policy import loads

    checkpoint = None
    with engine.connect() as conn:
        row = latest_checkpoint(conn)
    if row is not None:
        checkpoint = row.state
    if not specs:
        specs = ["logged", "uniform", *(f"arm:{a}" for a in data.arms), "greedy"]
        if checkpoint is not None:
            specs.append("checkpoint")
    out: dict[str, Any] = {}
    for spec in specs:
        if spec == "logged":
            out[spec] = ope.logged_policy(data)
        elif spec == "uniform":
            out[spec] = ope.uniform(data)
        elif spec == "greedy":
            out[spec] = "greedy"
        elif spec.startswith("arm:"):
            out[spec] = ope.fixed_arm(data, spec[4:])
        elif spec == "checkpoint":
            if checkpoint is None:
                raise ValueError("the database holds no policy checkpoint")
            out[spec] = ope.from_policy(data, loads(checkpoint))
        elif spec.startswith("file:"):
            out[spec] = ope.from_policy(data, loads(Path(spec[5:]).read_bytes()))
        else:
            raise ValueError(
                f"unknown target {spec!r}: logged, uniform, arm:NAME, greedy, checkpoint, file:PATH"
            )
    return out


def cmd_evaluate(settings: Settings, args: argparse.Namespace) -> int:
    import numpy as np

    from evaluation import ope
    from service.storage import make_engine

    if not args.from_db:
        return _fail("evaluate reads logged decisions: pass --from-db")
    engine = make_engine(settings.database_url, settings.database_schema)
    try:
        data = ope.load_decisions(engine, args.since, args.until, args.policy)
        targets = _targets(args.target, data, engine)
    except (ope.NoLoggedData, ValueError) as exc:
        return _fail(str(exc))
    finally:
        engine.dispose()
    unit = settings.cost_unit_usd if args.cost_unit is None else args.cost_unit
    logged = data.logged_lambda[np.isfinite(data.logged_lambda)]
    lams = args.lams or [float(np.median(logged)) if logged.size else settings.reward_lambda]
    rows = ope.evaluate_targets(data, targets, lams, unit, args.confidence)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    from rich.console import Console
    from rich.table import Table

    pct = f"{args.confidence:.0%}"
    table = Table(
        title=f"off-policy estimates of the mean reward per query, {data.n} logged decisions "
        f"(policies: {', '.join(data.policies) or '?'}), {pct} intervals"
    )
    for col in ("target", "λ", "observed (logged)", "IPS", "SNIPS", "DR", "ESS"):
        table.add_column(col, justify="right")

    def cell(e: dict[str, float]) -> str:
        return f"{e['value']:.4f} [{e['low']:.4f}, {e['high']:.4f}]"

    for r in rows:
        table.add_row(
            r["target"],
            f"{r['lambda']:g}",
            f"{r['observed_mean_reward']:.4f}",
            cell(r["ips"]),
            cell(r["snips"]),
            cell(r["dr"]),
            f"{r['ess']:.0f}",
        )
    Console(width=160).print(table)
    unsupported = [r["target"] for r in rows if r["unsupported_mass"] > 0]
    if unsupported:
        print(
            "note: " + ", ".join(sorted(set(unsupported))) + " put probability on arms the log "
            "never offered; those parts are invisible to every estimator",
            file=sys.stderr,
        )
    return 0


def add_commands(sub: argparse._SubParsersAction) -> dict[str, Handler]:
    """Register ``record``, ``bench`` and ``evaluate``; returns their handlers by name."""
    _add_record(sub)
    _add_bench(sub)
    _add_evaluate(sub)
    return {"record": cmd_record, "bench": cmd_bench, "evaluate": cmd_evaluate}


def _add_record(sub: argparse._SubParsersAction) -> None:
    rec = sub.add_parser(
        "record",
        help="run every configured arm on a labeled dataset and write an outcomes file",
        description="Run every arm of the config on each query of a labeled dataset "
        "(JSONL/CSV: query_id, text, task, label[, options]) and write an outcomes file. "
        "Resumable: run the same command again after an interruption.",
    )
    rec.add_argument("dataset", nargs="?", help="labeled dataset file (JSONL or CSV)")
    rec.add_argument(
        "--builtin",
        action="store_true",
        help="the built-in multi-task set (320 BIG-bench queries; tasks of "
        "config/metallm.example.yaml)",
    )
    rec.add_argument("--out", required=True, help="outcomes file to write (or resume)")
    rec.add_argument("--config", help="tasks-and-arms YAML (default: METALLM_CONFIG)")
    rec.add_argument("--concurrency", type=positive_int, default=4, help="queries in flight (4)")
    rec.add_argument("--limit", type=positive_int, help="only the first N queries")
    rec.add_argument("--overwrite", action="store_true", help="start again instead of resuming")
    rec.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser(
        "bench",
        help="replay an outcomes file through the router and every baseline",
        description="Stream the queries of an outcomes file in order; the router decides from "
        "each query's context (bias, length, task, declared metadata features, the reduced "
        "embedding: as the service) and learns each reward --delay queries later. Baselines, a λ "
        "sweep (APGR, AIQ, cost at 95%% of the best arm's accuracy), a markdown table, a JSON "
        "file and PNG plots.",
    )
    # in the order --help lists them
    _bench_stream_arguments(b)
    _bench_router_arguments(b)
    _bench_comparison_arguments(b)
    _bench_context_arguments(b)
    _bench_output_arguments(b)
    _bench_through_service_arguments(b)
    b.add_argument("--quiet", action="store_true", help="no progress output")


def _bench_stream_arguments(b: argparse.ArgumentParser) -> None:
    """The stream and how its rewards are scored and revealed."""
    b.add_argument("outcomes", help="outcomes file (JSON Lines)")
    b.add_argument("--delay", type=int, default=100, help="reveal rewards N queries later (100)")
    b.add_argument(
        "--lambda",
        dest="lam",
        type=float,
        help="λ, the price of cost in reward (default: METALLM_REWARD_LAMBDA)",
    )
    b.add_argument(
        "--budget",
        type=_budget,
        help="budget mode: target mean cost per query, in USD (0.0004) or as a %% of the most "
        "accurate arm's (40%%); λ then follows the budget pacer",
    )
    b.add_argument("--budget-lr", type=float, default=0.05, help="budget pacer step (0.05)")
    b.add_argument(
        "--cost-unit", type=float, help="USD that λ applies per (default: METALLM_COST_UNIT_USD)"
    )
    b.add_argument(
        "--warm-start",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="train on the first FRACTION with full information, then continue online (0)",
    )
    b.add_argument(
        "--baseline",
        metavar="ARM",
        help="conservative mode: every task's baseline arm ('best': the most accurate arm); "
        "the router's estimated reward never falls more than --tolerance below its own",
    )
    b.add_argument(
        "--tolerance",
        type=float,
        default=0.05,
        help="conservative mode's tolerance δ, relative (0.05)",
    )


def _bench_router_arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("--seeds", type=int, default=1, help="runs with seeds S..S+K-1 (1)")
    b.add_argument("--seed", type=int, default=0, help="first seed (0)")
    b.add_argument("--policy", help="routing policy (default: METALLM_POLICY)")
    b.add_argument("--policy-params", help="JSON parameters (default: METALLM_POLICY_PARAMS)")


def _bench_comparison_arguments(b: argparse.ArgumentParser) -> None:
    """The λ sweep and the baselines."""
    b.add_argument(
        "--lambdas",
        type=_floats,
        help="λ sweep grid, comma separated (default: 12 values spanning the arms' costs)",
    )
    b.add_argument("--no-sweep", action="store_true", help="skip the λ sweep")
    b.add_argument("--no-baselines", action="store_true", help="only the router and the arms")
    b.add_argument("--knn-k", type=int, default=10, help="neighbours of the kNN router (10)")
    b.add_argument(
        "--offline-folds",
        type=int,
        default=5,
        help="cold start: cross-fitting folds of the offline baselines (5)",
    )


def _bench_context_arguments(b: argparse.ArgumentParser) -> None:
    """What the router's context is made of."""
    b.add_argument(
        "--feature",
        action="append",
        metavar="KEY:KIND",
        help="use each line's metadata.KEY as a routing feature, KIND categorical or numeric "
        "(repeatable)",
    )
    b.add_argument(
        "--config", help="tasks-and-arms YAML: use the metadata features its tasks declare"
    )
    b.add_argument(
        "--context-embedding",
        help="the embedding part of the router's context: none, raw, project:K or legacy "
        "(default: METALLM_CONTEXT_EMBEDDING)",
    )


def _bench_output_arguments(b: argparse.ArgumentParser) -> None:
    """How much of the file, where the results go, and the embeddings' model and cache."""
    b.add_argument("--limit", type=positive_int, help="only the first N queries")
    b.add_argument("--out", help="output folder (default: bench-<file name>)")
    b.add_argument("--no-plots", action="store_true")
    b.add_argument("--embedding-model", help="sentence-transformers folder (default: MiniLM)")
    b.add_argument(
        "--embedding-cache", help="SQLite cache file (default: ~/.cache/metallm/embeddings.sqlite)"
    )


def _bench_through_service_arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument(
        "--through-service",
        action="store_true",
        help="also replay through Kafka → service → Postgres and check the decisions match",
    )
    b.add_argument(
        "--local-broker", action="store_true", help="with --through-service: start a Tansu broker"
    )
    b.add_argument("--db-schema", help="with --through-service: Postgres schema (default: new)")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser(
        "evaluate",
        help="off-policy estimates (IPS, SNIPS, DR) from the logged decisions",
        description="Estimate from the decisions table (propensities, contexts, outcomes) what "
        "other policies, or other λ values, would have earned per query, with confidence "
        "intervals. Targets: logged, uniform, arm:NAME, greedy (a router fitted on the log for "
        "each λ), checkpoint (the service's latest policy, frozen), file:PATH (a checkpoint).",
    )
    ev.add_argument("--from-db", action="store_true", help="read METALLM_DATABASE_* (required)")
    ev.add_argument("--target", action="append", help="a target policy (repeatable)")
    ev.add_argument(
        "--lambda",
        dest="lams",
        type=float,
        action="append",
        help="score rewards at this λ (repeatable; default: the logged λ)",
    )
    ev.add_argument("--cost-unit", type=float, help="default: METALLM_COST_UNIT_USD")
    ev.add_argument("--since", type=iso_datetime, help="only decisions from this ISO time")
    ev.add_argument("--until", type=iso_datetime, help="only decisions before this ISO time")
    ev.add_argument("--policy", help="only decisions made by this policy")
    ev.add_argument("--confidence", type=float, default=0.95, help="interval level (0.95)")
    ev.add_argument("--json", help="also write the estimates to this file")
