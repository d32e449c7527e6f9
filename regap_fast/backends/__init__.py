"""Which implementation runs an op: ``torch`` (plain PyTorch), ``triton`` (``kernels/``) or ``cuda``
(``regap_fast._C``, built from ``csrc/``).

Kernels come in families; a backend that provides a family provides all of its primitives with the
same names and contracts (one name per primitive in Python, in ``_C`` and in the ``.h``), so the ops
dispatch to any backend alike:

==========  ========================================================  ===============================
family      primitives                                                contract
==========  ========================================================  ===============================
gap_loss    ``gap_loss_forward``, ``masked_mean_forward``,            pooling, the gap, its broadcast
            ``broadcast_rows``                                        backward
text_pool   ``gather_mean_forward``                                   the caption side from token ids
projector   ``gelu_pool_forward``, ``dgelu_backward``, ``mean_split``   the memory-bound passes around
                                                                      the projector's cuBLAS GEMMs
==========  ========================================================  ===============================

Modules: ``backends/torch_backend.py``, ``kernels/gap_loss.py`` and ``kernels/projector.py`` (triton),
``backends/cuda_backend.py`` (over ``regap_fast._C``). Argument shapes: ``regap_fast/contracts.py``.

Determinism, one contract for every family and backend: the same inputs give bitwise the same
outputs run after run (fixed-order partial sums and finish kernels; no atomics anywhere). Backends
agree with each other to rounding, not bitwise.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")

FAMILIES = {
    "gap_loss": ("gap_loss_forward", "masked_mean_forward", "broadcast_rows"),
    "text_pool": ("gather_mean_forward",),
    "projector": ("gelu_pool_forward", "dgelu_backward", "mean_split"),
}
_TRITON_FILES = {"gap_loss": "gap_loss", "text_pool": "gap_loss", "projector": "projector"}

# What "auto" picks for CUDA tensors, in order of preference; the torch backend comes after these.
# gap_loss: the faster backend measured on an H100 at LLaVA-1.5-7B shapes (benchmarks/results/: fwd+bwd
# 93.7 us cuda vs 102.0 us triton). text_pool: Triton's, the one that has run on a GPU. projector: NOT
# YET MEASURED in its current design (every backend runs the same cuBLAS GEMMs; cuda and triton fold
# REGAP into the GELU passes, torch adds passes): a prior, for benchmarks/run_gpu.py to confirm or change.
AUTO_ON_CUDA = {"gap_loss": ("cuda", "triton"), "text_pool": ("triton", "cuda"), "projector": ("cuda", "triton")}

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class BackendUnavailable(ValueError):
    """The requested backend cannot run these tensors here (raised before any kernel launch)."""


@functools.lru_cache(maxsize=None)
def _import(name: str, family: str) -> tuple[ModuleType | None, str]:
    """The module of backend ``name`` that provides ``family``, or None and the reason."""
    if name == "torch":
        mod = importlib.import_module("regap_fast.backends.torch_backend")
    elif name == "triton":
        try:
            mod = importlib.import_module(f"regap_fast.kernels.{_TRITON_FILES[family]}")
        except Exception as exc:  # triton missing or broken: the torch backend still works
            return None, f"Triton kernels failed to import ({type(exc).__name__}: {exc})"
    else:
        try:
            importlib.import_module("regap_fast._C")
        except ImportError as exc:
            return None, (f"the CUDA extension regap_fast._C is not built ({exc}); reinstall with a CUDA "
                          "toolkit and a CUDA build of PyTorch present: "
                          "REGAP_FAST_BUILD_CUDA=1 pip install -e . --no-build-isolation")
        mod = importlib.import_module("regap_fast.backends.cuda_backend")
    missing = [f for f in FAMILIES[family] if not hasattr(mod, f)]
    if missing:
        return None, f"backend {name!r} has no {family} kernels ({', '.join(missing)})"
    return mod, ""


def clear_cache() -> None:
    """Forget which backend modules imported, and how: the next query imports again (after the
    extension is built or removed in a running process, and in tests that hide it)."""
    _import.cache_clear()


def why_unavailable(name: str, device: torch.device, dtype: torch.dtype, family: str = "gap_loss") -> str:
    """'' when backend ``name`` can run ``family`` on tensors of this device and dtype, else the reason.

    What the caller can fix about the tensors (device, dtype) is reported before what is installed.
    """
    if name == "torch":
        return ""
    if dtype not in KERNEL_DTYPES:
        return f"backend {name!r} supports {', '.join(map(str, KERNEL_DTYPES))}, not {dtype}; use backend='torch'"
    if name == "cuda" and device.type != "cuda":
        return f"backend 'cuda' needs CUDA tensors, got tensors on {device}"
    mod, reason = _import(name, family)
    if name == "triton":
        interpreted = mod.INTERPRETED if mod is not None else os.environ.get("TRITON_INTERPRET", "0") == "1"
        if device.type != "cuda" and not interpreted:
            return ("backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before regap_fast "
                    "is imported, to run the kernels on the CPU for testing)")
        if mod is not None and device.type == "cuda" and interpreted:
            return "backend 'triton' cannot run CUDA tensors in interpreter mode (TRITON_INTERPRET=1)"
    return reason if mod is None else ""


def _constant_under_compile(fn):
    """``torch.compiler.assume_constant_result(fn)`` without importing ``torch._dynamo`` when this module
    loads (2-3 s on a 2-core CPU, for every user who never compiles): the mark it sets, set here. A test checks that
    the two agree."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_under_compile
