"""The GPU report: is REGAP free? Everything measured side by side in one run.

    python benchmarks/run_gpu.py [--sections gap,projector,train] [--quick]

1. the machine's ceilings (HBM bandwidth by a large device-to-device copy, the bf16 matmul rate);
2. ``fused_gap_loss`` forward+backward per backend against eager PyTorch and
   ``torch.compile(mode="max-autotune")`` of the reference at LLaVA-1.5-7B shapes, as a fraction of
   the bytes it must move over the measured bandwidth, and a sweep over B, Ni and D;
3. the projector with REGAP (fused) against the plain projector without REGAP and the unfused
   eager / compiled versions: time, peak memory, fraction of the matmul floor;
4. a LLaVA-style stage-1 training step at LLaVA-1.5-7B shapes, REGAP on vs off.

Writes ``<out>/<gpu>-<date>.json`` (every number, the environment, the command), a ``.md`` table
and a PNG plot, and appends the headline ratios (the JSON's ``"summary"``) to ``<out>/history.csv``
with the GPU, versions and commit (benchmarks/results/history.csv keeps them across runs and GPUs).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import regap_fast  # noqa: E402
from regap_fast import backends  # noqa: E402
from common import environment, measure_ceilings, rotation_count, time_cuda  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DT = torch.bfloat16


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def kernel_backends(family: str = "gap_loss") -> list[str]:
    return [b for b in ("triton", "cuda") if not backends.why_unavailable(b, torch.device("cuda"), DT, family)]


def free():
    gc.collect()
    torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# fused_gap_loss
# --------------------------------------------------------------------------------------------------


def gap_inputs(B, Ni, Nt, D, seed):
    """LLaVA-like: every image token counts (no image mask); captions padded to Nt, lengths Nt/2..Nt."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    img = torch.randn(B, Ni, D, device="cuda", dtype=DT, generator=g).requires_grad_(True)
    txt = torch.randn(B, Nt, D, device="cuda", dtype=DT, generator=g).requires_grad_(True)
    lengths = torch.randint(Nt // 2, Nt + 1, (B,), device="cuda", generator=g)
    tm = torch.arange(Nt, device="cuda")[None, :] < lengths[:, None]
    return img, txt, tm


def gap_bytes(img, txt, tm) -> int:
    """The fewest bytes forward+backward must move: read every valid token once; write the dense
    (masked) caption gradient and the [B, D] image gradient vector (broadcast, not materialised)."""
    B, Ni, D = img.shape
    es = img.element_size()
    read = img.numel() * es + int(tm.sum()) * D * es + tm.numel()
    write = txt.numel() * es + B * D * es
    return read + write


def gap_contenders(names):
    out = {}
    for name in names:
        if name == "eager":
            out[name] = lambda i, t, m: regap_fast.gap_loss_reference(i, t, None, m)
        elif name == "compile":
            out[name] = torch.compile(lambda i, t, m: regap_fast.gap_loss_reference(i, t, None, m),
                                      mode="max-autotune")
        else:
            out[name] = (lambda b: lambda i, t, m: regap_fast.fused_gap_loss(i, t, None, m, backend=b))(name)
    return out


def _gap_step(f, img, txt, tm, compiled=False):
    def step():
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()
        return torch.autograd.grad(f(img, txt, tm), (img, txt))
    return step


def bench_gap_point(B, Ni, Nt, D, names, bandwidth, reps=40):
    sets = []
    per_set = B * (Ni + Nt) * D * 2 * 2
    for s in range(rotation_count(per_set)):
        sets.append(gap_inputs(B, Ni, Nt, D, seed=s))
    nbytes = gap_bytes(*sets[0])
    floor_ms = nbytes / bandwidth * 1e3
    row = {"B": B, "Ni": Ni, "Nt": Nt, "D": D, "bytes": nbytes, "floor_ms": floor_ms, "results": {}}
    ref = None
    for name, f in gap_contenders(names).items():
        compiled = name == "compile"
        # fresh leaves (same storage) per contender: autograd ties a leaf's gradient accumulator to the
        # stream it first ran on, and compile's CUDA graphs run on their own stream; a shared leaf
        # then breaks the next contender's graph capture (seen on torch 2.11)
        leaves = [(i.detach().requires_grad_(True), t.detach().requires_grad_(True), m) for i, t, m in sets]
        fns = [_gap_step(f, *s, compiled=compiled) for s in leaves]
        val = f(*leaves[0]).float().item()
        ref = val if ref is None else ref
        res = {"loss": val}
        res["eager"] = time_cuda(fns, reps=reps)
        # the device time alone, replayed from a CUDA graph; compile(max-autotune) replays its own
        # CUDA graphs, so it is timed as launched
        res["graph"] = res["eager"] if compiled else time_cuda(fns, reps=reps, graph=True)
        res["hbm_fraction"] = floor_ms / res["graph"]["median_ms"]
        row["results"][name] = res
        log(f"  gap B={B} Ni={Ni} Nt={Nt} D={D} {name:8s} {res['graph']['median_ms'] * 1e3:8.1f} us "
            f"(floor {floor_ms * 1e3:.1f} us, {res['hbm_fraction']:.0%} of HBM)"
            + f", as launched {res['eager']['median_ms'] * 1e3:.1f} us")
        del fns, leaves
    for name, r in row["results"].items():  # every contender computes the same loss
        assert math.isclose(r["loss"], ref, rel_tol=2e-2), (name, r["loss"], ref)
    del sets
    free()
    return row


def section_gap(args, ceil):
    bw = ceil["hbm_bytes_per_s"]
    kb = kernel_backends()
    out = {"headline": [], "sweep": []}
    for Nt in ((128,) if args.quick else (64, 128)):
        log(f"fused_gap_loss headline, Nt={Nt}")
        out["headline"].append(bench_gap_point(32, 576, Nt, 4096, ["eager", "compile"] + kb, bw))
    sweep = {"B": [1, 4, 8, 16, 32, 64], "Ni": [32, 144, 576, 1152, 2304], "D": [1024, 2048, 4096, 5120, 8192]}
    if args.quick:
        sweep = {"B": [8, 32], "Ni": [144, 576], "D": [2048, 4096]}
    base = {"B": 32, "Ni": 576, "D": 4096}
    for axis, values in sweep.items():
        for v in values:
            p = dict(base, **{axis: v})
            row = bench_gap_point(p["B"], p["Ni"], 128, p["D"], ["eager"] + kb, bw, reps=30)
            row["axis"] = axis
            out["sweep"].append(row)
    return out


# --------------------------------------------------------------------------------------------------
# projector
# --------------------------------------------------------------------------------------------------


def section_projector(args, ceil):
    from bench_projector import section

    rehearse = getattr(args, "rehearse", False)
    device = "cpu" if rehearse else "cuda"
    return section(rehearse, device, torch.float32 if rehearse else DT, ceil, log=log)


# --------------------------------------------------------------------------------------------------
# training step
# --------------------------------------------------------------------------------------------------


def section_train(args, ceil):
    from train_step import bench_train_step

    return bench_train_step(quick=args.quick, log=log)


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------


def summarise(report) -> dict:
    s = {}
    gap = report.get("gap_loss")
    if gap and not gap.get("error"):
        head = next(r for r in gap["headline"] if r["Nt"] == 128)["results"]
        best = min((b for b in ("triton", "cuda") if b in head), key=lambda b: head[b]["graph"]["median_ms"])
        s["gap_loss_backend"] = best
        s["gap_loss_fwd_bwd_hbm_fraction"] = head[best]["hbm_fraction"]
        s["gap_loss_speedup_vs_eager"] = head["eager"]["graph"]["median_ms"] / head[best]["graph"]["median_ms"]
        s["gap_loss_speedup_vs_compile"] = head["compile"]["graph"]["median_ms"] / head[best]["graph"]["median_ms"]
    proj = report.get("projector")
    if proj and not proj.get("error"):
        s.update(_projector_summary("projector", proj["llava"]["results"]))
        for row in proj.get("minigpt4", []):
            s.update(_projector_summary(f"minigpt4_d{row['shape']['D']}_projector", row["results"]))
    train = report.get("train_step")
    if train and not train.get("error"):
        s["train_step_time_ratio"] = train["time_ratio"]
        s["train_step_peak_mem_ratio"] = train["peak_mem_ratio"]
    return s


def _projector_summary(prefix: str, r: dict) -> dict:
    """The fastest fused contender against the plain projector and against torch.compile of the unfused code."""
    fused = [k for k in r if k.startswith("fused_") and "time" in r[k]]
    if not fused or "time" not in r.get("plain_no_regap", {}):
        return {}
    best = min(fused, key=lambda k: r[k]["time"]["median_ms"])
    plain = r["plain_no_regap"]
    s = {f"{prefix}_backend": best.removeprefix("fused_"),
         f"{prefix}_fused_vs_plain_time_ratio": r[best]["time"]["median_ms"] / plain["time"]["median_ms"],
         f"{prefix}_fused_vs_plain_peak_mem_ratio": r[best]["peak_mem_bytes"] / max(plain["peak_mem_bytes"], 1)}
    if "time" in r.get("unfused_compiled", {}):
        s[f"{prefix}_fused_vs_compile_time_ratio"] = (r[best]["time"]["median_ms"]
                                                       / r["unfused_compiled"]["time"]["median_ms"])
    return s


def write_markdown(report, path: Path) -> None:
    env, c, s = report["environment"], report["ceilings"], report["summary"]
    lines = [f"# regap_fast GPU report: {env.get('gpu')} ({env['date']})", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, driver {env.get('driver')}, "
             f"commit {env['git_commit']}", f"Command: `{env['command']}`", "",
             f"Measured ceilings: HBM copy {c['hbm_bytes_per_s'] / 1e12:.2f} TB/s (read + write), "
             f"bf16 matmul {c['bf16_matmul_flop_per_s'] / 1e12:.0f} TFLOP/s.", "", "## Summary", "",
             "| metric | value | goal |", "| --- | --- | --- |"]
    goals = {"train_step_time_ratio": "<= 1.005", "train_step_peak_mem_ratio": "<= 1.001",
             "projector_fused_vs_plain_time_ratio": "<= 1.02", "projector_fused_vs_compile_time_ratio": "<= 1",
             "projector_fused_vs_plain_peak_mem_ratio": "<= 1.01", "gap_loss_fwd_bwd_hbm_fraction": ">= 0.85",
             "gap_loss_speedup_vs_eager": ">= 3", "gap_loss_speedup_vs_compile": "> 1"}
    for k, v in s.items():
        lines.append(f"| {k} | {v:.4g} | {goals.get(k, '')} |" if isinstance(v, float) else f"| {k} | {v} | |")
    gap = report.get("gap_loss")
    if gap and not gap.get("error"):
        lines += ["", "## fused_gap_loss forward+backward (bf16, B=32, Ni=576, D=4096, no image mask, "
                  "captions padded to Nt)", "",
                  "| Nt | contender | device time (us) | as launched (us) | of HBM floor |",
                  "| --- | --- | --- | --- | --- |"]
        for row in gap["headline"]:
            for name, r in row["results"].items():
                eager = f"{r['eager']['median_ms'] * 1e3:.1f}"
                lines.append(f"| {row['Nt']} | {name} | {r['graph']['median_ms'] * 1e3:.1f} | {eager} | "
                             f"{r['hbm_fraction']:.0%} |")
    proj = report.get("projector")
    if proj and not proj.get("error"):
        tables = [("LLaVA-1.5 projector", proj["llava"])]
        tables += [(f"MiniGPT-4 projector {row['shape']['Dv']} -> {row['shape']['D']}", row)
                   for row in proj.get("minigpt4", [])]
        for title, res in tables:
            sh = res["shape"]
            lines += ["", f"## {title} forward+backward ({sh['dtype']}, B={sh['B']}, N={sh['Ni']}, Dv={sh['Dv']}, "
                      f"D={sh['D']}, lambda {sh['regap_weight']})", "",
                      "| variant | time (ms) | vs plain | peak memory (MiB) | vs plain | of matmul floor |",
                      "| --- | --- | --- | --- | --- | --- |"]
            for name, r in res["results"].items():
                lines.append(f"| {name} | {r['time']['median_ms']:.3f} | {r['time_vs_plain']:.3f} | "
                             f"{r['peak_mem_bytes'] / 2**20:.0f} | {r['peak_mem_vs_plain']:.3f} | "
                             f"{r['matmul_floor_fraction']:.0%} |")
        if proj.get("profile"):
            from bench_projector import profile_markdown

            lines += ["", "## Per-kernel profile of one LLaVA projector step (torch.profiler)", "",
                      profile_markdown(proj["profile"])]
    train = report.get("train_step")
    if train and not train.get("error"):
        lines += ["", f"## Stage-1 training step ({train['description']})", "",
                  "| REGAP | step time (ms) | peak memory (GiB) |", "| --- | --- | --- |"]
        for k in ("off", "on"):
            r = train[k]
            lines.append(f"| {k} | {r['time']['median_ms']:.2f} | {r['peak_mem_bytes'] / 2**30:.2f} |")
    for name in ("gap_loss", "projector", "train_step"):
        if report.get(name, {}).get("error"):
            lines += ["", f"## {name}: FAILED", "", "```", report[name]["error"][-2000:], "```"]
    path.write_text("\n".join(lines) + "\n")


def plot_sweep(report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = report["gap_loss"]["sweep"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, axis in zip(axes, ("B", "Ni", "D")):
        rows = [r for r in sweep if r["axis"] == axis]
        xs = [r[axis] for r in rows]
        for name in rows[0]["results"]:
            ax.plot(xs, [r["results"][name]["graph"]["median_ms"] * 1e3 for r in rows], "o-", label=name)
        ax.plot(xs, [r["floor_ms"] * 1e3 for r in rows], "k--", label="HBM floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(axis)
        ax.set_ylabel("fwd+bwd device time (us)")
        ax.set_title(f"fused_gap_loss vs {axis} (others at 32, 576, 4096)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


SECTIONS = {"gap": ("gap_loss", section_gap), "projector": ("projector", section_projector),
            "train": ("train_step", section_train)}


def run_section_child(args) -> int:
    """One section in this process; its result (or the error) as JSON in args.part."""
    name, fn = SECTIONS[args.only]
    ceil = json.loads(Path(args.ceilings).read_text())
    try:
        result = fn(args, ceil)
    except Exception:
        result = {"error": traceback.format_exc()}
        log(f"section {name} FAILED:\n{result['error']}")
    Path(args.part).write_text(json.dumps(result, default=str))
    return 0


HISTORY_FIELDS = ("date", "gpu", "torch", "triton", "cuda", "commit", "metric", "value")


def append_history(report: dict, path: Path) -> None:
    """Append the summary's numbers to the results CSV: one row per metric, with the GPU, the versions
    and the commit, so that results stay comparable across runs and GPUs (benchmarks/results/history.csv)."""
    import csv

    env = report["environment"]
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(HISTORY_FIELDS)
        for metric, value in report.get("summary", {}).items():
            w.writerow([env["date"], env.get("gpu"), env["torch"], env["triton"], env["cuda"], env["git_commit"],
                        metric, f"{value:.6g}" if isinstance(value, float) else value])


def rehearse(out: Path) -> int:
    """The projector section and the report writing at tiny shapes on the CPU, in this process."""
    out.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(), "ceilings": {"hbm_bytes_per_s": 1e10, "bf16_matmul_flop_per_s": 1e11}}
    report["projector"] = section_projector(argparse.Namespace(rehearse=True), report["ceilings"])
    report["summary"] = summarise(report)
    stem = out / "rehearsal"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    write_markdown(report, stem.with_suffix(".md"))
    append_history(report, out / "history.csv")
    log(f"wrote {stem}.json/.md (a rehearsal: CPU timings of tiny shapes, not a measurement)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="gap,projector,train")
    ap.add_argument("--quick", action="store_true", help="smaller sweeps and step counts")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--rehearse", action="store_true",
                    help="run the projector section on the CPU at tiny shapes (checks the script, measures nothing)")
    ap.add_argument("--only", choices=sorted(SECTIONS), help=argparse.SUPPRESS)  # internal: child process
    ap.add_argument("--ceilings", help=argparse.SUPPRESS)
    ap.add_argument("--part", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rehearse:
        return rehearse(args.out)
    if not torch.cuda.is_available():
        print("run_gpu.py needs a CUDA GPU; on the CPU use `pytest --benchmark-only` (or --rehearse).")
        return 2
    if args.only:
        return run_section_child(args)
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
    for key in args.sections.split(","):
        name = SECTIONS[key][0]
        t0 = time.time()
        # each section in its own process: a CUDA error (or a broken graph capture) in one cannot
        # poison the device state of the next
        part_file.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--only", key, "--ceilings", str(ceil_file), "--part", str(part_file)]
        rc = subprocess.run(cmd + (["--quick"] if args.quick else [])).returncode
        report[name] = (json.loads(part_file.read_text()) if part_file.exists()
                        else {"error": f"the section's process exited with status {rc} before writing a result"})
        report.setdefault("section_seconds", {})[name] = round(time.time() - t0, 1)
        report["summary"] = summarise(report)
        stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    ceil_file.unlink(missing_ok=True)
    part_file.unlink(missing_ok=True)
    write_markdown(report, stem.with_suffix(".md"))
    append_history(report, args.out / "history.csv")
    if report.get("gap_loss", {}).get("sweep"):
        plot_sweep(report, Path(str(stem) + "-gap-sweep.png"))
    log(f"wrote {stem}.json/.md")
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
