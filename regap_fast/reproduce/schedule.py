"""Running a design: a task per cell and one per stage-2 run, in processes, as they become ready.

A **cell task** (data seed, seed, lambda) makes the cell's stage-1 model from the data seed's
pretrained LM and measures it; an **arm task** trains one arm's stage 2 from that model, measures
the final model and deletes it (its answers, measurements and training records stay). Arm tasks are
ready once their cell is done. Cells go first (they unlock the rest), then the longest task ready
(long tasks early keep the wait for the last one short). Each task writes its ``row.json`` last: a
task with one is done, so a command started again on the same folder goes on where it stopped
(every task is deterministic). A task that fails is run once more, unchanged; a second failure is
reported as missing with its error, and so are the arm tasks of a cell that failed (PLAN 8.8).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from . import pipeline, study
from .measure import measure_model
from .process import quiet, workers

STAGE1_KEYS = ("initial_gap", "final_gap", "initial_lm_loss", "final_lm_loss", "train_seconds")
STAGE2_KEYS = ("initial_lm_loss", "final_lm_loss", "train_seconds", "trainable_parameters")
ROW = "row.json"
ATTEMPTS = 2  # a failed task is run once more, unchanged


@dataclass(frozen=True)
class Task:
    data_seed: int
    seed: int
    weight: float
    arm: str | None = None  # None: the cell's stage 1

    @property
    def cell(self) -> "Task":
        return Task(self.data_seed, self.seed, self.weight)

    def folder(self, root: Path) -> Path:
        cell = pipeline.cell_dir(root, self.data_seed, self.seed, self.weight)
        return cell if self.arm is None else pipeline.arm_dir(cell, self.arm)

    def label(self) -> str:
        return (f"data seed {self.data_seed}, seed {self.seed}, lambda {self.weight:g}: "
                + (f"stage 2 {self.arm}" if self.arm else "stage 1"))


def tasks_of(design: study.Design) -> list[Task]:
    return [Task(d, s, w) for d, s, w in design.cells()] + [Task(d, s, w, a) for d, s, w, a in design.runs()]


def task_settings(task: Task, base: pipeline.Settings, design: study.Design) -> pipeline.Settings:
    return base if task.arm is None else study.arm_settings(base, design.arms[task.arm])


def recorded_settings(task: Task, s: pipeline.Settings) -> dict:
    """What a task's row records of its settings (a cell: everything but the stage-2 fields)."""
    return {k: v for k, v in s.to_dict().items() if task.arm is not None or k not in study.ARM_FIELDS}


def cost(task: Task, s: pipeline.Settings) -> float:
    """The order tasks are started in: cells first, then by expected length (PLAN 10.1's cost factors)."""
    if task.arm is None:
        return float("inf")
    return s.stage2_steps * (2.7 if s.stage2_lora_rank else 1.1 if s.stage2_regap else 1.0)


# --------------------------------------------------------------------------------------------------
# one task, in a worker process (or this one)
# --------------------------------------------------------------------------------------------------


def _drop_model(stage2: Path) -> None:
    """The final model and its checkpoint, once measured: not needed again. Its training config stays."""
    configs = sorted((stage2 / "checkpoints").glob("*/config.json"))
    if configs:
        shutil.copyfile(configs[-1], stage2 / "config.json")
    for sub in ("model", "checkpoints", "initial_model"):
        shutil.rmtree(stage2 / sub, ignore_errors=True)


def _cell(task: Task, root: Path, s: pipeline.Settings, data: pipeline.Data) -> dict:
    cell = task.folder(root)
    for sub in ("init", "stage1", "eval"):  # what a failed attempt left; the arms' folders are theirs
        shutil.rmtree(cell / sub, ignore_errors=True)
    init = pipeline.vlm_init(cell / "init", pipeline.lm_dir(root, task.data_seed) / "model", s, task.seed)
    trained = pipeline.stage1(cell / "stage1", init, s, data, task.seed, task.weight)
    measured = measure_model(cell / "stage1" / "model", cell / "eval", s, data, task.seed)
    return {"train": {k: trained.get(k) for k in STAGE1_KEYS}, **measured}


def _arm(task: Task, root: Path, s: pipeline.Settings, data: pipeline.Data) -> dict:
    run = task.folder(root)
    shutil.rmtree(run, ignore_errors=True)
    stage1_model = task.cell.folder(root) / "stage1" / "model"
    trained = pipeline.stage2(run / "stage2", stage1_model, s, data, task.seed, task.weight)
    measured = measure_model(run / "stage2" / "model", run / "eval", s, data, task.seed)
    _drop_model(run / "stage2")
    return {"train": {k: trained.get(k) for k in STAGE2_KEYS}, **measured}


