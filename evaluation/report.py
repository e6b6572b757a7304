"""A benchmark as a markdown report and a JSON file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from evaluation.bench import BenchResult


def _num(stats: dict[str, float], fmt: str, scale: float = 1.0) -> str:
    mean = stats["mean"] * scale
    if stats.get("std", 0.0) > 0:
        return f"{mean:{fmt}} ± {stats['std'] * scale:{fmt}}"
    return f"{mean:{fmt}}"


def _pct(value: float | None) -> str:
    return "not reached" if value is None or math.isnan(value) else f"{value:.1f} %"


def markdown(result: BenchResult, title: str) -> str:
    """The per-method table and, if there was a sweep, the curve metrics."""
    c = result.config
    n_eval = result.n_queries - result.start
    mode = f"budget {c['budget']:g} USD/query" if c.get("budget") is not None else "fixed λ"
    lines = [
        f"## {title}",
        "",
        f"{result.n_queries} queries, {n_eval} evaluated"
        + (f" after a warm start on the first {result.start}" if result.start else " (cold start)")
        + f"; rewards revealed {c['delay']} queries later; reward 1[correct] − λ·cost/"
        f"{c['cost_unit']:g} USD with λ = {c['lam']:g} ({mode}); policy `{c['policy']}` "
        f"{json.dumps(c['policy_params'])} on context `{c.get('context_layout', 'legacy')}`; "
        f"seeds {c['seeds']}.",
        "",
        f"| method | accuracy | total cost (USD) | cost % of {result.best_arm} | "
        "regret vs oracle | arm share |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in result.methods.items():
        share = ", ".join(f"{a} {s:.0%}" for a, s in m["share"].items() if s > 0)
        lines.append(
            f"| {name} | {_num(m['accuracy'], '.2f', 100)} % | {_num(m['total_cost'], '.4f')} | "
            f"{_num(m['cost_pct_of_best_arm'], '.1f')} % | {_num(m['regret'], '.1f')} | {share} |"
        )
    if result.curves:
        grid = ", ".join(f"{p['lambda']:g}" for p in result.sweep.get("router", []))
        target = next(iter(result.curves.values()))["target_accuracy"]
        lines += [
            "",
            f"Accuracy–cost curves from a λ sweep (λ ∈ {{{grid}}}; mean over seeds). Target: "
            f"95 % of {result.best_arm}'s accuracy = {target:.2%}.",
            "",
            f"| method | APGR | AIQ | cost at 95 % of {result.best_arm}'s accuracy "
            "(measured point) | (interpolated on the hull) |",
            "|---|---|---|---|---|",
        ]
        for name, s in result.curves.items():
            lines.append(
                f"| {name} | {s['apgr']:.3f} | {s['aiq']:.4f} | {_pct(s['cost_at_95_pct'])} | "
                f"{_pct(s['cost_at_95_interpolated_pct'])} |"
            )
    ts = result.extra.get("through_service")
    if ts:
        lines += [
            "",
            f"Through the service (Kafka → service → Postgres, replay arms), seed "
            f"{c['seeds'][0]}: {ts['same_decisions']}/{ts['queries']} decisions identical to "
            f"the in-process run ({ts['queries_per_second']} queries/s; decisions kept in "
            f"schema `{ts['schema']}`).",
        ]
    return "\n".join(lines) + "\n"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(result: BenchResult, path: Path) -> Path:
    path.write_text(json.dumps(_jsonable(result.to_json()), indent=1) + "\n", encoding="utf-8")
    return path
