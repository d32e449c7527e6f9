"""The PNG figures of the three reports (matplotlib's object API: no pyplot, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def plot_gap(result: dict, path: Path) -> None:
    """Histogram of the per-sample gap; the gap and centroid distance at each LM layer."""
    from matplotlib.ticker import MaxNLocator

    layers = result.get("per_layer") or []
    fig, axes = _figure(11 if layers else 6, 4, 2 if layers else 1)
    hist = result["gap"]["histogram"]
    edges, counts = hist["edges"], hist["counts"]
    ax = axes[0]
    ax.stairs(counts, edges, fill=True, alpha=0.7)
    ax.axvline(result["gap"]["mean"], color="k", ls="--", label=f"mean {result['gap']['mean']:.4g}")
    ax.set(xlabel="per-sample gap ||mean image token - mean caption token||", ylabel="pairs",
           title=f"modality gap at the LLM input ({result['n_pairs']} pairs)")
    ax.legend()
    if layers:
        ax = axes[1]
        x = [row["layer"] for row in layers]
        mean = [row["gap_mean"] for row in layers]
        std = [row["gap_std"] for row in layers]
        ax.plot(x, mean, "o-", label="mean per-sample gap")
        ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
        ax.plot(x, [row["centroid_distance"] for row in layers], "s--", label="centroid distance")
        ax.set(xlabel="LM layer (0 = input embeddings; the last after the final norm)", ylabel="L2 distance",
               title="gap through the LM")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if min(mean) > 0 and max(mean) / min(mean) > 100:
            ax.set_yscale("log")
        ax.legend()
    fig.savefig(path, dpi=120)


def plot_mir(result: dict, path: Path) -> None:
    """MIR's per-layer Frechet distance (log scale) through the decoder layers."""
    from matplotlib.ticker import MaxNLocator

    mir = result["mir"]
    fig, axes = _figure(6.5, 4)
    ax = axes[0]
    x = [row["layer"] for row in mir["per_layer"]]
    y = [row["frechet"] for row in mir["per_layer"]]
    ax.plot(x, y, "o-")
    if min(y) > 0:
        ax.set_yscale("log")
    ax.set(xlabel="decoder layer", ylabel="Frechet distance (text-centric scale)",
           title=f"per-layer MIR ({result['n_pairs']} pairs): MIR = {mir['value']:.4f}")
    if len(x) <= 16:
        ax.set_xticks(x)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.savefig(path, dpi=120)


def _interval_errors(rows: list[dict], key: str = "rate"):
    lows = [r[key] - r["ci95"][0] if r["ci95"][0] is not None else 0 for r in rows]
    highs = [r["ci95"][1] - r[key] if r["ci95"][1] is not None else 0 for r in rows]
    return [lows, highs]


def plot_safety(report: dict, path: Path) -> None:
    """Unsafe rate per condition with Wilson 95% intervals; a category x condition heat map."""
    conditions = [c for c in report["conditions"] if report["unsafe_rate"][c]["n"] > 0]
    categories = list(report.get("by_category") or {})
    fig, axes = _figure(12 if len(categories) > 1 else 7, max(4, 0.35 * len(categories) + 1.5),
                        2 if len(categories) > 1 else 1)
    rows = [report["unsafe_rate"][c] for c in conditions]
    ax = axes[0]
    colours = ["tab:gray" if c == "none" else "tab:red" for c in conditions]
    ax.bar(range(len(conditions)), [r["rate"] for r in rows], yerr=_interval_errors(rows), color=colours,
           capsize=4, alpha=0.8)
    for i, r in enumerate(rows):
        ax.text(i, 0.01, f"n={r['n']}", ha="center", va="bottom", fontsize=7, rotation=90, color="white")
    ax.set_xticks(range(len(conditions)), conditions, rotation=30, ha="right")
    ax.set(ylim=(0, 1), ylabel="unsafe rate (Wilson 95% CI)",
           title=f"unsafe responses, judge: {report['judge'].get('name', '?')}")
    if len(categories) > 1:
        ax = axes[1]
        grid = [[report["by_category"][cat][c]["rate"] if c in report["by_category"][cat] else math.nan
                 for c in conditions] for cat in categories]
        image = ax.imshow([[math.nan if v is None else v for v in row] for row in grid], vmin=0, vmax=1,
                          cmap="Reds", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v is not None and not math.isnan(v):
                    ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=7,
                            color="white" if v > 0.6 else "black")
        ax.set_xticks(range(len(conditions)), conditions, rotation=30, ha="right")
        ax.set_yticks(range(len(categories)), categories, fontsize=8)
        ax.set_title("unsafe rate by category")
        fig.colorbar(image, ax=ax, fraction=0.04)
    fig.savefig(path, dpi=120)


def plot_compare(result: dict, path: Path) -> None:
    """Unsafe rate against gap, one point per run, with the fitted line and the correlations."""
    import numpy as np

    runs = result["runs"]
    fig, axes = _figure(6.5, 5)
    ax = axes[0]
    x = [r["gap"] for r in runs]
    y = [r["unsafe_rate"] for r in runs]
    ax.errorbar(x, y, yerr=_interval_errors(runs, "unsafe_rate"), fmt="o", capsize=4)
    for r in runs:
        ax.annotate(r["run"], (r["gap"], r["unsafe_rate"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if len(runs) >= 2 and len(set(x)) > 1:
        slope, intercept = np.polyfit(x, y, 1)
        xs = np.linspace(min(x), max(x), 50)
        ax.plot(xs, slope * xs + intercept, "--", color="tab:gray")
    corr = result["correlation"]
    note = corr.get("note") or (f"Pearson r = {corr['pearson']['r']:.3f} (p = {corr['pearson']['p']:.2g}), "
                                f"Spearman rho = {corr['spearman']['rho']:.3f} (p = {corr['spearman']['p']:.2g})")
    ax.set(xlabel=f"modality gap ({result['gap_metric']})",
           ylabel=f"unsafe rate ({result['safety_metric']}, Wilson 95% CI)",
           title=f"gap vs safety, judge: {result['judge']}\n{note}")
    ax.title.set_fontsize(9)
    fig.savefig(path, dpi=120)
