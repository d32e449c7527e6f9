"""The timing probe (PLAN 9): every arm once at a seed outside the study, and the study's time projected
from its timings by the arithmetic of PLAN section 10. Nothing else of it is reported.

    regap-fast reproduce --timing-probe --out DIR

A task's time is its wall time in its worker, measured while the other workers run theirs (as in
the study). Projection: the design's tasks x their measured times, in core-seconds, over the
parallel workers, plus each data seed's LM pretraining and the fixed overhead the plan allows
(``study.OVERHEAD_SECONDS``); ``--quick``, whose few tasks cannot keep the workers busy, by its
schedule's length instead (the stage-1 cells side by side, then the stage 2s, longest first).
"""

from __future__ import annotations

import heapq
import math

from . import study


def unit_times(outcome: dict) -> dict:
    """Mean seconds of a cell task, of each arm's stage-2 task, and of an LM's pretraining."""
    def mean(xs):
        xs = list(xs)
        return math.fsum(xs) / len(xs) if xs else None
    arms = {arm: mean(r["seconds"] for r in outcome["finals"] if r["arm"] == arm)
            for arm in dict.fromkeys(r["arm"] for r in outcome["finals"])}
    return {"cell": mean(r["seconds"] for r in outcome["cells"]), "arms": arms,
            "lm": mean(lm["seconds"] for lm in outcome["lms"].values())}


def core_seconds(design: study.Design, units: dict) -> float:
    return len(design.cells()) * units["cell"] + math.fsum(units["arms"][arm] for *_, arm in design.runs())


def makespan(design: study.Design, units: dict, workers: int) -> float:
    """The length of the design's schedule on ``workers``: cells first, then stage 2s longest first, each
    on the first free worker once its cell is done."""
    free = [0.0] * workers
    done = {}
    for d, s, w in design.cells():
        start = heapq.heappop(free)
        done[(d, s, w)] = start + units["cell"]
        heapq.heappush(free, done[(d, s, w)])
    for d, s, w, arm in sorted(design.runs(), key=lambda r: -units["arms"][r[3]]):
        start = max(heapq.heappop(free), done[(d, s, w)])
        heapq.heappush(free, start + units["arms"][arm])
    return max(free)


def projection(outcome: dict, workers: int) -> dict:
    """Projected seconds of the study, the default and ``--quick`` on this machine (PLAN 10)."""
    units = unit_times(outcome)
    out = {"units": units, "workers": workers}
    for name, design in (("study", study.STUDY), ("default", study.DEFAULT_SUBSET)):
        core = core_seconds(design, units)
        out[name] = {"core_seconds": core, "seconds": core / workers + len(design.seeds) * units["lm"]
                     + study.OVERHEAD_SECONDS[name]}
    out["quick"] = {"seconds": makespan(study.QUICK_SUBSET, units, workers) + units["lm"]
                    + study.OVERHEAD_SECONDS["quick"]}
    minutes = out["study"]["seconds"] / 60
    out["study"]["decision"] = (
        f"above {study.CUT_ABOVE_MINUTES:g} minutes: PLAN 10.3's one cut applies (the held-out requests at even "
        "positions only), made in a dated Plan v2 entry before the study runs"
        if minutes > study.CUT_ABOVE_MINUTES else
        f"within {study.CUT_ABOVE_MINUTES:g} minutes: no cut (PLAN 10.3); the study runs as planned")
    return out


def format_projection(p: dict) -> str:
    u = p["units"]
    lines = [f"Timing probe: seconds per task, measured with {p['workers']} worker(s) side by side:",
             f"  LM pretraining (alone, all cores): {u['lm']:.1f}", f"  stage-1 cell: {u['cell']:.1f}"]
    lines += [f"  stage 2 {arm}: {s:.1f}" for arm, s in u["arms"].items()]
    for name, limit in study.LIMIT_MINUTES.items():
        e = p[name]
        core = f"{e['core_seconds']:.0f} core-s / {p['workers']} + LMs + overhead = " if "core_seconds" in e else ""
        lines.append(f"Projected {name}: {core}{e['seconds']:.0f} s = {e['seconds'] / 60:.1f} min "
                     f"(limit {limit:g} min)")
    lines.append(f"Decision: {p['study']['decision']}.")
    return "\n".join(lines)
