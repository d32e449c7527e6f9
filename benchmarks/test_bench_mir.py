"""MIR's per-layer trace term, regap_fast's exact path against scipy.linalg.sqrtm of the product (the published
"accurate" mode), at sizes CI's 2 cores take in seconds. The D = 1024 / 2048 measurement: bench_mir.py."""

import pytest

from bench_mir import covariances, fast_trace, reference_trace, state_bytes

pytest.importorskip("scipy")

DIMS = [128, 256]


@pytest.mark.parametrize("d", DIMS, ids=lambda d: f"D{d}")
def test_mir_trace_regap_fast(benchmark, d):
    s_v, s_t = covariances(d)
    value = benchmark(fast_trace, s_v, s_t)
    assert value == pytest.approx(reference_trace(s_v, s_t), rel=1e-8)


@pytest.mark.parametrize("d", DIMS, ids=lambda d: f"D{d}")
def test_mir_trace_reference_sqrtm(benchmark, d):
    s_v, s_t = covariances(d)
    assert benchmark(reference_trace, s_v, s_t) > 0


def test_mir_memory_is_flat_in_n():
    """The accumulator's matrices do not grow with the rows (only one norm scalar per row does)."""
    small, large = state_bytes(1024, 64), state_bytes(8192, 64)
    assert small["state_bytes_without_norms"] == large["state_bytes_without_norms"]
    assert large["state_bytes"] - small["state_bytes"] == 2 * (8192 - 1024) * 8
