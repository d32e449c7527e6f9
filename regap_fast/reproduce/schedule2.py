"""Running a v2-toy design (PLAN-v3): per data seed the data, the base and aligned LMs and their gates,
then (only if every gate passed) v1's tasks, a cell per stage-1 model and one per stage-2 run, through
``schedule.Runner`` with this module's ``run_task`` (``measure2`` measures every model).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

from . import gates, pipeline, pipeline2, study
from .measure2 import measure_model
from .process import quiet
from .schedule import (ROW, STAGE1_KEYS, STAGE2_KEYS, Runner, Task, _drop_model, cost, read_finished_row,
                       tasks_of)


def task_settings(task: Task, base: pipeline2.SettingsV2, design: study.Design) -> pipeline2.SettingsV2:
    return base if task.arm is None else dataclasses.replace(base, **design.arms[task.arm])


def recorded_settings(task: Task, s: pipeline2.SettingsV2) -> dict:
    from .study2 import ARM_FIELDS

    return {k: v for k, v in s.to_dict().items() if task.arm is not None or k not in ARM_FIELDS}


def run_task(task: Task, root: str, s: pipeline2.SettingsV2, data: pipeline2.DataV2, threads: int | None) -> dict:
    """One task (a stage 1 and its measurement, or a stage 2 and its); its row, also in its row.json."""
    quiet(threads)
    t0 = time.perf_counter()
    root = Path(root)
    folder = task.folder(root)
    if task.arm is None:
        for sub in ("init", "stage1", "eval"):
            shutil.rmtree(folder / sub, ignore_errors=True)
        init = pipeline.vlm_init(folder / "init", pipeline.lm_dir(root, task.data_seed) / "aligned" / "model", s,
                                 task.seed)
        trained = pipeline.stage1(folder / "stage1", init, s, data, task.seed, task.weight)
        measured = measure_model(folder / "stage1" / "model", folder / "eval", s, data, task.seed, dose=False)
        train = {k: trained.get(k) for k in STAGE1_KEYS}
    else:
        shutil.rmtree(folder, ignore_errors=True)
        trained = pipeline.stage2(folder / "stage2", task.cell.folder(root) / "stage1" / "model", s, data, task.seed,
                                  task.weight)
        measured = measure_model(folder / "stage2" / "model", folder / "eval", s, data, task.seed, dose=True)
        _drop_model(folder / "stage2")
        train = {k: trained.get(k) for k in STAGE2_KEYS}
    row = {"stage": "stage1" if task.arm is None else "final", "arm": task.arm, "data_seed": task.data_seed,
           "seed": task.seed, "lambda": task.weight, "train": train, **measured, "dir": str(folder),
           "settings": recorded_settings(task, s), "seconds": time.perf_counter() - t0}
    tmp = folder / (ROW + ".tmp")
    tmp.write_text(json.dumps(row, indent=1) + "\n")
    tmp.replace(folder / ROW)
    return row


def finished_row(task: Task, root: Path, s: pipeline2.SettingsV2) -> dict | None:
    return read_finished_row(task.folder(root) / ROW, recorded_settings(task, s))


def lm_and_gates(root: Path, s: pipeline2.SettingsV2, data: pipeline2.DataV2, data_seed: int) -> dict:
    """The data seed's base and aligned LMs and their gates (reused when done before with these settings)."""
    folder = pipeline.lm_dir(root, data_seed)
    record = folder / "lm.json"
    settings = recorded_settings(Task(data_seed, 0, 0.0), s)
    if record.is_file():
        info = json.loads(record.read_text())
        if info["settings"] != settings:
            raise ValueError(f"{folder} holds LMs trained with other settings; use another --out, or --fresh")
        return info
    shutil.rmtree(folder, ignore_errors=True)
    info = {**pipeline2.lm_gates(folder, s, data, data_seed), "settings": settings}
    record.write_text(json.dumps(info, indent=1) + "\n")
    return info


def run_design(out: Path, design: study.Design, base: pipeline2.SettingsV2, jobs: int, threads: int | None,
               bar, say=print) -> dict:
    """The design's LMs and gates, then (every gate passed) its tasks under ``out/runs``. Returns ``cells``,
    ``finals``, ``missing``, ``lms``, ``gates`` (per data seed), ``gate_failure`` (the message, or None)
    and ``reused``."""
    root = out / "runs"
    datas = {}
    for d in design.seeds:
        say(f"regap-fast reproduce: data seed {d}: writing the v2 toy language, images and stage-2 mixes")
        data = pipeline2.prepare_data(out / f"data{d}", base, d)
        for arm, fields in design.arms.items():
            path = pipeline2.write_stage2_data(data.root, dataclasses.replace(base, **fields), d)
            datas[(d, arm)] = dataclasses.replace(data, stage2=path)
        datas[(d, None)] = data
    todo = tasks_of(design)
    settings = {t: task_settings(t, base, design) for t in todo}
    done = {t: row for t in todo if (row := finished_row(t, root, settings[t])) is not None}

    def on_done(task, row):
        image = row["harmful"]["image"]
        bar.set_postfix_str(f"{task.label()}: harmful compliance with an image "
                            f"{image['harmful_compliance'] / max(image['n'], 1):.2f}")
        bar.update(1)

    # the worker processes start now: they import and warm up while this one trains the LMs
    runner = Runner([t for t in todo if t not in done], lambda t: (str(root), settings[t], datas[(t.data_seed, t.arm)]),
                    {t: cost(t, settings[t]) for t in todo}, jobs, threads, on_done, fn=run_task)
    runner.rows.update(done)
    lms, failure = {}, None
    try:
        for d in design.seeds:
            say(f"regap-fast reproduce: data seed {d}: the base LM ({base.lm_steps} steps), its alignment "
                f"({base.align_steps} steps) and gates G1-G4")
            lms[d] = lm_and_gates(root, base, datas[(d, None)], d)
            try:
                gates.check(lms[d]["gates"], f"for data seed {d}")
            except gates.GateFailed as exc:
                failure = str(exc)
                break
        outcome = {"lms": {str(d): lm for d, lm in lms.items()},
                   "gates": {str(d): lm["gates"] for d, lm in lms.items()},
                   "gate_failure": failure, "cells": [], "finals": [], "missing": [], "reused": 0}
        if failure:
            return outcome
        bar.reset(total=len(todo))  # the ETA counts from here, not from the LMs' training
        if done:
            bar.update(len(done))
        runner.run()
    finally:
        runner.close()
    rows = [runner.rows[t] for t in todo if t in runner.rows]
    return {**outcome, "cells": [r for r in rows if r["stage"] == "stage1"],
            "finals": [r for r in rows if r["stage"] == "final"], "missing": runner.missing, "reused": len(done)}
