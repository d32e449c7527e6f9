"""mkdocs hook: the performance page's tables, read from the committed reports in benchmarks/results/.

docs/performance.md holds the prose and MARKER; every number on the page comes from here, out of the
report files, so the page cannot drift from what was measured. Each table is taken from the newest
report that has its section and names that report's GPU, date, commit and command. A section no
report has renders as "not measured"; a section that is there but cannot be read fails the build
(mkdocs --strict) with the file's name, rather than showing nothing. The reports themselves are
published beside the page (under RESULTS_URI) so that the page can link them.

Three layouts are read: benchmarks/run_gpu.py's report (``environment``, ``ceilings``, ``gap_loss``,
``projector``, ``train_step``, ``summary``), the older kernel check (``device``, ``bench``, ``cases``)
and a demo's ``summary.json`` (``runs``).
"""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.performance")

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
RESULTS_URI = "results"  # where the reports appear in the site
PAGE = "performance.md"
MARKER = "<!-- performance tables: rendered from benchmarks/results/ by docs/hooks/performance.py -->"
NOT_MEASURED = "*Not measured: no committed report in `benchmarks/results/` has this section.*"
DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


# --------------------------------------------------------------------------------------------------
# the reports and where each came from
# --------------------------------------------------------------------------------------------------


def load_reports(folder: Path) -> list[tuple[Path, dict]]:
    """Every report JSON in ``folder``, newest first (by the recorded date, else the file name's)."""
    reports = [(p, json.loads(p.read_text())) for p in sorted(folder.glob("*.json"))]
    return sorted(reports, key=lambda r: (report_date(*r) or "", r[0].name), reverse=True)


def report_date(path: Path, data: dict) -> str | None:
    found = DATE.search(path.name)
    return data.get("environment", {}).get("date") or (found.group(0) if found else None)


def published(folder: Path) -> list[Path]:
    """The files of the results folder that the site carries (reports, tables, plots)."""
    return [p for p in sorted(folder.iterdir()) if p.suffix in (".md", ".json", ".csv", ".png")]


def provenance(path: Path, data: dict) -> str:
    """One line: which report, which GPU, when, which commit, which command."""
    env = data.get("environment", {})
    date = report_date(path, data) or "date not recorded"
    gpu = env.get("gpu") or data.get("device") or f"`{DATE.split(path.stem)[0].strip('-')}` (from the file name)"
    versions = ", ".join(f"{k} {env.get(k) or data.get(k)}" for k in ("torch", "triton", "cuda")
                         if env.get(k) or data.get(k))
    command = f"`{env['command']}`" if env.get("command") else "not recorded"
    return (f"From {link(path)}: {gpu}, {date}" + (f", {versions}" if versions else "")
            + f"; commit {env.get('git_commit') or 'not recorded'}; command {command}."
            + (f" The session's written report: {link(notes(path))}." if notes(path) else ""))


def notes(path: Path) -> Path | None:
    """The .md report of the session a JSON belongs to (same GPU and date), where one was committed."""
    found = DATE.search(path.stem)
    md = path.with_name(path.stem[:found.end()] + ".md") if found else path.with_suffix(".md")
    return md if md.exists() else None


def link(path: Path) -> str:
    return f"[`{path.name}`]({RESULTS_URI}/{path.name})"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = [header, ["---"] * len(header)] + rows
    return ["| " + " | ".join(cells) + " |" for cells in lines]


def us(ms: float) -> str:
    return f"{ms * 1e3:.1f}"


def pct(x: float) -> str:
    return f"{x:.0%}"


# --------------------------------------------------------------------------------------------------
# sections: each returns the table's lines, or None when the report does not have the section
# --------------------------------------------------------------------------------------------------


def ceilings(data: dict):
    c = data.get("ceilings") or ({"hbm_bytes_per_s": data["hbm_bytes_per_s"]} if "hbm_bytes_per_s" in data else None)
    if not c:
        return None
    rows = [["device-to-device copy (read + write)", f"{c['hbm_bytes_per_s'] / 1e12:.2f} TB/s"]]
    if "bf16_matmul_flop_per_s" in c:
        rows.append(["bf16 matmul", f"{c['bf16_matmul_flop_per_s'] / 1e12:.0f} TFLOP/s"])
    return table(["ceiling", "measured"], rows)


