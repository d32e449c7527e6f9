"""GPU checks of the cuda backend, beyond the test suite: its primitives against the torch backend on
~2,400 edge cases (every dtype, D = 1, N = 0/1, B up to 70,000, odd strides, misaligned views,
strided masks), offsets past 2^31, bitwise determinism, then the Triton and CUDA kernels timed side
by side (CUDA-graph medians) against the measured copy bandwidth at LLaVA-1.5-7B shapes.

    OUT=/tmp/out python3 benchmarks/kernel_check.py [edges] [int64] [determinism] [bench] [profile]

Writes $OUT/check.json.
"""
import json
import os
import sys
import time
import traceback

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # helpers.py: the test suite's input generators

import regap_fast
from regap_fast import _cuda_backend as C
from regap_fast import fused_gap_loss
from regap_fast import reference as R
from helpers import random_mask, random_tokens

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from common import measure_ceilings, time_cuda  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
failures, report = [], {"cases": 0}
ONLY = set(sys.argv[1:])  # sections to run; empty = all


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def fail(name, detail):
    failures.append(f"{name}: {detail}")
    log("FAIL", name, detail)


def relerr(a, b):
    a, b = a.double(), b.double()
    nb = b.norm()
    if nb == 0:
        return a.abs().max().item() if a.numel() else 0.0
    return ((a - b).norm() / nb).item()


def poison(x, mask):
    if mask is None:
        return x
    x[~mask] = float("nan")  # in place, through the view: the layout under test is kept
    return x


def check_forward(tag, img, txt, im, tm, reduction="mean", squared=False, tol=2e-5):
    report["cases"] += 1
    lc, dc, sc = C.pool_gap_forward(img, txt, im, tm, reduction, squared)
    lr, dr, sr = R.pool_gap_forward(img, txt, im, tm, reduction, squared)
    for n, c, r in (("loss", lc, lr), ("direction", dc, dr), ("stats", sc, sr)):
        if c.shape != r.shape or c.dtype != r.dtype:
            fail(tag, f"{n} shape/dtype {tuple(c.shape)} {c.dtype} vs {tuple(r.shape)} {r.dtype}")
            return None
        if not torch.isfinite(c).all():
            fail(tag, f"{n} not finite")
        e = relerr(c, r)
        if e > tol:
            fail(tag, f"{n} relerr {e:.3g}")
    if not torch.equal(sc[:2], sr[:2]):
        fail(tag, f"stats rows 0-1 differ: {sc[:2]} vs {sr[:2]}")
    return lr, dr, sr


def check_broadcast(tag, v, g, stats, n_a, n_t, ma, mt, dtype, need_a, need_t, sign_t):
    report["cases"] += 1
    oc = C.broadcast_rows(v, g, stats[2], stats[0], stats[1], n_a, n_t, ma, mt, dtype, need_a, need_t, sign_t)
    orf = R.broadcast_rows(v, g, stats[2], stats[0], stats[1], n_a, n_t, ma, mt, dtype, need_a, need_t, sign_t)
    for side, c, r in zip("at", oc, orf):
        if (c is None) != (r is None):
            fail(tag, f"side {side}: None mismatch")
            continue
        if c is None:
            continue
        if c.shape != r.shape or c.dtype != r.dtype:
            fail(tag, f"side {side}: {tuple(c.shape)} {c.dtype} vs {tuple(r.shape)} {r.dtype}")
        elif not torch.equal(c, r):
            fail(tag, f"side {side}: not bitwise equal, max diff {(c.float() - r.float()).abs().max().item():.3g}")


def tokens(B, N, D, dtype, layout, shift=0.0):
    """[B, N, D] tokens with the given memory layout (the shift is added in place: the layout stays)."""
    if layout == "contig":
        x = torch.randn(B, N, D, device=DEV).to(dtype)
    elif layout == "noncontig":
        x = random_tokens(B, N, D, dtype, DEV, noncontiguous=True)
    elif layout.startswith("offset"):  # a view starting k elements into its storage: misaligned
        k = int(layout[6:])
        x = torch.randn(B * N * D + k, device=DEV).to(dtype)[k:].view(B, N, D)
    elif layout == "expanded":  # stride 0 along N
        x = (torch.randn(B, 1, D, device=DEV) + shift).to(dtype).expand(B, N, D)
        return x
    elif layout == "padded":  # rows of a wider buffer: D contiguous, stride_n = D + 8
        x = torch.randn(B, N, D + 8, device=DEV).to(dtype)[:, :, :D]
    else:
        raise ValueError(layout)
    if shift:
        x.add_(shift)
    return x


