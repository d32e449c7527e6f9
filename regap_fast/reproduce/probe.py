"""The timing probe (PLAN 9; PLAN-v3 9.1): every arm once at a seed outside the study, and the study's
time projected from its timings by the arithmetic of PLAN section 10. Nothing else of it is reported.

    regap-fast reproduce --timing-probe --out DIR
    regap-fast reproduce --toy v2 --timing-probe --out DIR

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


def projection(outcome: dict, workers: int, toy: str = "v1") -> dict:
    """Projected seconds of the study, the default, ``--quick`` (and v2's pilot) on this machine (PLAN 10,
    PLAN-v3 9.1)."""
    units = unit_times(outcome)
    out = {"units": units, "workers": workers, "toy": toy}
    plan = _plan(toy)
    for name, design in plan["designs"].items():
        core = core_seconds(design, units)
        out[name] = {"core_seconds": core, "seconds": core / workers + len(design.seeds) * units["lm"]
                     + study.OVERHEAD_SECONDS.get(name, study.OVERHEAD_SECONDS["default"])}
    out["quick"] = {"seconds": makespan(plan["quick"], units, workers) + units["lm"]
                    + study.OVERHEAD_SECONDS["quick"]}
    minutes = out["study"]["seconds"] / 60
    out["study"]["decision"] = plan["above"] if minutes > plan["cut_above"] else plan["within"]
    return out


def _plan(toy: str) -> dict:
    """The designs a probe projects, the limits and the cut rule of the toy's plan."""
    if toy == "v2":
        from . import study2

        return {"designs": {"study": study2.STUDY, "default": study2.DEFAULT_SUBSET, "pilot": study2.PILOT},
                "quick": study2.QUICK_SUBSET, "limits": study2.LIMIT_MINUTES, "cut_above": study2.CUT_ABOVE_MINUTES,
                "above": f"above {study2.CUT_ABOVE_MINUTES:g} minutes: PLAN-v3's cuts apply in order ("
                         + "; then, if still above, ".join(study2.CUTS) + "), each in a dated plan entry before "
                         "the study runs",
                "within": f"within {study2.CUT_ABOVE_MINUTES:g} minutes: no cut (PLAN-v3 9.2); the study runs as "
                          "planned"}
    return {"designs": {"study": study.STUDY, "default": study.DEFAULT_SUBSET}, "quick": study.QUICK_SUBSET,
            "limits": study.LIMIT_MINUTES, "cut_above": study.CUT_ABOVE_MINUTES,
            "above": f"above {study.CUT_ABOVE_MINUTES:g} minutes: PLAN 10.3's one cut applies (the held-out requests "
                     "at even positions only), made in a dated Plan v2 entry before the study runs",
            "within": f"within {study.CUT_ABOVE_MINUTES:g} minutes: no cut (PLAN 10.3); the study runs as planned"}


def format_projection(p: dict) -> str:
    u = p["units"]
    lines = [f"Timing probe: seconds per task, measured with {p['workers']} worker(s) side by side:",
             f"  LM pretraining{' and gates' if p.get('toy') == 'v2' else ''} (alone, all cores): {u['lm']:.1f}",
             f"  stage-1 cell: {u['cell']:.1f}"]
    lines += [f"  stage 2 {arm}: {s:.1f}" for arm, s in u["arms"].items()]
    for name, limit in _plan(p.get("toy", "v1"))["limits"].items():
        e = p[name]
        core = f"{e['core_seconds']:.0f} core-s / {p['workers']} + LMs + overhead = " if "core_seconds" in e else ""
        lines.append(f"Projected {name}: {core}{e['seconds']:.0f} s = {e['seconds'] / 60:.1f} min "
                     f"(limit {limit:g} min)")
    lines.append(f"Decision: {p['study']['decision']}.")
    return "\n".join(lines)
