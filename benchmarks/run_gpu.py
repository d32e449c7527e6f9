"""The GPU report: is REGAP free? Everything measured side by side in one run.

    python benchmarks/run_gpu.py [--sections gap,projector,train] [--quick]

1. the machine's ceilings (HBM bandwidth by a large device-to-device copy, the bf16 matmul rate);
2. ``fused_gap_loss`` forward+backward per backend against eager PyTorch and
   ``torch.compile(mode="max-autotune")`` of the reference at LLaVA-1.5-7B shapes, as a fraction of
   the bytes it must move over the measured bandwidth, and a sweep over B, Ni and D;
3. the projector with REGAP (fused) against the plain projector without REGAP and the unfused
   eager / compiled versions: time, peak memory, fraction of the matmul floor;
4. a LLaVA-style stage-1 training step at LLaVA-1.5-7B shapes, REGAP on vs off.

Writes ``benchmarks/results/<gpu>-<date>.json`` (every number, the environment, the command),
a ``.md`` table and PNG plots. The headline ratios are under the JSON's ``"summary"``.
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import regap_fast  # noqa: E402
from regap_fast import backends  # noqa: E402
from common import (environment, measure_ceilings, peak_memory_bytes, rotation_count, time_cuda,  # noqa: E402
                    time_interleaved)

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


def projector_flops(M, Dv, D) -> float:
    """fwd: x W1^T, h W2^T; bwd: dE W2, dE^T h, dpre^T x (x needs no gradient in stage 1)."""
    return 2 * M * (Dv * D + D * D) + 2 * M * (2 * D * D + Dv * D)


def section_projector(args, ceil):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    B, Ni, Nt, Dv, D, V = 32, 576, 128, 1024, 4096, 32000
    lam = 0.1
    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=Dv, num_attention_heads=16),
                      text_config=LlamaConfig(hidden_size=D, num_attention_heads=32),
                      projector_hidden_act="gelu")
    plain = LlavaMultiModalProjector(cfg).to("cuda", DT)
    table = torch.randn(V, D, device="cuda", dtype=DT)
    sets = []
    for s in range(2):  # x + dE are 190 MB per set: two sets are beyond L2
        g = torch.Generator(device="cuda").manual_seed(100 + s)
        x = torch.randn(B, Ni, Dv, device="cuda", dtype=DT, generator=g)
        dE = torch.randn(B, Ni, D, device="cuda", dtype=DT, generator=g) * 1e-3
        ids = torch.randint(0, V, (B, Nt), device="cuda", generator=g)
        lengths = torch.randint(Nt // 2, Nt + 1, (B,), device="cuda", generator=g)
        tm = torch.arange(Nt, device="cuda")[None, :] < lengths[:, None]
        sets.append((x, dE, ids, tm))

    params = list(plain.parameters())

    def plain_step(x, dE, ids, tm):
        e = plain(x)
        return torch.autograd.grad(e, params, dE)

    def unfused_step(x, dE, ids, tm):
        e = plain(x)
        gap = regap_fast.gap_loss_reference(e, F.embedding(ids, table), None, tm)
        return torch.autograd.grad((e, lam * gap), params, (dE, None))

    def plain_plus_fused_loss(x, dE, ids, tm):
        e = plain(x)
        gap = regap_fast.fused_gap_loss(e, F.embedding(ids, table), None, tm)
        return torch.autograd.grad((e, lam * gap), params, (dE, None))

    fused = {}
    for b in kernel_backends("projector"):
        proj = regap_fast.FusedLlavaProjector(Dv, D, backend=b).to("cuda", DT)
        proj.load_state_dict(plain.state_dict())
        fparams = list(proj.parameters())

        def fused_step(x, dE, ids, tm, proj=proj, fparams=fparams):
            e, gap = regap_fast.projector_gap_loss(proj, x, ids, table, None, tm)
            return torch.autograd.grad((e, lam * gap), fparams, (dE, None))
        fused[f"fused_{b}"] = fused_step

    compiled = torch.compile(unfused_step)
    variants = {"plain_no_regap": plain_step, "unfused_eager": unfused_step,
                "plain_plus_fused_gap_loss": plain_plus_fused_loss, **fused}

    # correctness at these shapes: the fused gradients equal the unfused ones
    ref = unfused_step(*sets[0])
    checks = {}
    for name, fn in fused.items():
        got = fn(*sets[0])
        checks[name] = max(((a.float() - r.float()).norm() / r.float().norm()).item() for a, r in zip(got, ref))
    log(f"projector: max relative gradient difference fused vs unfused: {checks}")

    flops = projector_flops(B * Ni, Dv, D)
    floor_ms = flops / ceil["bf16_matmul_flop_per_s"] * 1e3
    res = {"shape": dict(B=B, Ni=Ni, Nt=Nt, Dv=Dv, D=D, dtype="bf16", regap_weight=lam), "flops": flops,
           "matmul_floor_ms": floor_ms, "grad_rel_diff_vs_unfused": checks, "results": {}}
    # all as launched (GEMM-bound: milliseconds of device work per call hide the launches),
    # interleaved so that clock drift hits every variant alike
    calls = {name: [(lambda fn=fn, s=s: fn(*s)) for s in sets] for name, fn in variants.items()}
    timings = time_interleaved(calls, rounds=15, per_round=2)
    for name, fn in variants.items():
        r = {"time": timings[name], "peak_mem_bytes": peak_memory_bytes(lambda fn=fn: fn(*sets[0]))}
        r["matmul_floor_fraction"] = floor_ms / r["time"]["median_ms"]
        res["results"][name] = r
        log(f"  projector {name:28s} {r['time']['median_ms']:.3f} ms ({r['matmul_floor_fraction']:.0%} of the "
            f"matmul floor), peak {r['peak_mem_bytes'] / 2**20:.0f} MiB")
    try:
        fns = [(lambda s=s: compiled(*s)) for s in sets]
        for s in sets:
            compiled(*s)
        r = {"time": time_cuda(fns, reps=30), "peak_mem_bytes": peak_memory_bytes(lambda: compiled(*sets[0]))}
        r["matmul_floor_fraction"] = floor_ms / r["time"]["median_ms"]
        res["results"]["unfused_compiled"] = r
        log(f"  projector unfused_compiled {r['time']['median_ms']:.3f} ms")
    except Exception as exc:  # report, do not lose the rest
        res["results"]["unfused_compiled"] = {"error": repr(exc)}
        log(f"  projector unfused_compiled failed: {exc!r}")
    return res


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
        r = proj["results"]
        fused = [k for k in r if k.startswith("fused_")]
        best = min(fused, key=lambda k: r[k]["time"]["median_ms"])
        s["projector_backend"] = best.removeprefix("fused_")
        plain = r["plain_no_regap"]["time"]["median_ms"]
        s["projector_fused_vs_plain_time_ratio"] = r[best]["time"]["median_ms"] / plain
        s["projector_fused_vs_plain_peak_mem_ratio"] = r[best]["peak_mem_bytes"] / r["plain_no_regap"]["peak_mem_bytes"]
    train = report.get("train_step")
    if train and not train.get("error"):
        s["train_step_time_ratio"] = train["time_ratio"]
        s["train_step_peak_mem_ratio"] = train["peak_mem_ratio"]
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
             "projector_fused_vs_plain_time_ratio": "<= 1.02", "gap_loss_fwd_bwd_hbm_fraction": ">= 0.85",
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
        lines += ["", "## Projector forward+backward (bf16, B=32, Ni=576, Dv=1024, D=4096)", "",
                  "| variant | time (ms) | peak memory (MiB) | of matmul floor |", "| --- | --- | --- | --- |"]
        for name, r in proj["results"].items():
            if "error" in r:
                lines.append(f"| {name} | failed: {r['error'][:80]} | | |")
                continue
            t = r["time"]["median_ms"]
            lines.append(f"| {name} | {t:.3f} | {r['peak_mem_bytes'] / 2**20:.0f} | {r['matmul_floor_fraction']:.0%} |")
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="gap,projector,train")
    ap.add_argument("--quick", action="store_true", help="smaller sweeps and step counts")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--only", choices=sorted(SECTIONS), help=argparse.SUPPRESS)  # internal: child process
    ap.add_argument("--ceilings", help=argparse.SUPPRESS)
    ap.add_argument("--part", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("run_gpu.py needs a CUDA GPU; on the CPU use `pytest benchmarks --benchmark-only`.")
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
    if report.get("gap_loss", {}).get("sweep"):
        plot_sweep(report, Path(str(stem) + "-gap-sweep.png"))
    log(f"wrote {stem}.json/.md")
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
