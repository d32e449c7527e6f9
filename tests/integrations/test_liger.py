"""Liger-Kernel 0.8 composes with apply_regap: a transformers LLaVA patched with ``apply_liger_kernel_to_llava``
and then ``apply_regap`` gives the reference loss (REGAP on, no Liger) and gradients reach the projector.
Liger's kernels are GPU Triton kernels and ``liger-kernel`` is an optional dependency: skipped with the
reason where either is missing. The step-time goal (<= 1.01x Liger alone) is in benchmarks/bench_liger.py.
"""

import sys
from pathlib import Path

import pytest
import torch

import regap_fast

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger-Kernel's kernels need a CUDA GPU")]
liger = pytest.importorskip("liger_kernel.transformers", reason="liger-kernel is not installed (optional)")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
bench_liger = pytest.importorskip("bench_liger")


def test_liger_then_regap_gives_the_reference_loss():
    shape = bench_liger.SHAPES["tiny"]
    device, dtype = torch.device("cuda"), torch.bfloat16
    reference = regap_fast.apply_regap(bench_liger.build_llava(shape, device, dtype), regap_weight=0.5)
    patched = bench_liger.build_llava(shape, device, dtype)
    liger.apply_liger_kernel_to_llava(model=patched)
    regap_fast.apply_regap(patched, regap_weight=0.5)
    batch = bench_liger.batch_for(reference, shape, device, dtype)
    want, got = reference(**batch), patched(**batch)
    assert got.regap_gap.item() == pytest.approx(want.regap_gap.item(), rel=1e-2)
    assert got.loss.item() == pytest.approx(want.loss.item(), rel=2e-2)  # bf16 LM kernels differ in rounding
    (grad,) = torch.autograd.grad(got.loss, [patched.model.multi_modal_projector.linear_1.weight])
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
