"""The study's design constants against the pre-registered plan (docs/reproduce/PLAN.md, section 12), the
committed runs the arms come from, the task list, the scheduler's order and failure handling, and the
timing probe's arithmetic (PLAN 10)."""

import dataclasses
import json
import re
from pathlib import Path

import pytest

from regap_fast.reproduce import pipeline, schedule, selection, study
from regap_fast.reproduce.pipeline import Settings

DOCS = Path(__file__).resolve().parents[2] / "docs" / "reproduce"


@pytest.fixture(scope="module")
def plan() -> dict:
    """The machine-readable block of PLAN.md: the first ```json block of its section 12."""
    text = (DOCS / "PLAN.md").read_text()
    section = text[text.index("## 12. Machine-readable design"):]
    return json.loads(re.search(r"```json\n(.*?)\n```", section, re.S).group(1))


def test_the_plan_version_is_the_latest_change():
    """The version the reports name is the plan in force: the last dated entry of PLAN.md's "Changes to this plan"
    (v2's cut changed the evaluation, so a report saying v1 would misdescribe its own runs)."""
    changes = (DOCS / "PLAN.md").read_text().split("## Changes to this plan", 1)[1]
    versions = re.findall(r"Plan (v\d+), (\d{4}-\d{2}-\d{2})", changes)
    assert versions and study.PLAN_VERSION == ", ".join(versions[-1])


def test_design_constants_equal_the_plan(plan):
    assert plan["plan"] == study.DESIGN_VERSION  # the machine-readable block is v1's; v2 changed only eval_stride
    default = Settings()
    assert {k: getattr(default, k) for k in plan["fixed"]} == plan["fixed"]
    assert list(study.LAMBDAS) == plan["lambdas"] and study.PRIMARY_LAMBDA == plan["primary_lambda"]
    assert {str(d): list(s) for d, s in study.SEEDS.items()} == plan["seeds"]
    assert study.ARMS == plan["arms"] and list(study.ARMS) == list(plan["arms"])  # values and the plan's order
    assert set(study.ARM_FIELDS) == set(next(iter(plan["arms"].values())))
    assert pipeline.LORA == plan["lora"]
    for name, design in (("default_subset", study.DEFAULT_SUBSET), ("quick_subset", study.QUICK_SUBSET)):
        expected = {"arms": {a: study.ARMS[a] for a in plan[name]["arms"]}, "lambdas": plan[name]["lambdas"],
                    "seeds": plan[name]["seeds"]}
        assert {k: v for k, v in design.to_dict().items() if k != "name"} == expected
    assert study.PRIMARY_CONDITION == plan["primary_condition"] and study.ALPHA == plan["alpha"]
    assert (study.STUDY.primary_family(), study.STUDY.stage1_family(), study.STUDY.keep_on_family()) == (
        plan["primary_family_size"], plan["stage1_family_size"], plan["keep_on_family_size"])
    assert {k: getattr(study.INFORMATIVE, k) for k in plan["informative"]} == plan["informative"]
    sample = {k: list(v) if isinstance(v, tuple) else v for k, v in study.ANSWER_SAMPLE.items()}
    assert sample == plan["answer_sample"]
    probe = plan["timing_probe"]
    assert study.TIMING_PROBE.seeds == {probe["data_seed"]: (probe["seed"],)}
    assert list(study.TIMING_PROBE.lambdas) == probe["lambdas"] and study.TIMING_PROBE.arms == study.ARMS


def test_the_stage2_fields_the_study_adds_are_settings():
    """Every arm's fields are pipeline.Settings fields, and the defaults are the committed default's stage 2."""
    names = {f.name for f in dataclasses.fields(Settings)}
    assert set(study.ARM_FIELDS) <= names
    assert study.arm_fields(Settings()) == study.ARMS[study.BASE_ARM]


