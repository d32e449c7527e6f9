"""The GPU report: is REGAP free? Every section measured side by side in one run, then the report.

    python benchmarks/run_gpu.py [--sections gap,projector,train,liger] [--quick] [--out DIR]
    python benchmarks/run_gpu.py --rehearse --out DIR      # every section at tiny shapes on the CPU

Sections (each its own module, each in its own process so a CUDA error cannot poison the next):
``gap`` (bench_gap_loss.py), ``projector`` (bench_projector.py: LLaVA-1.5, its per-kernel profile,
then MiniGPT-4), ``train`` (bench_train_step.py: the 7B-shaped stage-1 step, REGAP on vs off) and
``liger`` (bench_liger.py). After every section the report is rewritten (JSON, the markdown with
every goal met or missed with its value, the sweep plot) and that section's history rows appended, so a
run cut short keeps everything it measured.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report as rep  # noqa: E402
from common import environment, measure_ceilings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# --sections key -> (report key, module)
SECTIONS = {"gap": ("gap_loss", "bench_gap_loss"), "projector": ("projector", "bench_projector"),
            "train": ("train_step", "bench_train_step"), "liger": ("liger", "bench_liger")}
SECTION_KEYS = [name for name, _ in SECTIONS.values()]
REHEARSAL_CEILINGS = {"hbm_bytes_per_s": 1e10, "bf16_matmul_flop_per_s": 1e11}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_section(key: str, rehearse: bool, quick: bool, ceilings: dict) -> dict:
    """One section in this process: its result, or {"error": traceback}."""
    name, module = SECTIONS[key]
    device = torch.device("cpu" if rehearse else "cuda")
    dtype = torch.float32 if rehearse else torch.bfloat16
    try:
        return importlib.import_module(module).section(rehearse, device, dtype, ceilings, quick=quick, log=log)
    except Exception:
        error = traceback.format_exc()
        log(f"section {name} FAILED:\n{error}")
        return {"error": error}


def write_report(report: dict, stem: Path, out: Path, written: set) -> set:
    """The JSON, the markdown and the new history rows of what is measured so far: called after every
    section, so a run cut short (a timeout, a crash, the machine taken back) keeps every finished
    section's files. Returns the history metrics written so far (each row is appended once)."""
    report["summary"] = rep.summarise(report)
    report["goals"] = rep.check_goals(report["summary"])
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    rep.write_markdown(report, stem.with_suffix(".md"))
    written = rep.append_history(report, out / "history.csv", written)
    if (report.get("gap_loss") or {}).get("sweep"):
        rep.plot_sweep(report, Path(str(stem) + "-gap-sweep.png"))
    log(f"wrote {stem}.json/.md ({', '.join(k for k in SECTION_KEYS if k in report)})")
    return written


def rehearse(args) -> int:
    """Every section at tiny shapes on the CPU, in this process, and the report: the GPU run's code
    paths are exercised before a GPU runs them (CPU timings of tiny shapes: no measurement)."""
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(), "ceilings": REHEARSAL_CEILINGS, "rehearsal": True}
    written: set = set()
    for key in args.sections.split(","):
        t0 = time.time()
        report[SECTIONS[key][0]] = run_section(key, True, True, REHEARSAL_CEILINGS)
        report.setdefault("section_seconds", {})[SECTIONS[key][0]] = round(time.time() - t0, 1)
        written = write_report(report, args.out / "rehearsal", args.out, written)
    failed = [k for k in args.sections.split(",") if (report[SECTIONS[k][0]] or {}).get("error")]
    return 1 if failed else 0


def measure(args) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment()}
    log(f"environment: {report['environment']}")
    report["ceilings"] = ceil = measure_ceilings()
    log(f"ceilings: HBM {ceil['hbm_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul "
        f"{ceil['bf16_matmul_flop_per_s'] / 1e12:.0f} TFLOP/s")
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", report["environment"]["gpu"]).strip("-").lower()
    stem = args.out / f"{gpu}-{time.strftime('%Y-%m-%d')}"
    ceil_file, part_file = Path(str(stem) + ".ceilings.tmp"), Path(str(stem) + ".part.tmp")
    ceil_file.write_text(json.dumps(ceil))
    written: set = set()
    for key in args.sections.split(","):
        name = SECTIONS[key][0]
        t0 = time.time()
        part_file.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--only", key, "--ceilings", str(ceil_file), "--part", str(part_file)]
        rc = subprocess.run(cmd + (["--quick"] if args.quick else [])).returncode
        report[name] = (json.loads(part_file.read_text()) if part_file.exists()
                        else {"error": f"the section's process exited with status {rc} before writing a result"})
        report.setdefault("section_seconds", {})[name] = round(time.time() - t0, 1)
        written = write_report(report, stem, args.out, written)  # kept if cut short
    ceil_file.unlink(missing_ok=True)
    part_file.unlink(missing_ok=True)
    print(stem.with_suffix(".md").read_text())
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="gap,projector,train,liger")
    ap.add_argument("--quick", action="store_true", help="smaller sweeps and fewer rounds")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--rehearse", action="store_true",
                    help="every section on the CPU at tiny shapes (checks the script, measures nothing)")
    ap.add_argument("--only", choices=sorted(SECTIONS), help=argparse.SUPPRESS)  # internal: child process
    ap.add_argument("--ceilings", help=argparse.SUPPRESS)
    ap.add_argument("--part", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    unknown = [k for k in args.sections.split(",") if k not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {sorted(SECTIONS)}")
    if args.rehearse:
        return rehearse(args)
    if not torch.cuda.is_available():
        print("run_gpu.py needs a CUDA GPU; on the CPU use --rehearse (or `pytest --benchmark-only`).")
        return 2
    if args.only:
        result = run_section(args.only, False, args.quick, json.loads(Path(args.ceilings).read_text()))
        Path(args.part).write_text(json.dumps(result, default=str))
        return 0
    return measure(args)


if __name__ == "__main__":
    sys.exit(main())
