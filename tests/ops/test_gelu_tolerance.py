"""The GELU tolerance of the primitive tests (``helpers.gelu_error_bound``) comes from the error analysis
of fp32 erf, not from one CPU: it holds, with a margin, for PyTorch's GELU on every vectorised CPU path
this machine can run (``ATEN_CPU_CAPABILITY``: default, AVX2, AVX-512), and it is not so loose that a
wrong GELU (the tanh approximation) would pass."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import gelu_error_bound

TESTS = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from helpers import gelu_error_bound
import math
torch.manual_seed(0)
x = torch.cat([torch.randn(1_000_000) * 3, torch.linspace(-9, 9, 200_001)])
worst = {{}}
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    h = torch.nn.functional.gelu(x.to(dtype))
    xd = x.to(dtype).double()
    ref = 0.5 * xd * (1 + torch.erf(xd / math.sqrt(2.0)))
    worst[str(dtype)] = ((h.double() - ref).abs() / gelu_error_bound(xd, dtype)).max().item()
print(json.dumps({{"capability": torch.backends.cpu.get_cpu_capability(), "worst": worst}}))
"""


def run_probe(capability):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    out = subprocess.run([sys.executable, "-c", PROBE.format(tests=str(TESTS))], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_supports(capability):
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {"avx2": " avx2 ", "avx512": " avx512f "}[capability] in flags.replace("\n", " ") + " "


@pytest.mark.parametrize("capability", [None, "avx2", "avx512"])
def test_gelu_bound_holds_on_each_cpu_path(capability):
    if capability is not None and not cpu_supports(capability):
        pytest.skip(f"this CPU has no {capability}")
    result = run_probe(capability)
    if capability is not None:
        assert result["capability"].lower() == capability, result  # torch took the path asked for
    for dtype, worst in result["worst"].items():
        assert worst <= 1.0, f"{dtype} on {result['capability']}: {worst:.3g}x the bound"


def test_gelu_bound_rejects_a_wrong_gelu():
    x = torch.linspace(-6, 6, 100_001)
    exact = torch.nn.functional.gelu(x.double())
    tanh = torch.nn.functional.gelu(x, approximate="tanh").double()
    assert ((tanh - exact).abs() > gelu_error_bound(x, torch.float32)).any()