def run_task(task: Task, root: str, s: pipeline.Settings, data: pipeline.Data, threads: int | None) -> dict:
    """One task; returns its row (also written to its folder's row.json, last)."""
    quiet(threads)
    t0 = time.perf_counter()
    root = Path(root)
    body = (_cell if task.arm is None else _arm)(task, root, s, data)
    row = {"stage": "stage1" if task.arm is None else "final", "arm": task.arm, "data_seed": task.data_seed,
           "seed": task.seed, "lambda": task.weight, **body, "dir": str(task.folder(root)),
           "settings": recorded_settings(task, s), "seconds": time.perf_counter() - t0}
    tmp = task.folder(root) / (ROW + ".tmp")
    tmp.write_text(json.dumps(row, indent=1) + "\n")
    tmp.replace(task.folder(root) / ROW)
    return row


def finished_row(task: Task, root: Path, s: pipeline.Settings) -> dict | None:
    """The row of a task done before (a command started again on the same folder), or None."""
    return read_finished_row(task.folder(root) / ROW, recorded_settings(task, s))


def read_finished_row(path: Path, settings: dict) -> dict | None:
    """The row at ``path`` when its run was made with ``settings``, None when there is none; a row of other
    settings is an error (a folder is never mixed)."""
    if not path.is_file():
        return None
    row = json.loads(path.read_text())
    if row.get("settings") != settings:
        raise ValueError(f"{path.parent} holds a run made with other settings; use another --out, or --fresh "
                         "to start its runs afresh")
    return row


# --------------------------------------------------------------------------------------------------
# every task of a design: as they become ready, at most ``jobs`` at a time
# --------------------------------------------------------------------------------------------------


class Runner:
    """The tasks of a design over a pool of ``jobs`` worker processes (``process.workers``; started at
    once, so that they warm up while the caller pretrains the LMs), or in this process (``jobs`` 1).

    ``args(task)`` gives ``fn``'s arguments after the task (``fn``: ``run_task``, or the v2 toy's);
    ``on_done(task, row)`` is told of each finished task (the progress bar). ``rows`` and ``missing`` hold
    the outcome. ``close()`` ends the pool."""

    def __init__(self, todo: list[Task], args, costs: dict, jobs: int, threads: int | None, on_done, fn=None):
        self.pending, self.args, self.costs, self.on_done = list(todo), args, costs, on_done
        self.fn = fn or run_task
        self.jobs, self.threads = jobs, threads
        self.pool = workers(jobs, threads) if self.pending else None  # nothing to run: no processes to start
        self.rows: dict[Task, dict] = {}
        self.missing: list[dict] = []
        self.attempts: Counter = Counter()

    def ready(self) -> list[Task]:
        """Pending tasks whose cell is done, longest first (cells first)."""
        ok = [t for t in self.pending if t.arm is None or t.cell in self.rows]
        return sorted(ok, key=lambda t: -self.costs[t])

    def finished(self, task: Task, row: dict) -> None:
        self.rows[task] = row
        self.on_done(task, row)

    def failed(self, task: Task, error: BaseException) -> None:
        """Run it once more, or give it up (and, for a cell, its arm tasks with it)."""
        self.attempts[task] += 1
        if self.attempts[task] < ATTEMPTS:
            self.pending.append(task)
            return
        message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        self.missing.append({"task": task.label(), "error": message, "attempts": self.attempts[task]})
        if task.arm is None:
            for t in [t for t in self.pending if t.cell == task]:
                self.pending.remove(t)
                self.missing.append({"task": t.label(), "error": f"its stage 1 failed ({message})", "attempts": 0})

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None

    def run(self) -> None:
        """Every pending task."""
        if self.pool is None:
            while self.ready():
                task = self.ready()[0]
                self.pending.remove(task)
                try:
                    self.finished(task, self.fn(task, *self.args(task), self.threads))
                except Exception as exc:  # noqa: BLE001 - reported as the task's failure (PLAN 8.8)
                    self.failed(task, exc)
            return
        self._run_pool()

    def _run_pool(self) -> None:
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        running = {}
        while self.pending or running:
            for task in self.ready()[:max(0, self.jobs - len(running))]:
                self.pending.remove(task)
                running[self.pool.submit(self.fn, task, *self.args(task), self.threads)] = task
            if not running:  # what is pending waits for a cell that will not come
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            broken = False
            for future in done:
                task = running.pop(future)
                try:
                    self.finished(task, future.result())
                except BrokenProcessPool as exc:  # a worker died: every task in flight counts one attempt
                    broken = True
                    self.failed(task, exc)
                except Exception as exc:  # noqa: BLE001 - reported as the task's failure (PLAN 8.8)
                    self.failed(task, exc)
            if broken:
                for future, task in running.items():
                    self.failed(task, BrokenProcessPool("a worker process died"))
                running.clear()
                self.close()
                self.pool = workers(self.jobs, self.threads)


