"""PNG plots of a benchmark: accuracy against cost, and cumulative reward over the stream.

Needs matplotlib (drawn off-screen with the Agg backend).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from evaluation.bench import ORACLE, ROUTER, BenchResult

_MARKERS = {"arm": "s", "oracle": "*", "baseline": "o", "router": "D"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(result: BenchResult) -> dict[str, str]:
    """One colour per method, the same in every plot (curve and point)."""
    names = list(dict.fromkeys([*result.methods, *result.sweep]))
    palette = [f"C{i}" for i in range(10)] + ["#8c564b", "#17becf", "#bcbd22", "#7f7f7f"]
    fixed = {ROUTER: "C0", ORACLE: "C3"}
    rest = [c for c in palette if c not in fixed.values()]
    out = dict(fixed)
    for name in names:
        if name not in out:
            out[name] = rest[(len(out) - len(fixed)) % len(rest)]
    return out


def _best_cost(result: BenchResult) -> float:
    return result.methods[f"arm: {result.best_arm}"]["total_cost"]["mean"]


def accuracy_vs_cost(result: BenchResult, path: Path, title: str = "") -> Path:
    """Every method as a point (mean over seeds, with its spread), and the λ-sweep curves."""
    plt = _pyplot()
    ref = _best_cost(result)
    colors = _colors(result)
    fig, ax = plt.subplots(figsize=(9, 6))
    for name, points in result.sweep.items():
        xs = np.array([p["total_cost"] for p in points]) / ref * 100
        ys = np.array([p["accuracy"] for p in points]) * 100
        errs = np.array([p["accuracy_std"] for p in points]) * 100
        style = "-" if name == ROUTER else "--"
        label = f"{name} (λ sweep)"
        if name in result.curves:
            label += f", APGR {result.curves[name]['apgr']:.3f}"
        ax.errorbar(xs, ys, yerr=errs, fmt=style + ".", capsize=2, label=label, color=colors[name])
    cheap = result.methods[f"arm: {result.cheapest_arm}"]
    best = result.methods[f"arm: {result.best_arm}"]
    ax.plot(
        [cheap["total_cost"]["mean"] / ref * 100, 100],
        [cheap["accuracy"]["mean"] * 100, best["accuracy"]["mean"] * 100],
        ":",
        color="grey",
        label="random mixing of cheapest and best arm",
    )
    ax.axhline(0.95 * best["accuracy"]["mean"] * 100, color="red", lw=0.8, ls=":")
    ax.annotate(
        f"95 % of {result.best_arm}",
        (0, 0.95 * best["accuracy"]["mean"] * 100),
        fontsize=8,
        color="red",
        va="bottom",
    )
    for name, m in result.methods.items():
        x = m["cost_pct_of_best_arm"]["mean"]
        y = m["accuracy"]["mean"] * 100
        ax.errorbar(
            x,
            y,
            xerr=m["cost_pct_of_best_arm"]["std"],
            yerr=m["accuracy"]["std"] * 100,
            fmt=_MARKERS.get(m["kind"], "o"),
            markersize=12 if name in (ROUTER, ORACLE) else 7,
            color=colors[name],
            label=name if name != ROUTER else f"router at λ = {result.config['lam']:g}",
        )
    ax.set_xlabel(f"cost, % of {result.best_arm} alone")
    ax.set_ylabel("accuracy, %")
    ax.set_title(title or "accuracy vs cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cumulative_reward(result: BenchResult, path: Path, title: str = "") -> Path:
    """Cumulative reward (at the run's λ) of every method over the evaluated stream; below,
    the same relative to the most accurate arm alone, where the differences show."""
    plt = _pyplot()
    colors = _colors(result)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 8), sharex=True)
    x = np.arange(result.start + 1, result.n_queries + 1)
    ref = np.asarray(result.cumulative_reward[f"arm: {result.best_arm}"])
    for name, series in result.cumulative_reward.items():
        lw = 2.5 if name in (ROUTER, ORACLE) else 1.2
        top.plot(x, series, lw=lw, label=name, color=colors[name])
        bottom.plot(x, np.asarray(series) - ref, lw=lw, color=colors[name])
    top.set_ylabel(f"cumulative reward (λ = {result.config['lam']:g})")
    top.set_title(title or "cumulative reward")
    top.legend(fontsize=7, loc="upper left")
    bottom.axhline(0, color="black", lw=0.6)
    bottom.set_ylabel(f"… minus {result.best_arm} alone")
    bottom.set_xlabel("query (file order)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
