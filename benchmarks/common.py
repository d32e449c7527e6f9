"""Timing and accounting helpers shared by the GPU report (run_gpu.py) and the pytest benchmarks.

Device work is timed with CUDA events, after warm-up, as the median of many repetitions, with the
inputs rotated among several sets whose total size exceeds the L2 cache (so no repetition is served
from L2). ``graph=True`` captures each repetition in a CUDA graph and times its replay: the device
time alone, free of Python and launch overhead (what a training step that runs ahead of the GPU sees).
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Sequence

import torch


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return os.environ.get("REGAP_FAST_COMMIT", "unknown")


def environment() -> dict:
    import triton

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), sm_count=p.multi_processor_count,
                    gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    l2_cache_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
        try:
            info["driver"] = subprocess.check_output(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], text=True).strip()
        except Exception:
            pass
    return info


def kernel_backends(device: torch.device, dtype: torch.dtype, family: str) -> list[str]:
    """The kernel backends (triton, cuda) whose ``family`` runs on this device and dtype."""
    from regap_fast import backends

    return [b for b in ("triton", "cuda") if not backends.why_unavailable(b, torch.device(device), dtype, family)]


def l2_bytes() -> int:
    p = torch.cuda.get_device_properties(0)
    return int(getattr(p, "L2_cache_size", 50 * 2**20))


def rotation_count(bytes_per_set: int, minimum: int = 2) -> int:
    """How many input sets to rotate so that their total is at least 3x the L2 cache."""
    return max(minimum, -(-3 * l2_bytes() // max(1, bytes_per_set)))


def _summary(times_ms: Sequence[float]) -> dict:
    q = statistics.quantiles(times_ms, n=10) if len(times_ms) >= 10 else [min(times_ms)] * 9
    return {"median_ms": statistics.median(times_ms), "p10_ms": q[0], "p90_ms": q[-1], "reps": len(times_ms)}


def time_cuda(fns: Sequence[Callable[[], object]], *, warmup: int = 5, reps: int = 50, graph: bool = False) -> dict:
    """Median device time of one call, rotating over ``fns`` (one callable per input set)."""
    if graph:
        fns = [graphed(fn) for fn in fns]
    for i in range(warmup):
        fns[i % len(fns)]()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        fns[i % len(fns)]()
        ends[i].record()
    torch.cuda.synchronize()
    return _summary([s.elapsed_time(e) for s, e in zip(starts, ends)])


_SLEEP_CYCLES_PER_MS: float | None = None


def _sleep_cycles_per_ms() -> float:
    """GPU clock cycles per millisecond of ``torch.cuda._sleep`` (measured once)."""
    global _SLEEP_CYCLES_PER_MS
    if _SLEEP_CYCLES_PER_MS is None:
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1_000_000)  # warm-up
        s.record()
        torch.cuda._sleep(10_000_000)
        e.record()
        e.synchronize()
        _SLEEP_CYCLES_PER_MS = 10_000_000 / max(s.elapsed_time(e), 1e-3)
    return _SLEEP_CYCLES_PER_MS


def time_interleaved(variants: dict[str, Sequence[Callable[[], object]]], *, warmup: int = 3, rounds: int = 20,
                     per_round: int = 3, device: bool = True) -> dict[str, dict]:
    """Time several variants in alternation (A B A B ...): slow drifts (clocks, temperature) hit all alike.

    On a GPU each call is timed by CUDA events around it. ``device=True``: device time (``median_ms``):
    a ``torch.cuda._sleep`` long enough to cover the call's host time is enqueued first, so the call's
    kernels are all queued before the start event fires and the events see the device, not Python and
    the launch queue; besides, one call per variant and round is timed as launched from an idle GPU
    (``launched``; what an eager step that does not run ahead of the GPU sees), and
    ``launch_overhead_ms`` is the difference of the medians. ``device=False``: every call as launched.
    On the CPU (rehearsals) the wall clock, both ways alike.
    """
    on_gpu = torch.cuda.is_available()
    host_ms: dict[str, float] = {}
    for name, fns in variants.items():
        for i in range(warmup):
            if on_gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fns[i % len(fns)]()
            host_ms[name] = (time.perf_counter() - t0) * 1e3  # the last (warm) call's enqueue time
    if on_gpu:
        torch.cuda.synchronize()
    cycles_per_ms = _sleep_cycles_per_ms() if on_gpu and device else 0.0
    times: dict[str, list[float]] = {k: [] for k in variants}
    launched: dict[str, list[float]] = {k: [] for k in variants}
    calls_per_round = per_round + 1 if device else per_round
    for r in range(rounds):
        for name, fns in variants.items():
            for j in range(calls_per_round):
                call = fns[(r * calls_per_round + j) % len(fns)]
                as_launched = device and j == 0
                if not on_gpu:
                    t0 = time.perf_counter()
                    call()
                    (launched if as_launched else times)[name].append((time.perf_counter() - t0) * 1e3)
                    continue
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                if device and not as_launched:  # keep the GPU busy while the host enqueues the call
                    ahead_ms = min(2 * host_ms.get(name, 1.0) + 0.1, 100.0)  # a compile warm-up is not a launch
                    torch.cuda._sleep(int(cycles_per_ms * ahead_ms))
                s.record()
                call()
                e.record()
                e.synchronize()
                (launched if as_launched else times)[name].append(s.elapsed_time(e))
    out = {}
    for k in variants:
        out[k] = _summary(times[k])
        if device:
            out[k]["launched"] = _summary(launched[k])
            out[k]["launch_overhead_ms"] = out[k]["launched"]["median_ms"] - out[k]["median_ms"]
    return out


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """Capture fn (forward and backward alike) in a CUDA graph; return its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: autotuning, cuBLAS workspaces, allocator
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def peak_memory_bytes(fn: Callable[[], object]) -> int:
    """Peak allocated memory during one call, above what was allocated before it (0 on the CPU,
    where PyTorch keeps no such count)."""
    if not torch.cuda.is_available():
        fn()
        return 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


def measure_ceilings() -> dict:
    """The machine's own ceilings: device-to-device copy bandwidth and bf16 matmul rate."""
    n = 1 << 28  # 1 GiB of fp32 per buffer
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    t = time_cuda([lambda: dst.copy_(src)], warmup=5, reps=30)
    bw = 2 * n * 4 / (t["median_ms"] * 1e-3)  # bytes read + bytes written
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(m, m, device="cuda", dtype=torch.bfloat16)
    t2 = time_cuda([lambda: torch.mm(a, b, out=c)], warmup=5, reps=30)
    rate = 2 * m**3 / (t2["median_ms"] * 1e-3)
    return {"hbm_bytes_per_s": bw, "copy": t, "bf16_matmul_flop_per_s": rate, "matmul": t2}
