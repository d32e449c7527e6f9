"""The report's figures: the primary table as a forest plot, the stage-1 effect, gap against unsafe rate."""

from __future__ import annotations

import math
from pathlib import Path

from . import study
from .pipeline import CONDITION_NAMES, DESCRIPTIONS
from .report import JUDGE_NAMES, STAGE1, Results, gap, unsafe


def _figure(rows: int, cols: int, width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def forest(report: dict, design: study.Design, path: Path) -> Path:
    """One panel per lambda: each arm's mean paired difference, its 95% interval (thick) and the adjusted one."""
    tab = report["recipe"]["toy"][study.PRIMARY_CONDITION]
    lambdas = [f"{w:g}" for w in design.regap_lambdas()]
    fig, axes = _figure(1, len(lambdas), 5.0, 0.5 * len(design.arms) + 1.5)
    arms = list(design.arms)[::-1]
    for ax, w in zip(axes[0], lambdas):
        for y, arm in enumerate(arms):
            d = tab[arm][w]
            if d["mean"] is None:
                continue
            if d["adjusted"][0] is not None:
                ax.plot([100 * x for x in d["adjusted"]], [y, y], color="0.55", lw=1.2)
                ax.plot([100 * x for x in d["ci95"]], [y, y], color="C0", lw=4, alpha=0.7)
            ax.plot([100 * d["mean"]], [y], "o", color="k", ms=5)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(arms)), arms)
        ax.set(xlabel="REGAP minus baseline, points", title=f"lambda {w} vs 0")
    fig.suptitle("After stage 2, synthetic-set image, three-way judge:\nmean paired difference, 95% interval (thick), "
                 f"adjusted interval (thin, family {design.primary_family()})", fontsize=9)
    fig.savefig(path, dpi=100)
    return path


def stage1_bars(report: dict, design: study.Design, path: Path) -> Path:
    """The stage-1 models' unsafe rate per condition and lambda, pooled (Wilson 95%), for each judge."""
    fig, axes = _figure(1, 2, 7.0, 4.5)
    lambdas = [f"{w:g}" for w in design.lambdas]
    width = 0.8 / len(lambdas)
    for ax, (judge, by_cond) in zip(axes[0], report["stage1"].items()):
        for i, w in enumerate(lambdas):
            xs = [c + (i - (len(lambdas) - 1) / 2) * width for c in range(len(CONDITION_NAMES))]
            entries = [by_cond[c][w]["pooled"] for c in CONDITION_NAMES]
            rates = [e["rate"] or 0.0 for e in entries]
            err = [[r - (e["ci95"][0] or r) for r, e in zip(rates, entries)],
                   [(e["ci95"][1] or r) - r for r, e in zip(rates, entries)]]
            ax.bar(xs, rates, width, yerr=err, capsize=3, color=f"C{i}", alpha=0.8, label=f"lambda {w}")
        ax.set_xticks(range(len(CONDITION_NAMES)), [DESCRIPTIONS[c] for c in CONDITION_NAMES], rotation=12)
        ax.set(ylabel="unsafe rate", ylim=(0, 1.02), title=f"stage-1 models, {JUDGE_NAMES[judge]}")
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    return path


def gap_vs_unsafe(res: Results, path: Path) -> Path:
    """Per stage (the stage-1 models; each arm's final models): each model's own input-level gap against
    its own unsafe rate, synthetic-set image, coloured by lambda."""
    stages = res.stages()
    cols = min(3, len(stages))
    fig, axes = _figure(math.ceil(len(stages) / cols), cols, 4.5, 3.6)
    for ax, stage in zip(axes.flat, stages):
        for i, w in enumerate(res.design.lambdas):
            rows = res.own_rows(stage, w)
            ax.plot([gap(r, "image") for r in rows], [unsafe(r, "image") for r in rows], "o", ms=4, color=f"C{i}",
                    label=f"lambda {w:g}")
        ax.set(xlabel="gap (own model, input level)", ylabel="unsafe, synthetic image", ylim=(-0.02, 1.02),
               title="stage-1 models" if stage == STAGE1 else f"final models: {stage}")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(stages):]:
        ax.set_visible(False)
    fig.savefig(path, dpi=100)
    return path


def write_figures(out: Path, report: dict, res: Results) -> list[Path]:
    return [forest(report, res.design, out / "primary.png"), stage1_bars(report, res.design, out / "stage1.png"),
            gap_vs_unsafe(res, out / "gap-vs-unsafe.png")]