def _stage2_of(summary: dict) -> dict:
    """A committed run's stage 2 in today's fields (before the text-only mix, LoRA and the new fields
    existed, their values were: no text-only records, all LM weights, REGAP off)."""
    s = summary["settings"]
    return {**selection.NEUTRAL, "stage2_train_lm": True, "stage2_regap": False,
            **{k: s[k] for k in selection.STAGE2_FIELDS if k in s}}


def test_the_arms_are_the_committed_stage2s():
    for arm, folder in (("gentle-stage2", "gentle-stage2"), ("image-only", "previous-default-stage2"),
                        ("round1-replay-2%", "round1")):
        assert study.ARMS[arm] == _stage2_of(json.loads((DOCS / folder / "summary.json").read_text())), arm
    screening = {e["candidate"]: e["settings"] for e in
                 json.loads((DOCS / "stage2-selection" / "selection.json").read_text())["candidates"]}
    for arm in ("llava-like", study.BASE_ARM):
        assert {k: study.ARMS[arm][k] for k in selection.STAGE2_FIELDS} == screening[arm]
    base = study.ARMS[study.BASE_ARM]
    changed = {arm: {k for k in study.ARM_FIELDS if study.ARMS[arm][k] != base[k]}
               for arm in ("projector-only", "lora-r8", study.KEEP_ON_ARM)}
    assert changed == {"projector-only": {"stage2_train_lm"}, "lora-r8": {"stage2_lora_rank"},
                       study.KEEP_ON_ARM: {"stage2_regap"}}  # arm 2 with one change each


def test_task_lists():
    for design, cells, runs in ((study.STUDY, 64, 496), (study.DEFAULT_SUBSET, 16, 56), (study.QUICK_SUBSET, 2, 7),
                                (study.TIMING_PROBE, 2, 15)):
        assert (len(design.cells()), len(design.runs())) == (cells, runs), design.name
        assert not [r for r in design.runs() if r[3] == study.KEEP_ON_ARM and r[2] == 0]
        assert len(set(design.runs())) == runs and len(schedule.tasks_of(design)) == cells + runs
    per_arm = {arm: sum(r[3] == arm for r in study.STUDY.runs()) for arm in study.ARMS}
    assert per_arm == {**dict.fromkeys(study.ARMS, 64), study.KEEP_ON_ARM: 48}
    assert {d for d, *_ in study.STUDY.cells()} == {0, 1}
    assert {(d, s) for d, s, _ in study.STUDY.cells()} == {(0, s) for s in range(8)} | {(1, s) for s in range(8, 16)}


def test_check_arms_errors():
    study.check_arms(["llava-like", study.BASE_ARM, study.KEEP_ON_ARM])
    with pytest.raises(ValueError, match="unknown arm 'nope'; the arms are: llava-like"):
        study.check_arms(["nope"])
    with pytest.raises(ValueError, match="needs requests-only-replay-2% too"):
        study.check_arms([study.KEEP_ON_ARM])


# --------------------------------------------------------------------------------------------------
# the scheduler, in this process with a stand-in for the work
# --------------------------------------------------------------------------------------------------


def _runner(monkeypatch, design, fail=()):
    """A Runner over ``design`` whose tasks only record that they ran (``fail``: {task: times to fail})."""
    ran, fail = [], dict(fail)

    def fake(task, root, s, data, threads):
        ran.append(task)
        if fail.get(task, 0) > 0:
            fail[task] -= 1
            raise RuntimeError(f"boom\nsecond line of {task.label()}")
        return {"harmful": {}, "task": task}

    monkeypatch.setattr(schedule, "run_task", fake)
    base = Settings()
    todo = schedule.tasks_of(design)
    costs = {t: schedule.cost(t, schedule.task_settings(t, base, design)) for t in todo}
    runner = schedule.Runner(todo, lambda t: ("root", None, None), costs, jobs=1, threads=None, on_done=lambda *a: None)
    return runner, ran


