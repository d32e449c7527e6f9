"""A stage-1 training step, REGAP on and off (tiny on the CPU, LLaVA-1.5-7B shapes on a GPU).

Both arms are warmed up before anything is timed (first calls allocate the optimizer state, pick
kernels, fill caches), so neither arm's numbers carry the other's start-up. ``test_train_step_overhead``
times the two arms interleaved, call by call, and reports the ratio on/off: the figure to read.
"""

import statistics
import time

import pytest
import torch

from conftest import DEVICE, ON_GPU, synchronized
from bench_train_step import build_model, make_step, synthetic_batch

SIZE, BATCH = ("7b", 4) if ON_GPU else ("tiny", 2)
WARMUP, ROUNDS = 3, (20 if ON_GPU else 10)
ARMS = {"regap-off": 0.0, "regap-on": 0.1}


@pytest.fixture(scope="module")
def steps():
    """One warmed-up step function per arm, on one model and batch."""
    vlm = build_model(SIZE, DEVICE)
    batch = synthetic_batch(vlm, BATCH, 16, DEVICE)
    fns = {arm: synchronized(make_step(vlm, batch, weight)) for arm, weight in ARMS.items()}
    for _ in range(WARMUP):
        for fn in fns.values():
            fn()
    return fns


@pytest.mark.parametrize("arm", list(ARMS))
def test_train_step(benchmark, steps, arm):
    out = benchmark.pedantic(steps[arm], rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert torch.isfinite(out["loss"])
    assert (out["gap"] is not None) == (ARMS[arm] > 0)


def test_train_step_overhead(benchmark, steps):
    """REGAP on / off, the arms alternating call by call (the order flipped every round), medians."""
    times = {arm: [] for arm in ARMS}

    def pair():
        order = list(ARMS) if len(times["regap-off"]) % 2 == 0 else list(ARMS)[::-1]
        for arm in order:
            t0 = time.perf_counter()
            steps[arm]()
            times[arm].append(time.perf_counter() - t0)

    benchmark.pedantic(pair, rounds=ROUNDS, iterations=1)
    medians = {arm: statistics.median(t) for arm, t in times.items()}
    benchmark.extra_info.update({f"median_ms_{arm}": 1e3 * m for arm, m in medians.items()})
    benchmark.extra_info["ratio_on_off"] = medians["regap-on"] / medians["regap-off"]
    assert all(len(t) == ROUNDS for t in times.values())
    assert all(m > 0 for m in medians.values())
