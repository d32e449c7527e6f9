"""The report of ``regap-fast reproduce``: tables, paired differences over seeds, the gap-safety
correlation, the figure.

All statistics come from ``regap_fast.eval.stats``: Wilson intervals for unsafe rates (as
``safety-eval`` reports them), a Student-t interval for the mean per-seed difference (REGAP minus
the baseline of the same seed), Pearson and Spearman correlations (as ``compare`` computes them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from ..eval.stats import correlation, mean_interval, wilson_interval

CONDITION_NAMES = ("text", "blank", "noise", "image")
DESCRIPTIONS = {"text": "text only", "blank": "blank (white) image", "noise": "Gaussian-noise image",
                "image": "synthetic-set image"}


def _weights(runs: Sequence[dict]) -> list[float]:
    return sorted({r["regap_weight"] for r in runs})


def _count(run: dict, cond: str) -> tuple[int, int]:
    """(unsafe answers, answers) of one run under one condition."""
    if "unsafe" in run and "n" in run:
        return int(run["unsafe"][cond]), int(run["n"][cond])
    raise ValueError("a run needs its 'unsafe' and 'n' counts per condition for the pooled intervals")


def condition_table(runs: Sequence[dict], conditions: Sequence[str] = CONDITION_NAMES) -> dict:
    """Per condition, per lambda: the unsafe answers pooled over seeds with their Wilson 95% interval
    (pooling treats every answer as independent: it shows the judge's counting noise, not the spread
    between seeds, which ``paired_differences`` gives), and the per-seed rates with their mean."""
    table = {}
    for cond in conditions:
        table[cond] = {}
        for w in _weights(runs):
            rs = sorted((r for r in runs if r["regap_weight"] == w), key=lambda r: r["seed"])
            k = sum(_count(r, cond)[0] for r in rs)
            n = sum(_count(r, cond)[1] for r in rs)
            lo, hi = wilson_interval(k, n)
            per_seed = [r["unsafe_rate"][cond] for r in rs]
            table[cond][f"{w:g}"] = {"regap_weight": w, "unsafe": k, "n": n, "rate": k / n if n else None,
                                     "ci95": [lo, hi] if n else [None, None], "seeds": [r["seed"] for r in rs],
                                     "per_seed": per_seed, "mean_over_seeds": sum(per_seed) / len(per_seed)}
    return table


def paired_differences(runs: Sequence[dict], baseline: float = 0.0,
                       conditions: Sequence[str] = CONDITION_NAMES) -> dict:
    """For each lambda other than ``baseline`` and each condition: the per-seed differences
    ``rate(lambda, seed) - rate(baseline, seed)`` over the seeds that have both, their mean with a
    95% t-interval (clipped to [-1, 1], where a difference of rates lies), and in how many seeds REGAP
    was lower (won), equal, higher (lost)."""
    base = {r["seed"]: r for r in runs if r["regap_weight"] == baseline}
    if not base:
        raise ValueError(f"no baseline runs (regap_weight = {baseline:g})")
    out = {}
    for w in _weights(runs):
        if w == baseline:
            continue
        mine = {r["seed"]: r for r in runs if r["regap_weight"] == w}
        seeds = sorted(set(mine) & set(base))
        out[f"{w:g}"] = {}
        for cond in conditions:
            diffs = [mine[s]["unsafe_rate"][cond] - base[s]["unsafe_rate"][cond] for s in seeds]
            m = mean_interval(diffs)
            if m["low"] is not None:  # a difference of two rates lies in [-1, 1]; the t-interval need not
                m["low"], m["high"] = max(-1.0, m["low"]), min(1.0, m["high"])
            out[f"{w:g}"][cond] = {"seeds": seeds, "differences": diffs, **m,
                                   "wins": sum(d < 0 for d in diffs), "ties": sum(d == 0 for d in diffs),
                                   "losses": sum(d > 0 for d in diffs)}
    return out


def gap_correlations(runs: Sequence[dict], conditions: Sequence[str] = CONDITION_NAMES) -> dict:
    """Pearson and Spearman of the gap against the unsafe rate, over all runs, per condition
    (``regap_fast.eval.stats.correlation``, the function ``compare`` uses)."""
    gaps = [r["final_gap"] for r in runs]
    return {cond: correlation(gaps, [r["unsafe_rate"][cond] for r in runs]) for cond in conditions}


def stage1_view(runs: Sequence[dict]) -> list[dict]:
    """The runs with their stage-1 measurements (``run["after_stage1"]``) in place of the final ones."""
    return [dict(r, **r["after_stage1"]) for r in runs if r.get("after_stage1")]


def _stage(runs: Sequence[dict], baseline: float) -> dict:
    return {"unsafe_rate": condition_table(runs), "paired_difference": paired_differences(runs, baseline),
            "correlation": gap_correlations(runs)}


def build_report(runs: Sequence[dict], baseline: float = 0.0) -> dict:
    """The statistics of the final models (after stage 2) at the top level; the same of the stage-1
    models under ``after_stage1`` when the runs have them; the gap and caption loss per lambda."""
    report = {"conditions": {c: DESCRIPTIONS[c] for c in CONDITION_NAMES}, **_stage(runs, baseline),
              "gap": {f"{w:g}": _spread([r["final_gap"] for r in runs if r["regap_weight"] == w])
                      for w in _weights(runs)},
              "caption_loss": {f"{w:g}": _spread([r["final_lm_loss"] for r in runs if r["regap_weight"] == w])
                               for w in _weights(runs)}}
    view = stage1_view(runs)
    if view and len(view) == len(runs):
        report["after_stage1"] = _stage(view, baseline)
    return report


def _spread(values: list[float]) -> dict:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "values": values}


# --------------------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------------------


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _pts(x) -> str:
    return "-" if x is None else f"{100 * x:+.1f}"


def _corr(c: dict) -> str:
    if c.get("note"):
        return c["note"]
    return (f"Pearson r = {c['pearson']['r']:+.2f} (p = {c['pearson']['p']:.2g}), "
            f"Spearman rho = {c['spearman']['rho']:+.2f} (p = {c['spearman']['p']:.2g}), n = {c['n']}")


def _condition_lines(stage: dict, weights: list[str]) -> list[str]:
    diffs = [w for w in weights if w in stage["paired_difference"]]
    header = "| condition | " + " | ".join(f"lambda = {w}" for w in weights)
    header += "".join(f" | lambda {w} - 0 [95% CI] | won / tied / lost" for w in diffs) + " |"
    lines = [header, "|" + " --- |" * (1 + len(weights) + 2 * len(diffs))]
    for cond in CONDITION_NAMES:
        cells = []
        for w in weights:
            e = stage["unsafe_rate"][cond][w]
            cells.append(f"{_pct(e['rate'])} [{_pct(e['ci95'][0])}, {_pct(e['ci95'][1])}]")
        for w in diffs:
            d = stage["paired_difference"][w][cond]
            ci = "" if d["low"] is None else f" [{_pts(d['low'])}, {_pts(d['high'])}]"
            cells += [f"{_pts(d['mean'])}{ci}", f"{d['wins']} / {d['ties']} / {d['losses']}"]
        lines.append(f"| {DESCRIPTIONS[cond]} | " + " | ".join(cells) + " |")
    return lines


def headline(report: dict, cond: str = "image") -> list[str]:
    """One sentence per lambda and stage: the mean paired difference under ``cond``, its interval, the wins."""
    out = []
    stages = [("after stage 2", report), ("after stage 1", report.get("after_stage1"))]
    for w, by_cond in report["paired_difference"].items():
        parts = []
        for when, stage in stages:
            if not stage:
                continue
            d = stage["paired_difference"][w][cond]
            ci = "" if d["low"] is None else f" [95% CI {_pts(d['low'])}, {_pts(d['high'])}]"
            seeds = f"seed{'s' * (d['n'] != 1)}"
            parts.append(f"{when} {_pts(d['mean'])} points{ci}, lower in {d['wins']} of {d['n']} {seeds} "
                         f"({d['ties']} tied)")
        out.append(f"lambda {w} vs 0, unsafe rate with a {DESCRIPTIONS[cond]}: " + "; ".join(parts) + ".")
    return out


def format_report(report: dict, runs: Sequence[dict], n_prompts: int | None = None) -> str:
    """The report as Markdown (printed, and written to DIR/report.md)."""
    weights = [f"{w:g}" for w in _weights(runs)]
    seeds = sorted({r["seed"] for r in runs})
    gaps = ", ".join(f"lambda {w}: {report['gap'][w]['mean']:.3f}" for w in weights)
    losses = ", ".join(f"lambda {w}: {report['caption_loss'][w]['mean']:.3f}" for w in weights)
    lines = [*headline(report), f"Mean gap after stage 1: {gaps}. Mean held-out caption loss after stage 1: {losses}.",
             "", f"Unsafe rate (no refusal, `RefusalJudge`) on {n_prompts or 'the'} held-out harmful requests, "
             f"{len(seeds)} seed{'s' * (len(seeds) != 1)}: pooled over seeds with Wilson 95% intervals. "
             "Paired difference: REGAP minus the baseline of the same seed, mean over seeds with a 95% "
             "t-interval, in percentage points; won = seeds where REGAP's rate is lower.", "",
             "**After stage 2** (the final models):", ""]
    lines += _condition_lines(report, weights)
    if "after_stage1" in report:
        lines += ["", "**After stage 1** (before instruction tuning; the LM is still the pretrained one):", ""]
        lines += _condition_lines(report["after_stage1"], weights)
    lines += ["", "Per run (gap: the stage-1 model's mean per-sample gap on held-out pairs, `measure_gap`; caption "
              "loss: stage 1's held-out caption loss; unsafe rates of the final model, after stage 1 in "
              "parentheses; benign: held-out benign requests answered with an image attached):", "",
              "| seed | lambda | gap | caption loss | text | blank | noise | image | benign answered |",
              "|" + " --- |" * 9]
    for r in sorted(runs, key=lambda r: (r["seed"], r["regap_weight"])):
        s1 = (r.get("after_stage1") or {}).get("unsafe_rate", {})
        rates = " | ".join(_pct(r["unsafe_rate"][c]) + (f" ({_pct(s1[c])})" if c in s1 else "")
                           for c in CONDITION_NAMES)
        benign = _pct((r.get("benign_answer_rate") or {}).get("image"))
        lines.append(f"| {r['seed']} | {r['regap_weight']:g} | {r['final_gap']:.3f} | {r['final_lm_loss']:.3f} | "
                     f"{rates} | {benign} |")
    for title, stage in (("after stage 2", report), ("after stage 1", report.get("after_stage1"))):
        if stage:
            lines += ["", f"Gap vs unsafe rate across all runs, {title} (the paper's analysis):", ""]
            lines += [f"- {DESCRIPTIONS[c]}: {_corr(stage['correlation'][c])}" for c in CONDITION_NAMES]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# figure
# --------------------------------------------------------------------------------------------------


def _plot_stage(axes, stage: dict, runs: Sequence[dict], weights: list[str], when: str) -> None:
    ax1, ax2, ax3 = axes
    width = 0.8 / len(weights)
    for i, w in enumerate(weights):
        xs = [c + (i - (len(weights) - 1) / 2) * width for c in range(len(CONDITION_NAMES))]
        entries = [stage["unsafe_rate"][c][w] for c in CONDITION_NAMES]
        rates = [e["rate"] for e in entries]
        err = [[e["rate"] - e["ci95"][0] for e in entries], [e["ci95"][1] - e["rate"] for e in entries]]
        ax1.bar(xs, rates, width, yerr=err, capsize=3, color=f"C{i}", alpha=0.75, label=f"lambda = {w}")
        for x, e in zip(xs, entries):
            ax1.plot([x] * len(e["per_seed"]), e["per_seed"], "k.", ms=4, alpha=0.6)
    ax1.set_xticks(range(len(CONDITION_NAMES)), [DESCRIPTIONS[c] for c in CONDITION_NAMES], rotation=12)
    ax1.set(ylabel="unsafe rate (no refusal)", ylim=(0, 1.02),
            title=f"held-out harmful requests, {when}\n(bars: pooled, Wilson 95%; dots: seeds)")
    ax1.legend()
    diffs = list(stage["paired_difference"])
    for i, w in enumerate(diffs):
        for c, cond in enumerate(CONDITION_NAMES):
            d = stage["paired_difference"][w][cond]
            x = c + (i - (len(diffs) - 1) / 2) * 0.2
            ax2.plot([x] * len(d["differences"]), d["differences"], ".", color="0.5", ms=5)
            colour = f"C{weights.index(w)}"
            label = f"lambda = {w}" if c == 0 else None
            if d["low"] is not None:
                ax2.errorbar([x], [d["mean"]], yerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]], fmt="o",
                             color=colour, capsize=4, label=label)
            else:
                ax2.plot([x], [d["mean"]], "o", color=colour, label=label)
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set_xticks(range(len(CONDITION_NAMES)), [DESCRIPTIONS[c] for c in CONDITION_NAMES], rotation=12)
    ax2.set(ylabel="unsafe rate, REGAP minus baseline",
            title=f"paired per-seed difference, {when}\n(mean, 95% t-interval; dots: seeds)")
    if diffs:
        ax2.legend()
    for i, w in enumerate(weights):
        rs = [r for r in runs if f"{r['regap_weight']:g}" == w]
        ax3.plot([r["final_gap"] for r in rs], [r["unsafe_rate"]["image"] for r in rs], "o", color=f"C{i}",
                 label=f"lambda = {w}")
    corr = stage["correlation"]["image"]
    if not corr.get("note"):
        import numpy as np

        x = [r["final_gap"] for r in runs]
        slope, intercept = np.polyfit(x, [r["unsafe_rate"]["image"] for r in runs], 1)
        xs = np.linspace(min(x), max(x), 50)
        ax3.plot(xs, slope * xs + intercept, "--", color="0.5")
    ax3.set(xlabel="modality gap after stage 1 (mean per-sample, held-out pairs)",
            ylabel="unsafe rate with a synthetic-set image", ylim=(-0.02, 1.02),
            title=f"gap vs unsafe rate, all runs, {when}\n" + _corr(corr).replace(", n =", "\nn ="))
    ax3.title.set_fontsize(9)
    ax3.legend()


def plot_report(report: dict, runs: Sequence[dict], path: Path, title: str = "") -> None:
    """Per stage (after stage 2; after stage 1 when measured), three panels: the unsafe rate per
    condition and lambda (pooled, Wilson 95%; dots: seeds); the paired per-seed difference with its
    t-interval; the gap against the unsafe rate with a synthetic-set image, all runs."""
    from matplotlib.figure import Figure

    weights = [f"{w:g}" for w in _weights(runs)]
    stages = [(report, runs, "after stage 2")]
    if "after_stage1" in report:
        stages.insert(0, (report["after_stage1"], stage1_view(runs), "after stage 1"))
    fig = Figure(figsize=(17, 5 * len(stages)), layout="constrained")
    axes = fig.subplots(len(stages), 3, squeeze=False)
    for row, (stage, rs, when) in zip(axes, stages):
        _plot_stage(row, stage, rs, weights, when)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=100)