def resolve(backend: str, device: torch.device, dtype: torch.dtype, family: str = "gap_loss") -> str:
    """Turn a user's backend choice into a concrete one, or raise before anything runs.

    ``auto``: the preferred kernel backend that can run here for CUDA tensors, else ``torch``.
    Under torch.compile this runs once at trace time and its answer is a constant of the graph
    (it only inspects what is installed, never tensor data).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        if device.type == "cuda":
            for name in AUTO_ON_CUDA[family]:
                if not why_unavailable(name, device, dtype, family):
                    return name
        return "torch"
    if backend == "torch":
        return "torch"
    reason = why_unavailable(backend, device, dtype, family)
    if reason:
        raise BackendUnavailable(reason)
    return backend


def get(name: str, family: str = "gap_loss") -> ModuleType:
    """The module implementing ``family`` on backend ``name`` (already resolved)."""
    mod, reason = _import(name, family)
    if mod is None:
        raise BackendUnavailable(reason)
    return mod


def available(device: torch.device | None = None) -> dict[str, str]:
    """Each backend and family, and whether it can run here: '' or the reason (`regap-fast info`)."""
    dev = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    return {f"{name}/{family}": why_unavailable(name, dev, torch.float32, family)
            for name in BACKENDS[1:] for family in FAMILIES}


def extension_info() -> dict:
    """What the CUDA extension ``regap_fast._C`` holds: ``built``, ``archs`` (e.g. ``["sm_80", "sm_90",
    "compute_90"]``: SASS per GPU architecture, PTX for the newest), ``gpu`` and ``gpu_supported`` (the
    visible GPU's ``sm_XY`` and whether a kernel of ``_C`` can run on it), and ``reason`` when not built."""
    info = {"built": False, "archs": [], "gpu": None, "gpu_supported": None, "reason": ""}
    try:
        _C = importlib.import_module("regap_fast._C")
    except ImportError as exc:
        info["reason"] = str(exc)
        return info
    info["built"] = True
    info["archs"] = list(_C.cuda_archs())
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        info["gpu"] = f"sm_{major}{minor}"
        info["gpu_supported"] = arch_runs_on(info["archs"], major, minor)
    return info


def arch_runs_on(archs: list[str], major: int, minor: int) -> bool:
    """Whether code built for ``archs`` runs on a GPU of compute capability major.minor: SASS of the
    same major version and a minor at most the GPU's ("sm_80" runs on 8.6), or PTX of a version at
    most the GPU's, which the driver compiles ("compute_90" runs on 10.0). Arch-specific builds
    ("sm_90a") run only on their own GPU."""
    for arch in archs:
        kind, _, version = arch.partition("_")
        specific = version.endswith(("a", "f"))
        digits = version.rstrip("af")
        if not digits.isdigit():
            continue
        a_major, a_minor = int(digits[:-1]), int(digits[-1])
        if kind == "sm" and a_major == major and (a_minor == minor if specific else a_minor <= minor):
            return True
        if kind == "compute" and not specific and (a_major, a_minor) <= (major, minor):
            return True
    return False
