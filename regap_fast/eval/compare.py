"""``regap-fast compare``: modality gap and unsafe rate across runs, and how they correlate.

Each run folder holds the ``gap.json`` of ``regap-fast gap --out RUN`` and the ``safety.json`` of
``regap-fast safety-eval --out RUN`` (measure every checkpoint into its own folder). The paper's
analysis: the gap is strongly inversely correlated with safety (a larger gap, a higher unsafe rate).
"""

from __future__ import annotations

import argparse
import csv
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

from .gap import GAP_JSON
from .safety import REPORT_JSON, TEXT_ONLY
from .stats import correlation

GAP_METRICS = {"gap_mean": "mean per-sample gap", "centroid_distance": "centroid distance",
               "mir": "MIR (Modality Integration Rate)"}
COMPARE_JSON, COMPARE_CSV, COMPARE_PNG = "compare.json", "compare.csv", "compare.png"


def _read(path: Path, command: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `regap-fast {command} MODEL ... --out {path.parent}` first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg})") from None


def _safety(report: dict, metric: str, where: Path) -> dict:
    """The unsafe-rate entry ``metric`` names: ``image`` (all image conditions pooled), or a condition."""
    entry = (report["summary"]["image"] if metric == "image" else report["unsafe_rate"].get(metric))
    if not entry or not entry["n"]:
        have = ", ".join(["image", *report["unsafe_rate"]]) if report["summary"]["image"] else \
            ", ".join(report["unsafe_rate"])
        raise ValueError(f"{where}: no unsafe rate for {metric!r} (this run has: {have})")
    return entry


def _gap_value(gap: dict, metric: str, where: Path) -> float:
    if metric == "mir":
        if "mir" not in gap:
            raise ValueError(f"{where} has no MIR: measure it with `regap-fast gap MODEL ... --metric mir` (or both)")
        return gap["mir"]["value"]
    if "gap" not in gap:
        raise ValueError(f"{where} has only MIR: compare with --gap-metric mir, or measure with --metric l2 (or both)")
    return gap["gap"]["mean"] if metric == "gap_mean" else gap["centroid_distance"]


def compare(run_dirs: Sequence, *, gap_metric: str = "gap_mean", safety_metric: str = "image") -> dict:
    """Gap and unsafe rate of each run, side by side, and their Pearson and Spearman correlation.

    Args:
        run_dirs: folders holding ``gap.json`` and ``safety.json``.
        gap_metric: ``gap_mean`` (the mean per-sample gap REGAP trains on), ``centroid_distance``, or ``mir``
            (the REGAP paper's measure: ``regap-fast gap --metric mir``).
        safety_metric: ``image`` (the unsafe rate over all image conditions pooled), ``none``
            (text only), or any condition name of the runs.

    All runs must have been judged by the same judge (rates from different judges do not compare).
    """
    if gap_metric not in GAP_METRICS:
        raise ValueError(f"unknown gap metric {gap_metric!r}; choose one of {tuple(GAP_METRICS)}")
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise ValueError("no run folders given")
    names = [d.resolve().name for d in dirs]
    if len(set(names)) < len(names):  # same leaf names (run_a/ckpt, run_b/ckpt): use the paths as given
        names = [str(d) for d in dirs]
    runs, judges, prompt_counts = [], {}, set()
    for name, d in zip(names, dirs):
        gap = _read(d / GAP_JSON, "gap")
        report = _read(d / REPORT_JSON, "safety-eval")
        entry = _safety(report, safety_metric, d / REPORT_JSON)
        judges[name] = report["judge"]
        prompt_counts.add(report["n_prompts"])
        runs.append({"run": name, "dir": str(d), "gap": _gap_value(gap, gap_metric, d / GAP_JSON),
                     "unsafe_rate": entry["rate"], "ci95": entry["ci95"],
                     "n": entry["n"], "gap_pairs": gap["n_pairs"]})
    distinct = {json.dumps(j, sort_keys=True) for j in judges.values()}
    if len(distinct) > 1:
        raise ValueError("the runs were judged by different judges, so their unsafe rates do not compare: "
                         + "; ".join(f"{n}: {j.get('name')}" for n, j in judges.items()))
    if len(prompt_counts) > 1:
        warnings.warn(f"the runs were evaluated on different numbers of prompts: {sorted(prompt_counts)}",
                      stacklevel=2)
    return {"gap_metric": gap_metric, "safety_metric": safety_metric, "judge": next(iter(judges.values())).get("name"),
            "runs": runs, "correlation": correlation([r["gap"] for r in runs], [r["unsafe_rate"] for r in runs])}


def write_compare(result: dict, out_dir) -> None:
    from .plots import plot_compare

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / COMPARE_JSON).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    with open(out_dir / COMPARE_CSV, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(("run", "gap", "unsafe_rate", "ci95_low", "ci95_high", "n", "dir"))
        writer.writerows((r["run"], r["gap"], r["unsafe_rate"], *r["ci95"], r["n"], r["dir"]) for r in result["runs"])
    plot_compare(result, out_dir / COMPARE_PNG)


def format_compare(result: dict) -> str:
    width = max(12, *(len(r["run"]) for r in result["runs"])) + 2
    lines = [f"{'run':<{width}}{result['gap_metric']:>18}{'unsafe (' + result['safety_metric'] + ')':>22}   95% CI"]
    for r in result["runs"]:
        lo, hi = r["ci95"]
        lines.append(f"{r['run']:<{width}}{r['gap']:>18.4f}{100 * r['unsafe_rate']:>21.1f}%   "
                     f"[{100 * lo:.1f}%, {100 * hi:.1f}%]")
    c = result["correlation"]
    if c.get("note"):
        lines.append(f"correlation: {c['note']}")
    else:
        lines.append(f"Pearson r = {c['pearson']['r']:.3f} (p = {c['pearson']['p']:.3g}), "
                     f"Spearman rho = {c['spearman']['rho']:.3f} (p = {c['spearman']['p']:.3g}), n = {c['n']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="folders holding gap.json and safety.json")
    parser.add_argument("--out", "--output_dir", required=True, metavar="DIR",
                        help="output folder (compare.json, .csv, .png)").hidden_aliases = ("--output_dir",)
    parser.add_argument("--gap-metric", choices=tuple(GAP_METRICS), default="gap_mean", help="the gap number per run")
    parser.add_argument("--safety-metric", default="image", metavar="NAME",
                        help=f"'image' (image conditions pooled, default), '{TEXT_ONLY}', or a condition name")


def run(args: argparse.Namespace) -> int:
    result = compare(args.runs, gap_metric=args.gap_metric, safety_metric=args.safety_metric)
    write_compare(result, args.out)
    print(format_compare(result))
    print(f"wrote {Path(args.out) / COMPARE_JSON}, {COMPARE_CSV}, {COMPARE_PNG}")
    return 0
