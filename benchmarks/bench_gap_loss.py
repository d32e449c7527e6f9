"""``fused_gap_loss`` forward+backward per backend against eager PyTorch and ``torch.compile`` of the
reference, at LLaVA-1.5-7B shapes and in a sweep over B, Ni and D.

Every contender is timed in one interleaved set (A B C A B C ...) with the same method: its device
time replayed from a CUDA graph (``compile(max-autotune)`` replays its own graphs, so it is timed as
launched), and as launched. Each is reported as a fraction of its floor: the fewest bytes it must
move over the measured HBM bandwidth. Runs on the CPU at tiny shapes (``rehearse``) so the GPU path
is exercised before a GPU runs it.
"""

from __future__ import annotations

import math

import torch

import regap_fast
from common import graphed, kernel_backends, rotation_count, time_interleaved

HEADLINE = dict(B=32, Ni=576, D=4096)
TINY = dict(B=2, Ni=12, D=16)


def gap_inputs(B, Ni, Nt, D, seed, device, dtype):
    """LLaVA-like: every image token counts (no image mask); captions padded to Nt, lengths Nt/2..Nt."""
    g = torch.Generator(device=device).manual_seed(seed)
    img = torch.randn(B, Ni, D, device=device, dtype=dtype, generator=g)
    txt = torch.randn(B, Nt, D, device=device, dtype=dtype, generator=g)
    lengths = torch.randint(Nt // 2, Nt + 1, (B,), device=device, generator=g)
    tm = torch.arange(Nt, device=device)[None, :] < lengths[:, None]
    return img, txt, tm


def gap_bytes(img, txt, tm) -> int:
    """The fewest bytes forward+backward must move: read every valid token once; write the dense
    (masked) caption gradient and the [B, D] image gradient vector (broadcast, not materialised)."""
    B, Ni, D = img.shape
    es = img.element_size()
    return img.numel() * es + int(tm.sum()) * D * es + tm.numel() + txt.numel() * es + B * D * es


def contenders(names, on_gpu: bool):
    out = {}
    for name in names:
        if name == "eager":
            out[name] = lambda i, t, m: regap_fast.gap_loss_reference(i, t, None, m)
        elif name == "compile":
            out[name] = torch.compile(lambda i, t, m: regap_fast.gap_loss_reference(i, t, None, m),
                                      mode="max-autotune" if on_gpu else None)
        else:
            out[name] = (lambda b: lambda i, t, m: regap_fast.fused_gap_loss(i, t, None, m, backend=b))(name)
    return out


def _step(f, img, txt, tm, compiled):
    def step():
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()
        return torch.autograd.grad(f(img, txt, tm), (img, txt))
    return step


def bench_point(B, Ni, Nt, D, names, bandwidth, device, dtype, rounds=15, log=print) -> dict:
    on_gpu = device.type == "cuda"
    count = rotation_count(B * (Ni + Nt) * D * 2 * 2) if on_gpu else 2
    sets = [gap_inputs(B, Ni, Nt, D, s, device, dtype) for s in range(count)]
    nbytes = gap_bytes(*sets[0])
    floor_ms = nbytes / bandwidth * 1e3
    row = {"B": B, "Ni": Ni, "Nt": Nt, "D": D, "bytes": nbytes, "floor_ms": floor_ms, "results": {}}
    calls, graphs, losses = {}, {}, {}
    for name, f in contenders(names, on_gpu).items():
        # fresh leaves per contender: autograd ties a leaf's gradient accumulator to the stream it first
        # ran on, and compile's CUDA graphs run on their own stream (seen on torch 2.11)
        leaves = [(i.clone().requires_grad_(True), t.clone().requires_grad_(True), m) for i, t, m in sets]
        fns = [_step(f, *s, compiled=name == "compile") for s in leaves]
        losses[name] = f(*leaves[0]).float().item()
        calls[name] = fns
        graphs[name] = fns if (name == "compile" or not on_gpu) else [graphed(fn) for fn in fns]
    launched = time_interleaved(calls, rounds=rounds, device=False)
    device_time = time_interleaved(graphs, rounds=rounds)  # graph replays (compile: its own), queued ahead
    for name in calls:
        res = {"loss": losses[name], "eager": launched[name], "graph": device_time[name]}
        res["hbm_fraction"] = floor_ms / res["graph"]["median_ms"]
        row["results"][name] = res
        log(f"  gap B={B} Ni={Ni} Nt={Nt} D={D} {name:8s} {res['graph']['median_ms'] * 1e3:8.1f} us "
            f"(floor {floor_ms * 1e3:.1f} us, {res['hbm_fraction']:.0%} of HBM), "
            f"as launched {res['eager']['median_ms'] * 1e3:.1f} us")
    ref = losses["eager"]
    for name, val in losses.items():  # every contender computes the same loss
        assert math.isclose(val, ref, rel_tol=2e-2), (name, val, ref)
    return row


def section(rehearse: bool, device, dtype, ceilings: dict, quick: bool = True, log=print) -> dict:
    """The gap-loss section: the headline (every contender) and the sweep (eager and the kernels)."""
    bw = ceilings["hbm_bytes_per_s"]
    kb = kernel_backends(device, dtype, "gap_loss")
    base = TINY if rehearse else HEADLINE
    rounds = 2 if rehearse else 15
    out = {"headline": [], "sweep": []}
    for Nt in ((8,) if rehearse else (128,) if quick else (64, 128)):
        log(f"fused_gap_loss headline, Nt={Nt}")
        out["headline"].append(bench_point(base["B"], base["Ni"], Nt, base["D"], ["eager", "compile"] + kb, bw,
                                           device, dtype, rounds, log))
    if rehearse:
        sweep = {"B": [1, 2], "Ni": [12], "D": [16]}
    elif quick:
        sweep = {"B": [8, 32], "Ni": [144, 576], "D": [2048, 4096]}
    else:
        sweep = {"B": [1, 4, 8, 16, 32, 64], "Ni": [32, 144, 576, 1152, 2304], "D": [1024, 2048, 4096, 5120, 8192]}
    for axis, values in sweep.items():
        for v in values:
            p = dict(base, **{axis: v})
            row = bench_point(p["B"], p["Ni"], 8 if rehearse else 128, p["D"], ["eager"] + kb, bw, device, dtype,
                              rounds, log)
            row["axis"] = axis
            out["sweep"].append(row)
    return out