def test_runner_runs_each_cell_once_before_its_arms_longest_first(monkeypatch):
    design = study.Design("t", study.named(["llava-like", "image-only", "lora-r8"]), (0.0, 0.5), {0: (0, 1)})
    runner, ran = _runner(monkeypatch, design)
    runner.run()
    assert len(ran) == len(set(ran)) == 4 + 12  # every task once
    assert all(t.arm is None for t in ran[:4])  # cells first: they unlock the rest
    arms = [t.arm for t in ran[4:]]
    assert arms == ["image-only"] * 4 + ["lora-r8"] * 4 + ["llava-like"] * 4  # 400 steps, 64 x 2.7, 64
    assert set(runner.rows) == set(schedule.tasks_of(design)) and not runner.missing


def test_runner_reruns_a_failed_task_once_then_reports_it_missing(monkeypatch):
    design = study.Design("t", study.named(["llava-like", study.BASE_ARM]), (0.0, 0.2), {0: (0,)})
    cell = schedule.Task(0, 0, 0.2)
    flaky, broken = schedule.Task(0, 0, 0.0, "llava-like"), schedule.Task(0, 0, 0.0, study.BASE_ARM)
    runner, ran = _runner(monkeypatch, design, fail={flaky: 1, broken: 2, cell: 2})
    runner.run()
    assert ran.count(flaky) == 2 and flaky in runner.rows  # failed once, rerun unchanged, done
    assert ran.count(broken) == 2 and broken not in runner.rows
    assert ran.count(cell) == 2 and not any(t.cell == cell for t in ran if t.arm)  # its arms never start
    missing = {m["task"]: m for m in runner.missing}
    assert missing[broken.label()]["error"] == "RuntimeError: boom" and missing[broken.label()]["attempts"] == 2
    assert missing[schedule.Task(0, 0, 0.2, "llava-like").label()]["error"].startswith("its stage 1 failed")
    assert len(runner.missing) == 2 + 2  # the broken arm, the cell, the cell's two arms


# --------------------------------------------------------------------------------------------------
# the timing probe's arithmetic (PLAN 10)
# --------------------------------------------------------------------------------------------------


def _probe_outcome(cell=20.0, arm=10.0, lm=17.5):
    arms = {a: arm * (2 if a == "image-only" else 1) for a in study.ARMS}
    finals = [{"arm": a, "seconds": s} for a, s in arms.items() for _ in range(2 - (a == study.KEEP_ON_ARM))]
    return {"cells": [{"seconds": cell}, {"seconds": cell}], "finals": finals, "lms": {"0": {"seconds": lm}}}


def test_probe_projection_by_hand():
    from regap_fast.reproduce.probe import format_projection, makespan, projection, unit_times

    outcome = _probe_outcome()
    units = unit_times(outcome)
    assert units["cell"] == 20.0 and units["arms"]["image-only"] == 20.0 and units["lm"] == 17.5
    p = projection(outcome, workers=2)
    # study: 64 cells x 20 + (6 arms x 64 + 48) runs x 10 + 64 image-only runs x 20 = 1280 + 4320 + 1280 core-s
    assert p["study"]["core_seconds"] == pytest.approx(6880.0)
    assert p["study"]["seconds"] == pytest.approx(6880.0 / 2 + 2 * 17.5 + 120)
    # default: 16 cells x 20 + (3 x 16 + 8) x 10 = 880 core-s; one LM
    assert p["default"]["seconds"] == pytest.approx(880.0 / 2 + 17.5 + 10)
    # quick: both cells at once (20 s), then 7 runs of 10 s on 2 workers: 40 s more
    assert makespan(study.QUICK_SUBSET, units, 2) == pytest.approx(60.0)
    assert p["quick"]["seconds"] == pytest.approx(60.0 + 17.5 + 10)
    assert "no cut" in p["study"]["decision"]
    slow = projection(_probe_outcome(cell=80.0, arm=40.0), workers=2)
    assert slow["study"]["seconds"] / 60 > study.CUT_ABOVE_MINUTES and "cut applies" in slow["study"]["decision"]
    assert "Projected study:" in format_projection(p)
