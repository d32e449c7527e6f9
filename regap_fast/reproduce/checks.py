"""The implementation checks of PLAN 8.8, made by code and stated in the report.

1. ``committed_run``: with ``RefusalJudge``, the base arm's runs of the committed issue-15 default run
   (data seed 0, seeds 0-7, lambda 0 and 0.2) must give its unsafe counts exactly, per condition,
   after stage 1 and after stage 2.
2. ``same_as``: every run of this output must give the same numbers as the same run (data seed,
   seed, lambda, arm) of another output (the study's), e.g. the default and ``--quick`` subsets'.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import study
from .pipeline import CONDITION_NAMES, Settings
from .report import STAGE1, Results

# the committed issue-15 default run (moved byte-identical from docs/reproduce/ by the study's results commit)
COMMITTED_RUN = Path(__file__).resolve().parents[2] / "docs" / "reproduce" / "issue15-default" / "summary.json"
MEASURED = ("gap", "harmful", "benign")  # what two runs of the same task must agree on (and train but its seconds)


def committed_reference() -> Path | None:
    return COMMITTED_RUN if COMMITTED_RUN.is_file() else None


def _settings_differ(committed: dict, base: Settings) -> list[str]:
    ours = base.to_dict()
    differ = [k for k, v in committed.items() if k in ours and ours[k] != v]
    # the study's two new stage-2 fields did not exist then: the committed run had their defaults
    # ... and evaluated every held-out request (eval_stride 1)
    return differ + [k for k in ("stage2_train_lm", "stage2_regap") if ours[k] != getattr(Settings(), k)] + \
        [k for k in ("eval_stride",) if k not in committed and ours[k] != 1]


def committed_run(res: Results, base: Settings, path: Path | None) -> dict:
    """PLAN 8.8.1 against the committed summary at ``path``."""
    if path is None:
        return {"result": "not made: the committed run's summary.json is not in this checkout "
                          f"({COMMITTED_RUN})"}
    ref = json.loads(path.read_text())
    differ = _settings_differ(ref["settings"], base)
    if study.BASE_ARM not in res.design.arms or differ:
        why = f"settings differ ({', '.join(differ)})" if differ else f"no {study.BASE_ARM} arm"
        return {"result": f"not applicable: {why}"}
    d, compared, mismatches = ref["data_seed"], 0, []
    for run in ref["runs"]:
        cell = res.row(STAGE1, d, run["seed"], run["regap_weight"])
        final = res.row(study.BASE_ARM, d, run["seed"], run["regap_weight"])
        if cell is None or final is None:
            continue
        compared += 1
        for stage, row, counts in (("after stage 1", cell, run["after_stage1"]["unsafe"]),
                                   ("after stage 2", final, run["unsafe"])):
            for c in CONDITION_NAMES:
                ours = row["harmful"][c]["refusal_judge_unsafe"]
                if ours != counts[c]:
                    mismatches.append(f"seed {run['seed']} lambda {run['regap_weight']:g} {stage} {c}: "
                                      f"{ours} vs committed {counts[c]}")
    if not compared:
        return {"result": "not applicable: none of the committed runs is in this output"}
    where = f"{compared} of the committed {len(ref['runs'])} runs ({study.BASE_ARM}, data seed {d}), RefusalJudge"
    if mismatches:
        return {"result": f"**MISMATCH** in {len(mismatches)} counts of {where}:", "detail": "; ".join(mismatches),
                "mismatches": mismatches}
    return {"result": f"equal: {where}, every unsafe count per condition after stage 1 and after stage 2 "
                      f"({compared * 2 * len(CONDITION_NAMES)} counts) as committed in {path.name} of {path.parent}."}


def _key(row: dict) -> tuple:
    return row["stage"], row["arm"], row["data_seed"], row["seed"], row["lambda"]


def _numbers(row: dict) -> dict:
    train = {k: v for k, v in row["train"].items() if k != "train_seconds"}
    return {"train": train, **{k: row[k] for k in MEASURED}}


def same_as(rows: list[dict], other: Path | None) -> dict:
    """PLAN 8.8.2: this output's runs against the same runs in ``other`` (a summary.json or its folder)."""
    if other is None:
        return {"result": "not made here (`--check-against DIR`: compare with another output, e.g. the study's)"}
    path = other / "summary.json" if other.is_dir() else other
    theirs = {_key(r): r for r in json.loads(path.read_text())["rows"]}
    shared = [r for r in rows if _key(r) in theirs]
    differ = [r for r in shared if _numbers(r) != _numbers(theirs[_key(r)])]
    if not shared:
        return {"result": f"not applicable: no run of this output is in {path}"}
    if differ:
        names = "; ".join(f"{r['stage']} {r['arm'] or ''} data seed {r['data_seed']} seed {r['seed']} lambda "
                          f"{r['lambda']:g}" for r in differ)
        return {"result": f"**MISMATCH**: {len(differ)} of {len(shared)} runs differ from {path}:", "detail": names}
    return {"result": f"equal: all {len(shared)} runs of this output ({len(rows)} in all) give the same numbers "
                      f"(gaps, every answer count of both judges, training losses) as in {path}."}
