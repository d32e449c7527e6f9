"""A pytest plugin: every model of the covered VLM classes is patched by ``apply_regap`` when it is built.

Enabled with ``-p regap_patch_plugin`` (this folder on ``sys.path``), it lets transformers' own model
tests run against patched models; ``run_transformers_suite.py`` runs each family's test file with and
without it and lists the tests that only fail patched. Not a test module: the default ``pytest`` run does
not collect it (no ``test_`` prefix) and nothing imports it.

The covered classes are the ``cls`` of every family in ``tests/integrations/vlm_families.py``. A model is
patched at the end of its ``post_init`` (the last call of every transformers model's ``__init__``), so
models made by ``__init__``, ``from_config``, ``from_pretrained`` and under ``torch.device("meta")`` all
are; a configuration apply_regap refuses by design (an encoder-decoder LM: BLIP-2 with T5) is left plain and
counted. ``--regap-weight`` sets lambda (default 0.1; 0 would skip REGAP's path entirely).

A patched model's loss with labels is the LM loss + lambda * gap by design, so an assertion about that loss
value cannot hold. ``LOSS_VALUE_ASSERTIONS`` names every test whose assertion is of that kind, with why;
in those tests (and only there) an ``AssertionError`` is reported as xfail with the reason. Any other
exception in them (a RegapError, a shape error) still fails, and no other test is excused.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# test name -> why its loss-value assertion cannot hold for a patched model (lambda > 0 adds lambda * gap).
# Empty: in transformers 5.25.0's tests of the 16 families no assertion compares a loss with labels to a
# value REGAP changes (test_causal_lm_loss_honors_shift_labels compares two patched losses, both with the gap).
LOSS_VALUE_ASSERTIONS: dict[str, str] = {}

_patched: dict[str, int] = {}  # class name -> models patched in this session
_refused: dict[str, int] = {}  # class name -> models left plain: a configuration apply_regap refuses by design


def refused_by_design(model) -> bool:
    """An encoder-decoder LM (BLIP-2 / InstructBLIP with T5): its captions are decoder labels, not tokens at the
    LLM input, so apply_regap refuses it with one RegapError; such a model is left unpatched."""
    config = model.config
    return bool(getattr(config, "is_encoder_decoder", False)) or not getattr(config, "use_decoder_only_language_model",
                                                                               True)


def covered_classes() -> list[str]:
    """The transformers classes apply_regap is tested on (one place: tests/integrations/vlm_families.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))
    try:
        from vlm_families import FAMILIES
    finally:
        sys.path.pop(0)
    return [f.cls for f in FAMILIES]


def pytest_addoption(parser):
    parser.addoption("--regap-weight", type=float, default=0.1,
                     help="lambda for the models regap_patch_plugin patches (default 0.1)")


def _install(weight: float) -> None:
    import transformers

    from regap_fast.integrations.transformers import apply_regap

    for name in covered_classes():
        cls = getattr(transformers, name)
        inner = cls.post_init  # PreTrainedModel's (or the class's own)

        def post_init(self, _inner=inner, _cls=cls):
            _inner(self)
            if type(self) is not _cls:  # a subclass's post_init reached through super()
                return
            if refused_by_design(self):
                _refused[_cls.__name__] = _refused.get(_cls.__name__, 0) + 1
                return
            apply_regap(self, regap_weight=weight)
            _patched[_cls.__name__] = _patched.get(_cls.__name__, 0) + 1

        cls.post_init = post_init


def pytest_configure(config):
    import torch

    if not torch.cuda.is_available():  # as tests/conftest.py: Triton kernels through the interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    _install(config.getoption("--regap-weight"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    reason = LOSS_VALUE_ASSERTIONS.get(item.originalname if hasattr(item, "originalname") else item.name)
    if (reason is not None and report.when == "call" and report.failed and call.excinfo is not None
            and call.excinfo.errisinstance(AssertionError)):
        report.outcome = "skipped"
        report.wasxfail = f"regap: loss value with labels: {reason}"


def pytest_terminal_summary(terminalreporter):
    total = sum(_patched.values())
    detail = ", ".join(f"{k} {v}" for k, v in sorted(_patched.items())) or "none"
    refused = ", ".join(f"{k} {v}" for k, v in sorted(_refused.items())) or "none"
    terminalreporter.write_line(f"regap_patch_plugin: patched {total} models ({detail}); left plain, an "
                                f"encoder-decoder LM apply_regap refuses by design: {refused}")
