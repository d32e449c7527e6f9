"""Measuring what REGAP is for: the modality gap of a model, and its unsafe-response rate.

    from regap_fast.eval import measure_gap, load_pairs, evaluate, load_prompts, RefusalJudge, compare

    gap = measure_gap(vlm, load_pairs("pairs.json"), batch_size=16)          # regap-fast gap
    report = evaluate(vlm, load_prompts("harmful_behaviors.csv"), ["none", "white", "noise"],
                      RefusalJudge(), out_dir="runs/eval")                   # regap-fast safety-eval
    table = compare(["runs/lambda0", "runs/lambda1"])                        # regap-fast compare

transformers, matplotlib and scipy are imported only when a function needs them.
"""

from .compare import compare, write_compare
from .conditions import available_conditions, condition_input, parse_conditions
from .gap import Pair, load_pairs, measure_gap, write_gap
from .mir import MIRAccumulator, modality_integration_rate
from .judges import (GCG_TEST_PREFIXES, REFUSAL_PHRASES, BeaverDamJudge, GuardModelJudge, RefusalJudge, Verdict,
                     parse_guard_output)
from .prompts import BenchmarkImage, Prompt, load_csv, load_figstep, load_jsonl, load_mmsafetybench, load_prompts
from .safety import build_report, evaluate, write_report
from .stats import correlation, paired_difference_interval, wilson_interval

__all__ = [
    "GCG_TEST_PREFIXES", "REFUSAL_PHRASES", "BeaverDamJudge", "BenchmarkImage", "GuardModelJudge", "MIRAccumulator",
    "Pair", "Prompt", "RefusalJudge",
    "Verdict", "available_conditions", "build_report", "compare", "condition_input", "correlation", "evaluate",
    "load_csv", "load_figstep", "load_jsonl", "load_mmsafetybench", "load_pairs", "load_prompts", "measure_gap",
    "modality_integration_rate",
    "paired_difference_interval", "parse_conditions", "parse_guard_output", "wilson_interval", "write_compare",
    "write_gap", "write_report",
]
