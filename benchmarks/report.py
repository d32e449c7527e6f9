"""The GPU report from the sections' results: the summary ratios, each goal stated as met or missed with
its measured value, the markdown tables, the sweep plot and the history CSV.

The report's layout (read by docs/hooks/performance.py): ``environment``, ``ceilings``, one key per
section (``gap_loss``, ``projector``, ``train_step``, ``liger``; ``{"error": ...}`` for one that failed),
``section_seconds``, ``summary`` and ``goals``.
"""

from __future__ import annotations

import csv
from pathlib import Path

# metric -> (comparison, bound): the goals of issue 22, checked against every report
GOALS = {
    "projector_fused_vs_plain_time_ratio": ("<=", 1.02),
    "projector_fused_vs_compile_time_ratio": ("<=", 1.00),
    "projector_fused_vs_plain_peak_mem_ratio": ("<=", 1.01),
    "minigpt4_d4096_projector_fused_vs_plain_plus_fused_gap_loss_time_ratio": ("<=", 1.02),
    "minigpt4_d5120_projector_fused_vs_plain_plus_fused_gap_loss_time_ratio": ("<=", 1.02),
    "gap_loss_fwd_bwd_hbm_fraction": (">=", 0.85),
    "gap_loss_speedup_vs_eager": (">=", 3.0),
    "gap_loss_speedup_vs_compile": (">", 1.0),
    "train_step_time_ratio": ("<=", 1.005),
    "train_step_peak_mem_ratio": ("<=", 1.001),
    "liger_regap_vs_liger_time_ratio": ("<=", 1.01),
}
HISTORY_FIELDS = ("date", "gpu", "torch", "triton", "cuda", "commit", "metric", "value")


def _ok(section: dict | None) -> bool:
    return bool(section) and not section.get("error")


def summarise(report: dict) -> dict:
    s = {}
    if _ok(report.get("gap_loss")):
        s.update(_gap_summary(report["gap_loss"]))
    if _ok(report.get("projector")):
        proj = report["projector"]
        s.update(_projector_summary("projector", proj["llava"]["results"], "plain_no_regap"))
        for row in proj.get("minigpt4", []):
            s.update(_projector_summary(f"minigpt4_d{row['shape']['D']}_projector", row["results"],
                                        "plain_plus_fused_gap_loss"))
    if _ok(report.get("train_step")):
        s["train_step_time_ratio"] = report["train_step"]["time_ratio"]
        s["train_step_peak_mem_ratio"] = report["train_step"]["peak_mem_ratio"]
    if _ok(report.get("liger")):
        s["liger_regap_vs_liger_time_ratio"] = report["liger"]["time_ratio"]
        s["liger_loss_rel_diff_vs_reference"] = report["liger"]["loss_rel_diff"]
    return s


def _gap_summary(gap: dict) -> dict:
    head = max(gap["headline"], key=lambda r: r["Nt"])["results"]
    kernels = [b for b in ("triton", "cuda") if b in head]
    if not kernels:
        return {}
    best = min(kernels, key=lambda b: head[b]["graph"]["median_ms"])
    t = head[best]["graph"]["median_ms"]
    return {"gap_loss_backend": best, "gap_loss_fwd_bwd_hbm_fraction": head[best]["hbm_fraction"],
            "gap_loss_speedup_vs_eager": head["eager"]["graph"]["median_ms"] / t,
            "gap_loss_speedup_vs_compile": head["compile"]["graph"]["median_ms"] / t}


def _projector_summary(prefix: str, r: dict, bar: str) -> dict:
    """The fastest fused contender against ``bar`` and against torch.compile of the unfused code."""
    fused = [k for k in r if k.startswith("fused_") and "time" in r[k]]
    if not fused or "time" not in r.get(bar, {}):
        return {}
    best = min(fused, key=lambda k: r[k]["time"]["median_ms"])
    t = r[best]["time"]["median_ms"]
    s = {f"{prefix}_backend": best.removeprefix("fused_"),
         f"{prefix}_fused_vs_{bar.removesuffix('_no_regap')}_time_ratio": t / r[bar]["time"]["median_ms"],
         f"{prefix}_fused_vs_{bar.removesuffix('_no_regap')}_peak_mem_ratio":
             r[best]["peak_mem_bytes"] / max(r[bar]["peak_mem_bytes"], 1)}
    if "time" in r.get("unfused_compiled", {}):
        s[f"{prefix}_fused_vs_compile_time_ratio"] = t / r["unfused_compiled"]["time"]["median_ms"]
    return s


def check_goals(summary: dict) -> dict:
    """metric -> {"goal", "value", "met"} for every goal; value None (and met None) where not measured."""
    ops = {"<=": float.__le__, ">=": float.__ge__, ">": float.__gt__}
    out = {}
    for metric, (op, bound) in GOALS.items():
        value = summary.get(metric)
        out[metric] = {"goal": f"{op} {bound:g}", "value": value,
                       "met": None if value is None else bool(ops[op](float(value), bound))}
    return out


def _goal_lines(goals: dict) -> list[str]:
    lines = ["| goal | measured | verdict |", "| --- | --- | --- |"]
    for metric, g in goals.items():
        verdict = "not measured" if g["met"] is None else "met" if g["met"] else "MISSED"
        value = "" if g["value"] is None else f"{g['value']:.4g}"
        lines.append(f"| `{metric}` {g['goal']} | {value} | {verdict} |")
    return lines