def masks(B, N, kind):
    if kind is None:
        return None
    if kind == "random":
        return random_mask(B, N, DEV, empty_rows=(0,) if B > 2 else ())
    if kind == "strided":  # every other column of a wider mask
        return random_mask(B, 2 * N, DEV)[:, ::2]
    if kind == "transposed":
        return random_mask(N, B, DEV).t()
    if kind == "empty":
        return torch.zeros(B, N, dtype=torch.bool, device=DEV)
    if kind == "full":
        return torch.ones(B, N, dtype=torch.bool, device=DEV)
    raise ValueError(kind)


def run_case(B, Ni, Nt, D, dtype, li="contig", lt="contig", mi=None, mt=None, reduction="mean", squared=False):
    tag = f"B{B} Ni{Ni} Nt{Nt} D{D} {str(dtype)[6:]} {li}/{lt} masks {mi}/{mt} {reduction}{' sq' if squared else ''}"
    try:
        img = tokens(B, Ni, D, dtype, li)
        txt = tokens(B, Nt, D, dtype, lt, shift=0.5)
        im, tm = masks(B, Ni, mi), masks(B, Nt, mt)
        if li not in ("expanded",):
            img = poison(img, im)
        if lt not in ("expanded",):
            txt = poison(txt, tm)
        out = check_forward(tag, img, txt, im, tm, reduction, squared)
        if out is None:
            return
        loss, direction, stats = out
        g = torch.rand(B, device=DEV) + 0.5 if reduction == "none" else torch.tensor(1.7, device=DEV)
        check_broadcast(tag + " bwd", direction, g, stats, Ni, Nt, im, tm, dtype, True, True, -1.0)
        check_broadcast(tag + " bwd-a", direction, g, stats, Ni, Nt, im, tm, dtype, True, False, -1.0)
        check_broadcast(tag + " bwd-t", direction, g, stats, Ni, Nt, im, tm, dtype, False, True, -1.0)
        # masked_mean primitive on the image side
        mc, ic = C.masked_mean_forward(img, im)
        mr, ir = R.masked_mean_forward(img, im)
        report["cases"] += 1
        if relerr(mc, mr) > 2e-6 or not torch.equal(ic, ir) or not torch.isfinite(mc).all():
            fail(tag + " masked_mean", f"relerr {relerr(mc, mr):.3g}, inv equal {torch.equal(ic, ir)}")
        one = torch.ones((), device=DEV)
        gm = torch.randn(B, D, device=DEV)
        check_broadcast(tag + " mean-bwd", gm, one, torch.stack([ic, ic, one.expand(B)]), Ni, 0, im, None, dtype,
                        True, False, 1.0)
        # strided gradient vector (an expanded grad, as from out.sum())
        check_broadcast(tag + " mean-bwd-expanded", torch.ones(1, 1, device=DEV).expand(B, D), one,
                        torch.stack([ic, ic, one.expand(B)]), Ni, 0, im, None, dtype, True, False, 1.0)
    except Exception as exc:  # noqa: BLE001
        fail(tag, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")


def section_edges():
    shapes = [(1, 1, 1, 1), (2, 5, 3, 7), (3, 33, 17, 70), (4, 1, 9, 130), (2, 40, 65, 1), (5, 64, 32, 96),
              (3, 0, 5, 8), (2, 7, 0, 16), (3, 0, 0, 4), (2, 300, 7, 264), (7, 1000, 3, 8),
              (2, 5, 3, 8200), (2, 4, 3, 1030), (3, 3000, 1500, 16), (2, 3, 2, 4100)]
    for dtype in DTYPES:
        for (B, Ni, Nt, D) in shapes:
            for mi, mt in ((None, None), (None, "random"), ("random", "random")):
                run_case(B, Ni, Nt, D, dtype, mi=mi, mt=mt)
        for li, lt in (("noncontig", "noncontig"), ("contig", "noncontig"), ("offset1", "offset2"),
                       ("offset3", "contig"), ("expanded", "padded"), ("padded", "offset4")):
            for (B, Ni, Nt, D) in ((3, 21, 10, 37), (2, 8, 5, 24), (4, 70, 33, 256), (2, 5, 3, 1)):
                run_case(B, Ni, Nt, D, dtype, li, lt, mi="random", mt="strided")
                run_case(B, Ni, Nt, D, dtype, li, lt, mi=None, mt=None, reduction="sum", squared=True)
        for red in ("mean", "sum", "none"):
            for sq in (False, True):
                run_case(5, 19, 11, 45, dtype, mi="transposed", mt="random", reduction=red, squared=sq)
                run_case(4, 9, 6, 32, dtype, mi="empty", mt="random", reduction=red, squared=sq)
                run_case(4, 9, 6, 32, dtype, mi="full", mt="empty", reduction=red, squared=sq)
    # batches beyond the 65535 grid limit (the kernels loop over the batch)
    run_case(70000, 3, 2, 8, torch.float32, mi="random", mt=None)
    run_case(70000, 2, 3, 20, torch.bfloat16, mi=None, mt="random", reduction="none")
    # LLaVA shape, every dtype
    for dtype in DTYPES:
        run_case(32, 576, 128, 4096, dtype, mi=None, mt="random")
        run_case(4, 576, 128, 5120, dtype, mi="random", mt="random", reduction="sum")
    log(f"edge cases done: {report['cases']} checks, {len(failures)} failures")


def section_int64():
    """Offsets past 2^31 elements: [2, 600000, 4096] bf16 (9.8 GB)."""
    B, N, D = 2, 600_000, 4096
    torch.manual_seed(0)
    x = torch.empty(B, N, D, device=DEV, dtype=torch.bfloat16)
    for b in range(B):
        x[b].normal_()
    x[:, -1, :] += 3.0  # the last rows must be read
    m = torch.ones(B, N, dtype=torch.bool, device=DEV)
    m[1, ::3] = False
    txt = torch.randn(B, 8, D, device=DEV, dtype=torch.bfloat16)
    ref_sum = torch.stack([torch.where(m[b].unsqueeze(-1), x[b], 0).sum(0, dtype=torch.float32) for b in range(B)])
    n = m.sum(1).float()
    ref_mean = ref_sum / n[:, None]
    mc, ic = C.masked_mean_forward(x, m)
    e = relerr(mc, ref_mean)
    report["int64_masked_mean_relerr"] = e
    if e > 1e-4:
        fail("int64 masked_mean", f"relerr {e:.3g}")
    loss, direction, stats = C.pool_gap_forward(x, txt, m, None, "none", False)
    ref_gap = (ref_mean - txt.float().mean(1)).norm(dim=1)
    e = relerr(loss, ref_gap)
    report["int64_gap_relerr"] = e
    if e > 1e-4:
        fail("int64 gap", f"relerr {e:.3g}")
    del ref_sum
    torch.cuda.empty_cache()
    # backward: a dense [2, 600000, 4096] write, checked in slices
    v = torch.randn(B, D, device=DEV)
    g = torch.tensor([0.5, 2.0], device=DEV)
    out, _ = C.broadcast_rows(v, g, stats[2], stats[0], stats[1], N, 8, m, None, torch.bfloat16, True, False, -1.0)
    coef = (g * stats[2]) * stats[0]
    expect = (coef[:, None] * v).to(torch.bfloat16)
    bad = 0
    for s in range(0, N, 50_000):
        sl = out[:, s:s + 50_000]
        ms = m[:, s:s + 50_000].unsqueeze(-1)
        ok = torch.where(ms, sl == expect[:, None, :], sl == 0)
        bad += int((~ok).sum())
    report["int64_broadcast_bad"] = bad
    if bad:
        fail("int64 broadcast", f"{bad} wrong elements")
    del x, out
    torch.cuda.empty_cache()
    log("int64 done")


def section_determinism():
    torch.manual_seed(1)
    img = torch.randn(32, 576, 4096, device=DEV, dtype=torch.bfloat16)
    txt = torch.randn(32, 128, 4096, device=DEV, dtype=torch.bfloat16)
    tm = random_mask(32, 128, DEV)
    a = C.pool_gap_forward(img, txt, None, tm, "mean", False)
    for _ in range(3):
        b = C.pool_gap_forward(img, txt, None, tm, "mean", False)
        if not all(torch.equal(x, y) for x, y in zip(a, b)):
            fail("determinism", "forward differs between runs")
            break
    x = torch.randn(3, 5000, 1024, device=DEV)
    a = C.masked_mean_forward(x, None)
    b = C.masked_mean_forward(x, None)
    if not all(torch.equal(p, q) for p, q in zip(a, b)):
        fail("determinism", "masked_mean differs between runs")
    log("determinism done")


def section_bench():
    ceil = measure_ceilings()
    bw = ceil["hbm_bytes_per_s"]
    report["hbm_bytes_per_s"] = bw
    log(f"copy bandwidth {bw / 1e12:.3f} TB/s")
    B, Ni, Nt, D = 32, 576, 128, 4096
    dt = torch.bfloat16
    res = {}
    sets = []
    for s in range(3):
        g = torch.Generator(device=DEV).manual_seed(s)
        img = torch.randn(B, Ni, D, device=DEV, dtype=dt, generator=g)
        txt = torch.randn(B, Nt, D, device=DEV, dtype=dt, generator=g)
        lengths = torch.randint(Nt // 2, Nt + 1, (B,), device=DEV, generator=g)
        tm = torch.arange(Nt, device=DEV)[None, :] < lengths[:, None]
        sets.append((img, txt, tm))
    es = 2
    full_bytes = B * (Ni + Nt) * D * es

    def frac(nbytes, t):
        return nbytes / bw / (t["median_ms"] * 1e-3)

    for backend in ("triton", "cuda"):
        mod = regap_fast.backends.get(backend)
        r = {}
        # dense: every token valid on both sides, both gradients dense (masks all True)
        dense = [(i, t, torch.ones(B, Ni, dtype=torch.bool, device=DEV), torch.ones(B, Nt, dtype=torch.bool,
                                                                                     device=DEV)) for i, t, _ in sets]
        fw = [lambda s=s: mod.pool_gap_forward(s[0], s[1], s[2], s[3], "mean", False) for s in dense]
        t = time_cuda(fw, reps=40, graph=True)
        r["dense_forward"] = dict(t, hbm_fraction=frac(full_bytes, t))
        outs = [mod.pool_gap_forward(s[0], s[1], s[2], s[3], "mean", False) for s in dense]
        one = torch.ones((), device=DEV)
        bw_fns = [lambda s=s, o=o: mod.broadcast_rows(o[1], one, o[2][2], o[2][0], o[2][1], Ni, Nt, s[2], s[3], dt,
                                                      True, True, -1.0) for s, o in zip(dense, outs)]
        t = time_cuda(bw_fns, reps=40, graph=True)
        r["dense_backward"] = dict(t, hbm_fraction=frac(full_bytes, t))

        def fb(s=None, backend=backend):
            i, t_, mi, mt = s
            return torch.autograd.grad(fused_gap_loss(i, t_, mi, mt, backend=backend), (i, t_))
        dense_g = [(i.requires_grad_(True), t_.requires_grad_(True), mi, mt) for i, t_, mi, mt in dense]
        t = time_cuda([lambda s=s: fb(s) for s in dense_g], reps=40, graph=True)
        r["dense_fwd_bwd_op"] = dict(t, hbm_fraction=frac(2 * full_bytes, t))
        # LLaVA-like (benchmarks/run_gpu.py): no image mask, padded captions
        llava = [(i.requires_grad_(True), t_.requires_grad_(True), None, tm) for i, t_, tm in sets]
        nbytes = (B * Ni * D * es + int(sets[0][2].sum()) * D * es + sets[0][2].numel()
                  + B * Nt * D * es + B * D * es)
        t = time_cuda([lambda s=s: fb(s) for s in llava], reps=40, graph=True)
        r["llava_fwd_bwd_op"] = dict(t, hbm_fraction=frac(nbytes, t), bytes=nbytes)
        fw = [lambda s=s: mod.pool_gap_forward(s[0], s[1], None, s[3], "mean", False) for s in llava]
        t = time_cuda(fw, reps=40, graph=True)
        r["llava_forward"] = dict(t)
        # masked_mean of the image side alone
        t = time_cuda([lambda s=s: mod.masked_mean_forward(s[0], None) for s in sets], reps=40, graph=True)
        r["masked_mean_image"] = dict(t, hbm_fraction=frac(B * Ni * D * es, t))
        res[backend] = r
        for k, val in r.items():
            log(f"{backend:7s} {k:20s} {val['median_ms'] * 1e3:8.1f} us"
                + (f"  {val['hbm_fraction']:.1%} of copy bandwidth" if "hbm_fraction" in val else ""))
        for s in dense_g + llava:
            s[0].requires_grad_(False)
            s[1].requires_grad_(False)
    report["bench"] = res


def section_profile():
    from torch.profiler import ProfilerActivity, profile
    B, Ni, Nt, D = 32, 576, 128, 4096
    img = torch.randn(B, Ni, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    txt = torch.randn(B, Nt, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    lengths = torch.randint(Nt // 2, Nt + 1, (B,), device=DEV)
    tm = torch.arange(Nt, device=DEV)[None, :] < lengths[:, None]
    for _ in range(3):
        torch.autograd.grad(fused_gap_loss(img, txt, None, tm, backend="cuda"), (img, txt))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            torch.autograd.grad(fused_gap_loss(img, txt, None, tm, backend="cuda"), (img, txt))
        torch.cuda.synchronize()
    for key in ("device_time_total", "cuda_time_total"):
        try:
            print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=70))
            break
        except Exception as exc:  # noqa: BLE001
            print("profile table failed:", exc)


if __name__ == "__main__":
    torch.manual_seed(0)
    report["device"] = torch.cuda.get_device_name(0)
    report["torch"] = torch.__version__
    for name, fn in (("edges", section_edges), ("int64", section_int64), ("determinism", section_determinism),
                     ("bench", section_bench), ("profile", section_profile)):
        if ONLY and name not in ONLY:
            continue
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            fail(name, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    report["failures"] = failures
    with open(os.path.join(OUT, "check.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    log(f"{len(failures)} failures")
    for line in failures[:40]:
        print(line[:2000])
