"""MIR's per-layer Fréchet distance: this library's exact path against the published "accurate" one.

    python benchmarks/bench_mir.py --dims 1024 2048        # the issue-31 measurement (CPU, minutes)
    pytest --benchmark-only benchmarks/test_bench_mir.py   # the same contenders at CI sizes

Both start from the same two fp64 covariance matrices of D dimensions (what a layer's statistics give):

* reference: ``scipy.linalg.sqrtm(S_v @ S_t)`` and its trace (the published code's "accurate" mode; a
  Schur decomposition of the non-symmetric product);
* regap_fast: ``regap_fast.eval.mir.trace_sqrt_product`` (Cholesky and an eigenvalue-only symmetric
  decomposition, see regap_fast/eval/mir.py).

Accuracy is each one's relative difference to the other (they agree to ~1e-12 on well-conditioned inputs).
Memory: the accumulator's state for one layer against the rows the published procedure keeps, for growing N.
"""

from __future__ import annotations

import argparse
import json
import time


def covariances(d: int, seed: int = 0):
    """Two well-conditioned covariance matrices of dimension d (2d rows each, correlated dimensions)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    rows = 2 * d
    a = torch.randn(rows, d, generator=g, dtype=torch.float64)
    b = torch.randn(rows, d, generator=g, dtype=torch.float64) @ (torch.eye(d, dtype=torch.float64)
                                                                   + 0.1 * torch.randn(d, d, generator=g,
                                                                                       dtype=torch.float64))
    return (a.T @ a / (rows - 1)), (b.T @ b / (rows - 1))


def reference_trace(s_v, s_t) -> float:
    import numpy as np
    from scipy.linalg import sqrtm

    return float(np.trace(sqrtm(s_v.numpy() @ s_t.numpy()).real))


def fast_trace(s_v, s_t) -> float:
    from regap_fast.eval.mir import trace_sqrt_product

    return trace_sqrt_product(s_v, s_t)


def _best(fn, repeats: int) -> tuple[float, float]:
    best, value = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t)
    return best, value


def state_bytes(n_rows: int, d: int) -> dict:
    """Bytes held by the accumulator for one layer after streaming n_rows rows per modality (no outliers),
    against the bytes of the rows themselves (float32), which the published procedure keeps."""
    import torch

    from regap_fast.eval.mir import MIRAccumulator

    acc = MIRAccumulator(1)
    g = torch.Generator().manual_seed(0)
    for s in range(0, n_rows, 1024):
        k = min(1024, n_rows - s)
        acc.add(0, torch.randn(k, d, generator=g), torch.randn(k, d, generator=g))
    held = 0
    for rs in acc.sets[0]:
        held += sum(t.numel() * t.element_size() for t in (rs.shift, rs.sum, rs.outer) if t is not None)
        held += sum(t.numel() * t.element_size() for t in rs.norms)
    return {"rows": n_rows, "state_bytes": held, "rows_bytes": 2 * n_rows * d * 4,
            "state_bytes_without_norms": held - 2 * n_rows * 8}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--memory-dim", type=int, default=512)
    parser.add_argument("--memory-rows", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    import torch

    results = {"threads": torch.get_num_threads(), "timings": [], "memory": []}
    for d in args.dims:
        s_v, s_t = covariances(d)
        t_ref, v_ref = _best(lambda: reference_trace(s_v, s_t), args.repeats)
        t_fast, v_fast = _best(lambda: fast_trace(s_v, s_t), args.repeats)
        row = {"D": d, "reference_s": t_ref, "regap_fast_s": t_fast, "speedup": t_ref / t_fast,
               "relative_difference": abs(v_fast - v_ref) / abs(v_ref)}
        results["timings"].append(row)
        print(f"D={d}: reference sqrtm {t_ref:.3f} s, regap_fast {t_fast:.3f} s, {t_ref / t_fast:.1f}x, "
              f"relative difference {row['relative_difference']:.2e}", flush=True)
    for n in args.memory_rows:
        m = state_bytes(n, args.memory_dim)
        results["memory"].append(m)
        print(f"N={n} rows per modality, D={args.memory_dim}: accumulator {m['state_bytes'] / 2**20:.2f} MiB "
              f"({m['state_bytes_without_norms'] / 2**20:.2f} MiB without the per-row norms) vs the rows "
              f"{m['rows_bytes'] / 2**20:.1f} MiB", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
