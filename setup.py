"""Build of regap_fast: the pure-Python package always, the CUDA extension regap_fast._C where it can.

    pip install -e . --no-build-isolation

REGAP_FAST_BUILD_CUDA=1 forces the CUDA build (and fails loudly if it cannot), =0 skips it; unset,
it builds when PyTorch is a CUDA build and nvcc is found. TORCH_CUDA_ARCH_LIST picks the GPU
architectures; by default the visible GPU's, else SASS for each of DEFAULT_ARCHS that the installed
nvcc knows plus PTX of the newest (so a newer GPU still runs the kernels, JIT-compiled by the driver).
The list is compiled into the extension: `regap-fast info` reports it. The extension's sources are
listed once, in csrc/sources.txt, which CMakeLists.txt reads too.
"""

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


# Ampere (A100, A10/RTX 30), Ada (L4/L40, RTX 40), Hopper (H100/H200), Blackwell (B200, RTX 50)
DEFAULT_ARCHS = ("8.0", "8.6", "8.9", "9.0", "10.0", "12.0")


def log(msg: str) -> None:
    print(f"regap_fast setup: {msg}", file=sys.stderr, flush=True)


def extension_sources() -> list[str]:
    lines = (ROOT / "csrc" / "sources.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def find_cuda_home() -> str | None:
    """CUDA_HOME, else the toolkit around the nvcc on PATH (following wrapper scripts), else None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        if (home / "bin" / "nvcc").exists() and (home / "include" / "cuda_runtime.h").exists():
            return str(home)
    return None


def wheel_cuda_includes(cuda_home: str) -> list[str]:
    """Headers that torch's ATen headers include (cusparse.h, cublas_v2.h, ...) but a minimal
    toolkit lacks: the pip nvidia-* wheels carry them."""
    if (Path(cuda_home) / "include" / "cusparse.h").exists():
        return []
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for base in nvidia.__path__:
        dirs += [d for d in glob.glob(os.path.join(base, "*", "include")) if os.path.isdir(d)]
    return sorted(dirs)


def toolkit_archs(cuda_home: str) -> set[str]:
    """The compute capabilities ("9.0", "12.0", ...) that this nvcc can compile for."""
    try:
        out = subprocess.run([str(Path(cuda_home) / "bin" / "nvcc"), "--list-gpu-arch"], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return set()
    caps = set()
    for name in out.split():
        digits = name.removeprefix("compute_")
        if digits.isdigit():
            caps.add(f"{digits[:-1]}.{digits[-1]}")
    return caps


def default_arch_list(cuda_home: str) -> str:
    """SASS for the DEFAULT_ARCHS the toolkit knows, PTX for the newest of them."""
    known = toolkit_archs(cuda_home)
    archs = [a for a in DEFAULT_ARCHS if a in known] or ["8.0", "9.0"]  # unknown toolkit: the old default
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])


def arch_names(arch_list: str) -> list[str]:
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX") as the code it builds: ["sm_80", "sm_90", "compute_90"]."""
    names = []
    for item in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        if not item:
            continue
        cap, ptx = item.removesuffix("+PTX"), item.endswith("+PTX")
        digits = cap.replace(".", "")
        names.append(f"sm_{digits}")
        if ptx:
            names.append(f"compute_{digits}")
    return names


def cuda_extension():
    mode = os.environ.get("REGAP_FAST_BUILD_CUDA", "auto").strip().lower()
    force = mode in ("1", "true", "yes", "on")
    if mode in ("0", "false", "no", "off"):
        log("REGAP_FAST_BUILD_CUDA=0: skipping the CUDA extension (torch and triton backends only)")
        return [], {}

    def skip(reason: str):
        if force:
            raise RuntimeError(f"REGAP_FAST_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        log(f"not building the CUDA extension ({reason}); installing the pure-Python package "
            "(torch and triton backends)")
        return [], {}

    cuda_home = find_cuda_home()
    if cuda_home is None:
        return skip("no CUDA toolkit (nvcc) found; set CUDA_HOME")
    os.environ.setdefault("CUDA_HOME", cuda_home)  # before torch.utils.cpp_extension reads it
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as exc:
        return skip(f"PyTorch is not importable ({exc}); install torch first and use --no-build-isolation")
    if torch.version.cuda is None:
        return skip(f"PyTorch {torch.__version__} is a CPU-only build")
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if torch.cuda.is_available():
            caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
            os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{major}.{minor}" for major, minor in sorted(caps))
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = default_arch_list(cuda_home)
    archs = arch_names(os.environ["TORCH_CUDA_ARCH_LIST"])
    log(f"building regap_fast._C with CUDA_HOME={cuda_home}, torch {torch.__version__}, "
        f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} ({', '.join(archs)}); "
        "nvcc compiles each architecture separately (a few minutes on 2 cores)")
    ext = CUDAExtension(
        name="regap_fast._C",
        sources=extension_sources(),
        include_dirs=[str(ROOT / "csrc")] + wheel_cuda_includes(cuda_home),
        extra_compile_args={
            # torch >= 2.13's headers need C++20 (bindings.cpp); the .cu files include no torch header
            # the architectures, compiled in for `regap-fast info` (bindings.cpp: _C.cuda_archs())
            "cxx": ["-O3", "-std=c++20", f"-DREGAP_FAST_CUDA_ARCHS={','.join(archs)}"],
            # no --use_fast_math: the projector epilogues need the exact erf GELU
            "nvcc": ["-O3", "-std=c++17", "-lineinfo"],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import its helpers
    ext_modules, cmdclass = cuda_extension()
    setup(
        packages=find_packages(include=["regap_fast", "regap_fast.*"]) + ["regap_fast.kernels"],
        # the Triton kernels live in the top-level kernels/ folder (the project's layout: kernels/,
        # csrc/, regap_fast/) but ship inside regap_fast's namespace: a top-level `kernels` package
        # would clash with an unrelated PyPI package. kernels/README.md says so where a reader looks.
        package_dir={"regap_fast.kernels": "kernels"},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