KERNEL_CASES = {  # the kernel check's case names, in words
    "dense_forward": "forward, both sides masked (all valid)",
    "dense_backward": "backward, both gradients dense",
    "dense_fwd_bwd_op": "forward + backward, both sides masked",
    "llava_forward": "LLaVA forward (no image mask, captions of varying length)",
    "llava_fwd_bwd_op": "LLaVA forward + backward (no image mask, captions of varying length)",
    "masked_mean_image": "`masked_mean` of the image side",
}


def gap_kernels(data: dict):
    bench = data.get("bench")
    if not bench:
        return None
    backends = sorted(bench)
    cases = list(dict.fromkeys(c for b in backends for c in bench[b]))
    header = ["case"] + [f"{b} (us)" for b in backends] + [f"{b}: of copy bandwidth" for b in backends]
    rows = []
    for case in cases:
        runs = [bench[b].get(case) for b in backends]
        rows.append([KERNEL_CASES.get(case, f"`{case}`")]
                    + [us(r["median_ms"]) if r else "not measured" for r in runs]
                    + [pct(r["hbm_fraction"]) if r and "hbm_fraction" in r else "" for r in runs])
    reps = {r["reps"] for b in backends for r in bench[b].values() if "reps" in r}
    note = f"CUDA-graph medians of {', '.join(map(str, sorted(reps)))} repetitions." if reps else ""
    return table(header, rows) + ([""] + [note] if note else [])


def _shape(row: dict) -> str:
    return ", ".join(f"{k}={row[k]}" for k in ("B", "Ni", "Nt", "D") if k in row)


def gap_headline(data: dict):
    gap = section(data, "gap_loss")
    if not gap or not gap.get("headline"):
        return None
    rows = [[_shape(row), f"`{name}`", us(r["graph"]["median_ms"]), us(r["eager"]["median_ms"]), pct(r["hbm_fraction"])]
            for row in gap["headline"] for name, r in row["results"].items()]
    return table(["shape", "contender", "device time (us)", "as launched (us)", "of the HBM floor"], rows)


def gap_sweep(data: dict):
    gap = section(data, "gap_loss")
    if not gap or not gap.get("sweep"):
        return None
    names = list(dict.fromkeys(n for row in gap["sweep"] for n in row["results"]))
    rows = [[row.get("axis", ""), _shape(row), us(row["floor_ms"])]
            + [us(row["results"][n]["graph"]["median_ms"]) if n in row["results"] else "" for n in names]
            for row in gap["sweep"]]
    return table(["varied", "shape", "HBM floor (us)"] + [f"{n} (us)" for n in names], rows)


def _projector_table(res: dict) -> list[str]:
    sh = res.get("shape", {})
    shape = ", ".join(f"{k}={sh[k]}" for k in ("dtype", "B", "Ni", "Dv", "D", "regap_weight") if k in sh)
    rows = [[f"`{name}`", f"{r['time']['median_ms']:.3f}", f"{r['time_vs_plain']:.3f}",
             f"{r['peak_mem_bytes'] / 2**20:.0f}", f"{r['peak_mem_vs_plain']:.3f}", pct(r["matmul_floor_fraction"])]
            for name, r in res["results"].items()]
    return [f"Shape: {shape}.", ""] + table(
        ["variant", "time (ms)", "vs plain", "peak memory (MiB)", "vs plain", "of the matmul floor"], rows)


def projector_llava(data: dict):
    proj = section(data, "projector")
    return _projector_table(proj["llava"]) if proj and proj.get("llava") else None


def projector_minigpt4(data: dict):
    proj = section(data, "projector")
    if not proj or not proj.get("minigpt4"):
        return None
    return [line for res in proj["minigpt4"] for line in _projector_table(res) + [""]]


def train_step(data: dict):
    step = section(data, "train_step")
    if not step:
        return None
    rows = [[k, f"{step[k]['time']['median_ms']:.2f}", f"{step[k]['peak_mem_bytes'] / 2**30:.2f}"]
            for k in ("off", "on")]
    rows.append(["on / off", f"{step['time_ratio']:.4f}", f"{step['peak_mem_ratio']:.4f}"])
    return [f"{step['description']}.", ""] + table(["REGAP", "step time (ms)", "peak memory (GiB)"], rows)


def summary(data: dict):
    s = data.get("summary")
    if not s:
        return None
    rows = [[f"`{k}`", f"{v:.4g}" if isinstance(v, float) else str(v)] for k, v in s.items()]
    return table(["metric", "value"], rows)