def write_markdown(report: dict, path: Path) -> None:
    env, c = report["environment"], report["ceilings"]
    lines = [f"# regap_fast GPU report: {env.get('gpu')} ({env['date']})", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, driver {env.get('driver')}, "
             f"commit {env['git_commit']}", f"Command: `{env['command']}`", "",
             f"Measured ceilings: HBM copy {c['hbm_bytes_per_s'] / 1e12:.2f} TB/s (read + write), "
             f"bf16 matmul {c['bf16_matmul_flop_per_s'] / 1e12:.0f} TFLOP/s.", "", "## Goals", ""]
    lines += _goal_lines(report.get("goals", check_goals(report.get("summary", {}))))
    lines += ["", "## Summary", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
              for k, v in report.get("summary", {}).items()]
    lines += _gap_lines(report.get("gap_loss")) + _projector_lines(report.get("projector"))
    lines += _train_lines(report.get("train_step")) + _liger_lines(report.get("liger"))
    for name in ("gap_loss", "projector", "train_step", "liger"):
        if (report.get(name) or {}).get("error"):
            lines += ["", f"## {name}: FAILED", "", "```", report[name]["error"][-2000:], "```"]
    path.write_text("\n".join(lines) + "\n")


def _gap_lines(gap) -> list[str]:
    if not _ok(gap):
        return []
    lines = ["", "## fused_gap_loss forward+backward (B=32, Ni=576, D=4096, no image mask, captions padded to "
             "Nt; contenders interleaved)", "",
             "| Nt | contender | device time (us) | as launched (us) | of HBM floor |",
             "| --- | --- | --- | --- | --- |"]
    for row in gap["headline"]:
        for name, r in row["results"].items():
            lines.append(f"| {row['Nt']} | {name} | {r['graph']['median_ms'] * 1e3:.1f} | "
                         f"{r['eager']['median_ms'] * 1e3:.1f} | {r['hbm_fraction']:.0%} |")
    return lines


def _projector_lines(proj) -> list[str]:
    if not _ok(proj):
        return []
    lines = []
    tables = [("LLaVA-1.5 projector", proj["llava"])]
    tables += [(f"MiniGPT-4 projector {row['shape']['Dv']} -> {row['shape']['D']}", row)
               for row in proj.get("minigpt4", [])]
    for title, res in tables:
        sh = res["shape"]
        lines += ["", f"## {title} forward+backward ({sh['dtype']}, B={sh['B']}, N={sh['Ni']}, Dv={sh['Dv']}, "
                  f"D={sh['D']}, lambda {sh['regap_weight']}; contenders interleaved)", "",
                  "| variant | time (ms) | vs plain | peak memory (MiB) | vs plain | of matmul floor |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, r in res["results"].items():
            lines.append(f"| {name} | {r['time']['median_ms']:.3f} | {r['time_vs_plain']:.3f} | "
                         f"{r['peak_mem_bytes'] / 2**20:.0f} | {r['peak_mem_vs_plain']:.3f} | "
                         f"{r['matmul_floor_fraction']:.0%} |")
    if proj.get("profile"):
        from bench_projector import profile_markdown

        lines += ["", "## Per-kernel profile of one LLaVA projector step (torch.profiler)", "",
                  profile_markdown(proj["profile"], proj["llava"]["results"])]
    return lines


def _train_lines(train) -> list[str]:
    if not _ok(train):
        return []
    lines = ["", f"## Stage-1 training step ({train['description']})", "",
             "| REGAP | step time (ms) | peak memory (GiB) |", "| --- | --- | --- |"]
    for k in ("off", "on"):
        lines.append(f"| {k} | {train[k]['time']['median_ms']:.2f} | {train[k]['peak_mem_bytes'] / 2**30:.2f} |")
    return lines


def _liger_lines(liger) -> list[str]:
    if not _ok(liger):
        return []
    return ["", f"## Liger-Kernel {liger['liger_version']} + apply_regap ({liger['description']})", "",
            "| variant | step time (ms) |", "| --- | --- |",
            f"| Liger alone | {liger['liger']['median_ms']:.2f} |",
            f"| Liger + REGAP | {liger['liger_regap']['median_ms']:.2f} |", "",
            f"Loss relative difference against the reference (no Liger): {liger['loss_rel_diff']:.2e}."]


def plot_sweep(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = report["gap_loss"]["sweep"]
    axes_names = [a for a in ("B", "Ni", "D") if any(r["axis"] == a for r in sweep)]
    fig, axes = plt.subplots(1, len(axes_names), figsize=(5 * len(axes_names), 4.2), squeeze=False)
    for ax, axis in zip(axes[0], axes_names):
        rows = [r for r in sweep if r["axis"] == axis]
        xs = [r[axis] for r in rows]
        for name in rows[0]["results"]:
            ax.plot(xs, [r["results"][name]["graph"]["median_ms"] * 1e3 for r in rows], "o-", label=name)
        ax.plot(xs, [r["floor_ms"] * 1e3 for r in rows], "k--", label="HBM floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(axis)
        ax.set_ylabel("fwd+bwd device time (us)")
        ax.set_title(f"fused_gap_loss vs {axis}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def append_history(report: dict, path: Path, written: set | None = None) -> set:
    """Append the summary's numbers to the results CSV: one row per metric, with the GPU, the versions
    and the commit, so that results stay comparable across runs and GPUs (benchmarks/results/history.csv).
    Metrics in ``written`` (rows an earlier call of this run appended) are skipped; returns the metrics
    written so far."""
    env = report["environment"]
    written = set() if written is None else written
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(HISTORY_FIELDS)
        for metric, value in report.get("summary", {}).items():
            if metric in written:
                continue
            written = written | {metric}
            w.writerow([env["date"], env.get("gpu"), env["torch"], env["triton"], env["cuda"], env["git_commit"],
                        metric, f"{value:.6g}" if isinstance(value, float) else value])
    return written