# --------------------------------------------------------------------------------------------------
# a design, from the data to the last row
# --------------------------------------------------------------------------------------------------


def prepare(out: Path, design: study.Design, base: pipeline.Settings) -> dict:
    """Each data seed's data and each arm's stage-2 mix, written before any task runs (the workers only
    read them). Returns {(data seed, arm or None): Data}."""
    datas = {}
    for d in design.seeds:
        data = datas[(d, None)] = pipeline.prepare_data(out / f"data{d}", base, d)
        mixes = {}
        for arm, fields in design.arms.items():
            s = study.arm_settings(base, fields)
            name = pipeline.stage2_data_name(s)
            if name not in mixes:
                mixes[name] = pipeline.write_stage2_data(data.root, s, d)
            datas[(d, arm)] = dataclasses.replace(data, stage2=mixes[name])
    return datas


def pretrained_lm(root: Path, s: pipeline.Settings, data: pipeline.Data, data_seed: int) -> dict:
    """The data seed's pretrained LM (trained here, all cores, unless a finished one is on disk)."""
    folder = pipeline.lm_dir(root, data_seed)
    record = folder / "lm.json"
    settings = recorded_settings(Task(data_seed, 0, 0.0), s)
    if record.is_file() and (folder / "model" / "config.json").is_file():
        info = json.loads(record.read_text())
        if info["settings"] != settings:
            raise ValueError(f"{folder} holds an LM pretrained with other settings; use another --out, or --fresh "
                             "to start its runs afresh")
        return info
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    trained = pipeline.pretrain_lm(folder, s, data, data_seed)
    info = {"final_lm_loss": trained["final_lm_loss"], "seconds": time.perf_counter() - t0, "settings": settings}
    record.write_text(json.dumps(info, indent=1) + "\n")
    return info


def run_design(out: Path, design: study.Design, base: pipeline.Settings, jobs: int, threads: int | None,
               bar) -> dict:
    """Every task of ``design`` under ``out/runs`` (those done before are reused); ``bar``: a tqdm bar over
    the tasks. Returns the rows of the stage-1 models (``cells``) and final models (``finals``), in the
    design's order, the ``missing`` tasks, each data seed's LM (``lms``) and how many tasks were reused."""
    root = out / "runs"
    bar.set_postfix_str("writing the toy language, images and stage-2 mixes")
    datas = prepare(out, design, base)
    todo = tasks_of(design)
    settings = {t: task_settings(t, base, design) for t in todo}
    done = {t: row for t in todo if (row := finished_row(t, root, settings[t])) is not None}

    def on_done(task, row):
        image = row["harmful"].get("image", {})
        rate = f"{image['harmful_compliance'] / image['n']:.2f}" if image.get("n") else "-"
        bar.set_postfix_str(f"{task.label()}: harmful compliance with an image {rate}")
        bar.update(1)

    runner = Runner([t for t in todo if t not in done], lambda t: (str(root), settings[t], datas[(t.data_seed, t.arm)]),
                    {t: cost(t, settings[t]) for t in todo}, jobs, threads, on_done)
    runner.rows.update(done)
    if done:
        bar.set_postfix_str(f"{len(done)} reused from an earlier start")
        bar.update(len(done))
    try:
        bar.set_postfix_str(f"pretraining the LM ({base.lm_steps} steps, text only)")
        lms = {d: pretrained_lm(root, base, datas[(d, None)], d) for d in design.seeds}
        runner.run()
    finally:
        runner.close()
    rows = [runner.rows[t] for t in todo if t in runner.rows]
    return {"cells": [r for r in rows if r["stage"] == "stage1"], "finals": [r for r in rows if r["stage"] == "final"],
            "missing": runner.missing, "lms": {str(d): lm for d, lm in lms.items()}, "reused": len(done)}
