"""The v2 toy's pre-registered design: docs/reproduce/PLAN-v3.md, as constants (a test checks them
against the plan's section 11). ``study.Design`` is shared with v1: arms, lambdas, seeds per data seed.
"""

from __future__ import annotations

from . import study

PLAN = "docs/reproduce/PLAN-v3.md"
PLAN_VERSION = "v3.3, 2026-12-07"  # the last entry of PLAN-v3.md's changes (a test ties them)
LAMBDAS = (0.0, 0.2)
PRIMARY_LAMBDA = 0.2
SEEDS = {0: tuple(range(0, 8)), 1: tuple(range(8, 16)), 2: tuple(range(16, 24))}
PRIMARY_ARMS = ("llava-like", "lora-r8", "vlguard-like")
PRIMARY_CONDITION = "image"
ALPHA = 0.05
FLOOR = {"min_image_harmful_compliance": 0.05, "max_text_harmful_compliance": 0.10}
ARM_FIELDS = ("stage2_steps", "stage2_lr", "stage2_projector_lr", "stage2_request_share", "stage2_text_share",
              "stage2_text_data", "stage2_lora_rank", "stage2_train_lm", "stage2_harmful_refusal_share")

_LLAVA = dict(stage2_steps=64, stage2_lr=3e-4, stage2_projector_lr=2e-3, stage2_request_share=0.5,
              stage2_text_share=0.06, stage2_text_data="replay", stage2_lora_rank=0, stage2_train_lm=True,
              stage2_harmful_refusal_share=0.0)
ARMS = {  # PLAN-v3 section 5
    "llava-like": _LLAVA,
    "lora-r8": {**_LLAVA, "stage2_lr": 3e-3, "stage2_lora_rank": 8},
    "projector-only": {**_LLAVA, "stage2_lr": 2e-3, "stage2_train_lm": False},
    "vlguard-like": {**_LLAVA, "stage2_harmful_refusal_share": 0.03},
}

STUDY = study.Design("study", ARMS, LAMBDAS, SEEDS)
DEFAULT_SUBSET = study.Design("default", ARMS, LAMBDAS, {0: SEEDS[0]})
QUICK_SUBSET = study.Design("quick", ARMS, LAMBDAS, {0: SEEDS[0][:1]})
PILOT = study.Design("pilot", ARMS, (0.0,), {9: (900, 901, 902, 903)})  # PLAN-v3 8.2: baseline only
TIMING_PROBE = study.Design("timing-probe", ARMS, LAMBDAS, {0: (900,)})  # PLAN-v3 9.1: timings only
DESIGNS = {d.name: d for d in (STUDY, DEFAULT_SUBSET, QUICK_SUBSET, PILOT, TIMING_PROBE)}
LIMIT_MINUTES = {"study": 90.0, "default": 10.0, "quick": 2.0, "pilot": 10.0}  # PLAN-v3 9
CUT_ABOVE_MINUTES = 80.0  # PLAN-v3 9.2-9.3: a projected study above this takes the plan's cuts, in order
CUTS = ("9.2: the held-out requests at even positions only (--eval-stride 2: 128 harmful, 32 benign)",
        "9.3: data seeds 0-1 only (16 pairs)")