def demo(data: dict):
    runs = data.get("runs")
    if not runs or "steps_per_second" not in runs[0]:
        return None
    rows = [[f"{r['regap_weight']:g}", f"{r['initial_gap']:.3f}", f"{r['final_gap']:.3f}", f"{r['final_lm_loss']:.3f}",
             f"{r['steps_per_second']:.1f}", f"{r['seconds']:.1f}", r.get("attention", "")] for r in runs]
    note = ("The demo's model is tiny (a 2-layer LM of width 64, a 3-layer vision tower, 64x64 images), so its "
            "steps are too small for arithmetic to set their speed: kernel launches and host synchronisations do, "
            "and REGAP's few extra launches weigh there as they do at no real size. These steps/s say that the "
            "demo runs on a GPU, not what REGAP costs: that is the LLaVA-1.5-7B-shaped step above.")
    return [note, ""] + table(["lambda", "initial gap", "final gap", "caption loss", "steps/s", "seconds",
                               "attention"], rows)


def edge_cases(data: dict):
    if "cases" not in data:
        return None
    return [f"{data['cases']:,} comparisons of the cuda primitives with the torch backend, "
            f"{len(data.get('failures', []))} failures."]


def section(data: dict, name: str):
    """A run_gpu.py section, or None when the report lacks it or records it as failed."""
    part = data.get(name)
    return None if not part or part.get("error") else part


# (title, reader, the run_gpu.py section a failed run records its error under)
SECTIONS = [
    ("The machine's measured ceilings", ceilings, None),
    ("`fused_gap_loss` against eager PyTorch and `torch.compile`", gap_headline, "gap_loss"),
    ("`fused_gap_loss`: the kernel backends side by side", gap_kernels, None),
    ("`fused_gap_loss` over batch, image tokens and width", gap_sweep, "gap_loss"),
    ("The LLaVA-1.5 projector with REGAP, forward + backward", projector_llava, "projector"),
    ("MiniGPT-4's linear projector with REGAP, forward + backward", projector_minigpt4, "projector"),
    ("A LLaVA-1.5-7B-shaped stage-1 training step, REGAP on and off", train_step, "train_step"),
    ("The report's summary ratios", summary, None),
    ("The cuda backend's edge cases", edge_cases, None),
    ("`regap-fast demo` on a GPU", demo, None),
]


def render_section(title: str, read, failed_key, reports) -> list[str]:
    lines = [f"## {title}", ""]
    for path, data in reports:
        try:
            body = read(data)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            log.warning(f"{path.name}: the section '{title}' is there but cannot be read ({e!r}): "
                        f"update docs/hooks/performance.py for the report's layout")
            return lines + [f"*`{path.name}` has this section in a layout the page cannot read yet.*", ""]
        if body is not None:
            older = (report_date(path, data) or "")[:10] < (report_date(*reports[0]) or "")[:10]  # by day
            return lines + [provenance(path, data) + (" No newer report has this section." if older else ""),
                            ""] + body + [""]
        if failed_key and (data.get(failed_key) or {}).get("error"):
            lines += [f"*The run of {link(path)} failed in this section "
                      "(its error is in the report).*", ""]
    return lines + [NOT_MEASURED, ""]


def history(folder: Path) -> list[str]:
    lines = ["## Across runs and GPUs (`history.csv`)", ""]
    path = folder / "history.csv"
    rows = list(csv.DictReader(path.open())) if path.exists() else []
    if not rows:
        return lines + ["*No rows yet in `benchmarks/results/history.csv`.*", ""]
    cols = ["date", "gpu", "commit", "metric", "value"]
    return lines + [f"From {link(path)}.", ""] + table(
        cols, [[r.get(c, "") for c in cols] for r in rows]) + [""]


def render(folder: Path = RESULTS) -> str:
    reports = load_reports(folder)
    lines = []
    for title, read, failed_key in SECTIONS:
        lines += render_section(title, read, failed_key, reports)
    lines += history(folder)
    listed = ", ".join(link(p) for p in published(folder))
    return "\n".join(lines + ["## Every committed report", "", listed or NOT_MEASURED, ""])


# --------------------------------------------------------------------------------------------------
# mkdocs events
# --------------------------------------------------------------------------------------------------


def on_files(files, config):
    for p in published(RESULTS):
        files.append(File.generated(config, f"{RESULTS_URI}/{p.name}", abs_src_path=str(p)))
    return files


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        log.warning(f"{PAGE} lost its marker line; the tables go where it stands: {MARKER}")
        return markdown
    return markdown.replace(MARKER, render())
