"""Imports as a user types them in a fresh interpreter. Nothing in the checkout stands in for an installed
distribution when the repository's root is on ``sys.path`` (pytest's rootdir, ``python -c`` or a REPL in
the clone): the top-level ``kernels/`` folder is ``regap_fast.kernels``, and transformers (>= 5.25 imports
the PyPI package ``kernels``) works from there. ``import regap_fast._C`` needs no ``import torch`` first."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def python_in_root(code: str) -> subprocess.CompletedProcess:
    """``python -c code`` from the repository's root, as a user in the clone runs it ('' first on sys.path)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=300)


def installed_kernels() -> Path | None:
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(dist.locate_file("kernels")).resolve()


def test_import_kernels_from_the_root_is_the_installed_distribution():
    run = python_in_root("import kernels, sys; print(kernels.__file__); print(sys.path[0] == '')")
    installed = installed_kernels()
    if installed is None:  # an empty namespace package stands there: no __file__, nothing in it
        assert run.returncode == 0 and run.stdout.split()[0] == "None", run.stderr
        return
    assert run.returncode == 0, run.stderr
    path, root_first = run.stdout.split()
    assert root_first == "True"  # the case that used to shadow: the checkout before site-packages
    assert Path(path).resolve().parent == installed
    assert not Path(path).resolve().is_relative_to(ROOT / "kernels")


def test_without_an_installed_kernels_the_folder_is_not_a_top_level_package():
    # site-packages out of the path: only the checkout could answer `import kernels`, and must not. What
    # comes back is an empty namespace package (no __file__, no modules), which transformers' availability
    # check (find_spec, then the module's __file__ when no distribution metadata exists) reads as absent
    run = python_in_root("import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n"
                         "import kernels\n"
                         "print(kernels.__file__, getattr(kernels, '__version__', None), list(kernels.__path__))\n"
                         "try:\n    import kernels.gap_loss\nexcept ModuleNotFoundError:\n    print('no gap_loss')")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:2] == ["None None []", "no gap_loss"]


def test_in_pytest_the_kernels_are_regap_fast_kernels():
    import regap_fast.kernels.gap_loss as gap_loss

    assert Path(gap_loss.__file__).resolve().parent == (ROOT / "kernels").resolve()
    assert "kernels" not in sys.modules or not Path(sys.modules["kernels"].__file__ or "").resolve().is_relative_to(
        ROOT / "kernels")


@pytest.mark.slow
def test_a_transformers_model_builds_from_the_root():
    pytest.importorskip("transformers")
    run = python_in_root(
        "from transformers import LlavaConfig, LlavaForConditionalGeneration, LlamaConfig, CLIPVisionConfig\n"
        "text = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,"
        " num_attention_heads=2, num_key_value_heads=2)\n"
        "vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,"
        " image_size=16, patch_size=8)\n"
        "m = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=63))\n"
        "print(type(m).__name__)")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "LlavaForConditionalGeneration"


def test_the_extension_imports_without_torch_imported_first():
    import importlib.util

    if importlib.util.find_spec("regap_fast._C") is None:
        pytest.skip("regap_fast._C is not built (a CPU-only install)")
    run = python_in_root("import sys; import regap_fast._C as C; print(type(C.cuda_archs()).__name__, "
                         "'torch' in sys.modules)")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["list", "True"]
