"""What every Triton kernel module shares: whether the interpreter runs them, and how many programs a grid
should have."""

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _probe():
    pass


# True when TRITON_INTERPRET=1 was set before the kernels were imported: they then run on CPU tensors
# (slowly; that is how the CPU tests exercise them)
INTERPRETED = isinstance(_probe, InterpretedFunction)


def target_programs(device: torch.device) -> int:
    """Programs a grid should have: a few waves of the GPU's SMs; under the interpreter (which runs one
    program at a time) few and large ones run fastest."""
    if device.type == "cuda":
        return 8 * torch.cuda.get_device_properties(device).multi_processor_count
    return 16
