"""A stage-1 training step, REGAP on and off (tiny on the CPU, LLaVA-1.5-7B shapes on a GPU)."""

import pytest
import torch

from conftest import DEVICE, ON_GPU, synchronized
from bench_train_step import build_model, make_step, synthetic_batch

SIZE, BATCH = ("7b", 4) if ON_GPU else ("tiny", 2)


@pytest.fixture(scope="module")
def model_and_batch():
    vlm = build_model(SIZE, DEVICE)
    return vlm, synthetic_batch(vlm, BATCH, 16, DEVICE)


@pytest.mark.parametrize("regap_weight", [0.0, 0.1], ids=["regap-off", "regap-on"])
def test_train_step(benchmark, model_and_batch, regap_weight):
    vlm, batch = model_and_batch
    out = benchmark(synchronized(make_step(vlm, batch, regap_weight)))
    assert torch.isfinite(out["loss"])
    assert (out["gap"] is not None) == (regap_weight > 0)
