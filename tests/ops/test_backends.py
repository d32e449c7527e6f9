"""Backend resolution, what the CUDA extension holds, and the projector's autotuning key."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from regap_fast import backends

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("archs, capability, runs", [
    (["sm_80", "sm_90", "compute_90"], (8, 0), True),
    (["sm_80", "sm_90", "compute_90"], (8, 6), True),     # sm_80 SASS runs on every 8.x at or above 8.0
    (["sm_86"], (8, 0), False),                          # ... but not below its own minor version
    (["sm_80", "sm_90"], (10, 0), False),                # Blackwell: no SASS of its major, no PTX
    (["sm_80", "sm_90", "compute_90"], (10, 0), True),   # PTX of 9.0: the driver compiles it for 10.0
    (["sm_80", "sm_90", "compute_90"], (12, 0), True),
    (["sm_90a"], (9, 0), True),                          # arch-specific code runs on its own GPU only
    (["sm_90a"], (10, 0), False),
    (["compute_120"], (9, 0), False),                    # PTX never runs on an older GPU
    ([], (9, 0), False),
])
def test_arch_runs_on(archs, capability, runs):
    assert backends.arch_runs_on(archs, *capability) is runs


def test_extension_info_names_the_compiled_architectures():
    info = backends.extension_info()
    if not info["built"]:
        assert info["reason"] and info["archs"] == []
        pytest.skip(f"regap_fast._C is not built: {info['reason']}")
    assert info["archs"], "the extension was built without an architecture list"
    assert all(re.fullmatch(r"(sm|compute)_\d{2,3}[af]?", a) for a in info["archs"]), info["archs"]
    assert any(a.startswith("compute_") for a in info["archs"]), "no PTX: a newer GPU could not run the kernels"
    if not torch.cuda.is_available():
        assert info["gpu"] is None and info["gpu_supported"] is None


def test_setup_arch_list_matches_the_toolkit():
    """setup.py's default: SASS for each default architecture nvcc knows, PTX for the newest."""
    sys.path.insert(0, str(ROOT))
    try:
        import setup as setup_py  # noqa: F401  (setup() only runs under setuptools' commands)
    except SystemExit:
        pytest.skip("setup.py cannot be imported here")
    finally:
        sys.path.pop(0)
    assert setup_py.arch_names("8.0;8.6;9.0+PTX") == ["sm_80", "sm_86", "sm_90", "compute_90"]
    assert setup_py.arch_names("12.0+PTX") == ["sm_120", "compute_120"]
    home = setup_py.find_cuda_home()
    if home is None:
        pytest.skip("no CUDA toolkit here")
    listed = setup_py.default_arch_list(home).split(";")
    assert listed[-1].endswith("+PTX") and all("+PTX" not in a for a in listed[:-1])
    known = setup_py.toolkit_archs(home)
    assert all(a.removesuffix("+PTX") in known for a in listed)


def test_cuda_backend_reports_the_device_before_the_missing_extension(monkeypatch):
    monkeypatch.setitem(sys.modules, "regap_fast._C", None)
    backends.clear_cache()
    try:
        assert "needs CUDA tensors" in backends.why_unavailable("cuda", torch.device("cpu"), torch.float32)
        assert "float64" in backends.why_unavailable("cuda", torch.device("cpu"), torch.float64)
        assert "not built" in backends.why_unavailable("cuda", torch.device("cuda"), torch.float32)
        assert backends.extension_info()["built"] is False
    finally:
        backends.clear_cache()


def test_every_backend_provides_the_projector_family():
    """The torch backend's projector primitives are PyTorch ops: `auto` can always resolve."""
    assert backends.resolve("auto", torch.device("cpu"), torch.float32, "projector") == "torch"
    mod = backends.get("torch", "projector")
    assert all(hasattr(mod, f) for f in backends.FAMILIES["projector"])


def test_plain_pytest_benchmark_only_collects_the_benchmarks():
    out = subprocess.run([sys.executable, "-m", "pytest", "--benchmark-only", "--collect-only", "-q",
                          "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    collected = [line for line in out.stdout.splitlines() if "::" in line]
    assert collected, out.stdout[-2000:] + out.stderr[-2000:]
    assert all(line.startswith("benchmarks/") for line in collected), collected[:5]


@pytest.mark.slow
def test_the_core_ops_need_no_extra():
    """`pip install regap_fast` without extras: the ops and projectors import and run without
    transformers, scipy, matplotlib or PIL, and importing the package loads none of the heavy parts."""
    code = ("import sys\n"
            "for name in ('transformers', 'scipy', 'matplotlib', 'PIL', 'tqdm', 'safetensors'):\n"
            "    sys.modules[name] = None\n"
            "import regap_fast\n"
            "assert 'torch' not in sys.modules, 'import regap_fast must stay cheap'\n"
            "import torch\n"
            "x = torch.randn(2, 5, 8, requires_grad=True)\n"
            "proj = regap_fast.FusedLlavaProjector(8, 12)\n"
            "e, gap = regap_fast.projector_gap_loss(proj, x, torch.randint(0, 30, (2, 4)), torch.randn(30, 12))\n"
            "(e.sum() + gap).backward()\n"
            "print('ok', float(regap_fast.fused_gap_loss(e.detach(), torch.randn(2, 3, 12))) > 0)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok True", out.stderr[-3000:]


def test_the_compile_constant_mark_is_torchs_own():
    """backends marks ``resolve`` as torch.compiler.assume_constant_result would, without importing dynamo."""
    from regap_fast.backends import _constant_under_compile

    def ours():
        pass

    def theirs():
        pass

    assert _constant_under_compile(ours) is ours
    torch.compiler.assume_constant_result(theirs)
    assert ours.__dict__ == theirs.__dict__ and theirs.__dict__


def test_importing_the_ops_does_not_import_dynamo():
    code = "import sys, regap_fast.projector, regap_fast.model; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
