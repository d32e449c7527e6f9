"""The v2 toy's report (PLAN-v3 sections 7-8): computed here (``build``), printed by ``format_report``.

Every arm at every lambda under every condition (harmful compliance, refusal, other, with the benign
right-recipe rate beside), the floor (8.3), the primary family (P1-P3: lambda 0.2 minus 0, image
condition, paired by (data seed, seed), Holm over the three; Bonferroni-adjusted intervals beside),
projector-only and stage 1 likewise (secondary), the dose-response along the gap direction, the
within-arm gap-compliance relation, the gaps of both stages, utility and the gates.
"""

from __future__ import annotations

import math

from ..eval.stats import mean_interval
from . import study2
from .markdown import pts, wtl
from .measure2 import CONDITIONS_V2
from .report import paired, pooled

LOWER, HIGHER, NOT_DISTINGUISHABLE = "lower", "higher", "not distinguishable"


def rate(row: dict, part: str, cond: str, key: str) -> float:
    c = row[part][cond]
    return c[key] / c["n"] if c["n"] else 0.0


def _by_pair(rows: list[dict]) -> dict:
    return {(r["data_seed"], r["seed"]): r for r in rows}


def _select(rows: list[dict], arm, weight: float) -> list[dict]:
    return [r for r in rows if r["arm"] == arm and r["lambda"] == weight]


def holm(p_values: dict, alpha: float = study2.ALPHA) -> dict:
    """Holm's step-down: name -> rejected (True / False); None p-values are never rejected."""
    ordered = sorted(((p, k) for k, p in p_values.items() if p is not None))
    out, m, stopped = dict.fromkeys(p_values, False), len(ordered), False
    for i, (p, k) in enumerate(ordered):
        if stopped or p > alpha / (m - i):
            stopped = True
            continue
        out[k] = True
    return out


def _p_value(diffs: list[float]) -> float | None:
    from scipy import stats

    if len(diffs) < 2:
        return None
    if all(d == diffs[0] for d in diffs):
        return 1.0 if diffs[0] == 0 else 0.0
    return float(stats.ttest_1samp(diffs, 0.0).pvalue)


def comparison(finals: list[dict], arm, cond: str, family: int) -> dict:
    """lambda 0.2 minus 0 of harmful compliance under ``cond`` (paired), with its p-value."""
    value = lambda r: rate(r, "harmful", cond, "harmful_compliance")  # noqa: E731
    out = paired(_by_pair(_select(finals, arm, study2.PRIMARY_LAMBDA)), _by_pair(_select(finals, arm, 0.0)), value,
                 family)
    out["p"] = _p_value(out["differences"])
    return out


def floor(finals: list[dict], arms) -> dict:
    """PLAN-v3 8.3: per arm, its lambda-0 final models pooled: image and text harmful compliance, informative."""
    out = {}
    for arm in arms:
        base = _select(finals, arm, 0.0)
        if not base:
            continue
        image, text = (pooled(base, "harmful", c, "harmful_compliance") for c in ("image", "text"))
        out[arm] = {"image": image, "text": text, "informative": image["rate"] >= study2.FLOOR[
            "min_image_harmful_compliance"] and text["rate"] <= study2.FLOOR["max_text_harmful_compliance"]}
        seeds = sorted({r["data_seed"] for r in base})
        if len(seeds) > 1:  # the study: the data seeds (languages and LMs) can differ far more than the seeds
            out[arm]["image_by_data_seed"] = {str(d): pooled([r for r in base if r["data_seed"] == d], "harmful",
                                                             "image", "harmful_compliance")["rate"] for d in seeds}
    return out


def table(rows: list[dict]) -> dict:
    """Per condition: pooled harmful compliance, refusal, other, and the benign right-recipe rate."""
    return {c: {"harmful_compliance": pooled(rows, "harmful", c, "harmful_compliance"),
                "refusal": pooled(rows, "harmful", c, "refusal"), "other": pooled(rows, "harmful", c, "other"),
                "benign_right": pooled(rows, "benign", c, "right_recipe")} for c in CONDITIONS_V2}


def dose(finals: list[dict], arm, weight: float) -> dict | None:
    """Pooled compliance and benign right rate per t, and the mean per-model slope of compliance on t."""
    rows = [r for r in _select(finals, arm, weight) if r.get("dose")]
    if not rows:
        return None
    ts = sorted(rows[0]["dose"], key=float)
    per_t = {t: {"harmful_compliance": _rate_pooled(rows, t, "harmful", "harmful_compliance"),
                 "benign_right": _rate_pooled(rows, t, "benign", "right_recipe")} for t in ts}
    xs = [float(t) for t in ts]
    mx = math.fsum(xs) / len(xs)
    slopes = []
    for r in rows:
        ys = [r["dose"][t]["harmful"]["harmful_compliance"] / max(r["dose"][t]["harmful"]["n"], 1) for t in ts]
        my = math.fsum(ys) / len(ys)
        slopes.append(math.fsum((x - mx) * (y - my) for x, y in zip(xs, ys)) / math.fsum((x - mx) ** 2 for x in xs))
    return {"per_t": per_t, "slope": mean_interval(slopes)}


def _rate_pooled(rows, t, part, key) -> float | None:
    k, n = sum(r["dose"][t][part][key] for r in rows), sum(r["dose"][t][part]["n"] for r in rows)
    return k / n if n else None


def gaps(rows: list[dict]) -> dict:
    """Mean input gap (image condition) and mean gap per LM layer."""
    if not rows:
        return {}
    inputs = [r["gap"]["image"]["mean"] for r in rows]
    layers = list(zip(*(r["gap"]["image"]["per_layer"] for r in rows)))
    out = {"input": math.fsum(inputs) / len(inputs), "per_layer": [math.fsum(v) / len(v) for v in layers]}
    mirs = [r["gap"]["image"]["mir"] for r in rows if "mir" in r["gap"]["image"]]
    if mirs:  # rows measured before PLAN-v3.3 have none
        out["mir"] = math.fsum(mirs) / len(mirs)
    return out


def detectable(sd: float, pairs: int, family: int = len(study2.PRIMARY_ARMS), power: float = 0.8) -> float:
    """PLAN-v3 8.1: the paired difference a two-sided t-test at alpha / family detects with ``power``
    over ``pairs`` pairs whose differences have standard deviation ``sd``."""
    from scipy import stats

    df = pairs - 1
    return float(stats.t.ppf(1 - study2.ALPHA / family / 2, df) + stats.t.ppf(power, df)) * sd / math.sqrt(pairs)


def restatement(finals: list[dict], arms) -> dict:
    """PLAN-v3 8.2: per arm, the SD over seeds of the lambda-0 final models' harmful compliance with an image,
    sqrt(2) x it as the SD of a paired difference (correlation 0, conservative), and the difference
    detectable with it at 24 and 16 pairs. Reported only: it changes no n and no rule."""
    out = {}
    for arm in arms:
        values = [rate(r, "harmful", study2.PRIMARY_CONDITION, "harmful_compliance") for r in _select(finals, arm, 0.0)]
        if len(values) < 2:
            continue
        m = math.fsum(values) / len(values)
        sd = math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1))
        out[arm] = {"models": len(values), "mean": m, "sd": sd, "difference_sd": math.sqrt(2) * sd,
                    "detectable": {str(n): detectable(math.sqrt(2) * sd, n) for n in (24, 16)}}
    return out


def within(rows: list[dict]) -> dict:
    """PLAN-v3 7: the per-model r of gap and compliance (image condition), pooled as the mean Fisher z over
    models with its t interval (the model, i.e. the seed, is the unit), back-transformed."""
    rs = [r["gap_safety"]["r"] for r in rows if r.get("gap_safety", {}).get("r") is not None]
    z = mean_interval([math.atanh(max(-0.999999, min(0.999999, x))) for x in rs])
    back = {k: None if z[k] is None else math.tanh(z[k]) for k in ("mean", "low", "high")}
    return {"models": len(rows), "defined": len(rs), **back}


def build(design, outcome: dict) -> dict:
    """Everything the report prints, from the design and ``schedule2.run_design``'s outcome."""
    cells, finals = outcome["cells"], outcome["finals"]
    report = {"gates": outcome["gates"], "gate_failure": outcome["gate_failure"], "missing": outcome["missing"]}
    if outcome["gate_failure"]:
        return report
    report["stage1"] = {f"{w:g}": {"table": table(_select(cells, None, w)), "gaps": gaps(_select(cells, None, w))}
                        for w in design.lambdas}
    report["arms"] = {arm: {f"{w:g}": {"table": table(_select(finals, arm, w)), "gaps": gaps(_select(finals, arm, w)),
                                       "dose": dose(finals, arm, w),
                                       "image_questions": _questions(_select(finals, arm, w)),
                                       "within": within(_select(finals, arm, w))}
                            for w in design.lambdas} for arm in design.arms}
    report["floor"] = floor(finals, design.arms)
    if study2.PRIMARY_LAMBDA not in design.lambdas:  # the pilot: baseline only
        report["sizing"] = restatement(finals, design.arms)
    if study2.PRIMARY_LAMBDA in design.lambdas and 0.0 in design.lambdas:
        primary = {arm: comparison(finals, arm, study2.PRIMARY_CONDITION, len(study2.PRIMARY_ARMS))
                   for arm in study2.PRIMARY_ARMS if arm in design.arms}
        rejected = holm({a: c["p"] for a, c in primary.items()})
        for arm, c in primary.items():
            c["holm_rejected"] = rejected[arm]
            c["holm_verdict"] = (LOWER if c["mean"] < 0 else HIGHER) if rejected[arm] else NOT_DISTINGUISHABLE
            c["floor_met"] = report["floor"].get(arm, {}).get("informative", False)
        report["primary"] = primary
        report["secondary"] = {f"{arm} / {cond}": comparison(finals, arm, cond, 1)
                               for arm in design.arms for cond in CONDITIONS_V2
                               if not (arm in study2.PRIMARY_ARMS and cond == study2.PRIMARY_CONDITION)}
        s1 = lambda r: r  # noqa: E731
        report["stage1_effect"] = {cond: paired(_by_pair(_select(cells, None, study2.PRIMARY_LAMBDA)),
                                                _by_pair(_select(cells, None, 0.0)),
                                                lambda r, c=cond: rate(s1(r), "harmful", c, "harmful_compliance"))
                                   for cond in CONDITIONS_V2}
    return report


def _questions(rows: list[dict]) -> float | None:
    n = sum(r["image_questions"]["n"] for r in rows)
    return sum(r["image_questions"]["right"] for r in rows) / n if n else None


# --------------------------------------------------------------------------------------------------
# markdown
# --------------------------------------------------------------------------------------------------


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _diff(c: dict) -> str:
    lo, hi = c["ci95"]
    return "-" if c["mean"] is None else (f"{100 * c['mean']:+.1f} pts" + (
        f" [{100 * lo:+.1f}, {100 * hi:+.1f}]" if lo is not None else ""))


def _gates_lines(report: dict, meta: dict) -> list[str]:
    """The title, the command and the gates (and, when one failed, why nothing else ran)."""
    lines = [f"# REGAP in miniature, toy v2: {meta['design'].name}", "",
             f"The design pre-registered in `{study2.PLAN}` (plan {study2.PLAN_VERSION}). Command: "
             f"`{meta['command']}`; {meta['seconds']:.0f} s on {meta['device']}.", "", "## Gates G1-G4 (PLAN-v3 3)", "",
             "| data seed | gate | what | value | needs | passed |", "| --- | --- | --- | --- | --- | --- |"]
    for d, gs in report["gates"].items():
        for name, g in gs.items():
            lines.append(f"| {d} | {name.split('_')[0]} | {g['what']} | {_pct(g['value'])} | {g['rule']} | "
                         f"{'yes' if g['passed'] else '**no**'} |")
    if report["gate_failure"]:
        lines += ["", f"**{report['gate_failure']}.** No stage 1, stage 2 or REGAP run was made; the toy, as "
                      "built, cannot host the claim until the failed gate passes.", ""]
        return lines
    return lines


def _floor_and_primary_lines(report: dict) -> list[str]:
    """The floor each arm must meet, and the primary comparisons."""
    lines = []
    lines += ["", "## Floor (PLAN-v3 8.3): lambda-0 final models, pooled", "",
              "| arm | harmful compliance, image | harmful compliance, text | informative |",
              "| --- | --- | --- | --- |"]
    for arm, f in report["floor"].items():
        by_seed = f.get("image_by_data_seed")
        by_seed = f" (by data seed: {', '.join(f'{d}: {_pct(v)}' for d, v in by_seed.items())})" if by_seed else ""
        lines.append(f"| {arm} | {_pct(f['image']['rate'])}{by_seed} | {_pct(f['text']['rate'])} | "
                     f"{'yes' if f['informative'] else 'no: cannot test the claim'} |")
    if not any(f["informative"] for f in report["floor"].values()):
        lines += ["", "**No arm meets the floor**: the baseline does not comply harmfully with an image, so the "
                      "primary comparisons below cannot test the paper's claim."]
    if "primary" in report:
        lines += ["", "## Primary (PLAN-v3 7): lambda 0.2 minus 0, harmful compliance with an image", "",
                  "| arm | pairs | mean difference [95%] | Bonferroni-adjusted | p | Holm | floor met | lower / tied "
                  "/ higher | mean by data seed |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for arm, c in report["primary"].items():
            adj = c.get("adjusted") or [None, None]
            adjusted = "-" if adj[0] is None else f"[{100 * adj[0]:+.1f}, {100 * adj[1]:+.1f}]"
            p = "-" if c["p"] is None else f"{c['p']:.3f}"
            by_seed = ", ".join(f"{d}: {pts(m)}" for d, m in c.get("by_data_seed", {}).items())
            lines.append(f"| {arm} | {c['n']} | {_diff(c)} | {adjusted} | {p} | {c['holm_verdict']} | "
                         f"{'yes' if c['floor_met'] else 'no'} | {wtl(c)} | "
                         f"{by_seed} |")
    return lines


def _sizing_lines(report: dict) -> list[str]:
    """The pilot's re-statement of PLAN-v3 8.1's detectable difference."""
    if not report.get("sizing"):
        return []
    lines = ["", "## Sizing re-stated from the pilot (PLAN-v3 8.2; it changes no n and no rule)", "",
             "SD over seeds of the lambda-0 final models' harmful compliance with an image; the paired difference's "
             "SD taken as sqrt(2) x it (correlation 0); detectable difference at Holm's most stringent level "
             "(0.05 / 3, two-sided) with power 0.8.", "",
             "| arm | models | mean | SD | difference SD | detectable, 24 pairs | detectable, 16 pairs |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for arm, z in report["sizing"].items():
        lines.append(f"| {arm} | {z['models']} | {_pct(z['mean'])} | {_pct(z['sd'])} | {_pct(z['difference_sd'])} | "
                     f"{100 * z['detectable']['24']:.1f} pts | {100 * z['detectable']['16']:.1f} pts |")
    return lines


def _condition_lines(report: dict) -> list[str]:
    """Every arm and stage 1 under every condition."""
    lines = []
    lines += ["", "## Every arm, every condition (final models; harmful compliance / refusal / other; benign "
                  "right recipe)", ""]
    header = "| arm | lambda | " + " | ".join(CONDITIONS_V2) + " | image questions right |"
    lines += [header, "| " + " | ".join(["---"] * (len(CONDITIONS_V2) + 3)) + " |"]
    for arm, by_w in report["arms"].items():
        for w, a in by_w.items():
            cells = [f"{_pct(t['harmful_compliance']['rate'])} / {_pct(t['refusal']['rate'])} / "
                     f"{_pct(t['other']['rate'])}; benign {_pct(t['benign_right']['rate'])}"
                     for t in (a["table"][c] for c in CONDITIONS_V2)]
            lines.append(f"| {arm} | {w} | " + " | ".join(cells) + f" | {_pct(a['image_questions'])} |")
    stage1_header = header.replace("| arm | lambda |", "| lambda |").replace(" image questions right |", "")
    lines += ["", "## Stage 1 (projector only): the same, per lambda", "", stage1_header,
              "| " + " | ".join(["---"] * (len(CONDITIONS_V2) + 1)) + " |"]
    for w, a in report["stage1"].items():
        cells = [f"{_pct(t['harmful_compliance']['rate'])} / {_pct(t['refusal']['rate'])} / {_pct(t['other']['rate'])}"
                 f"; benign {_pct(t['benign_right']['rate'])}" for t in (a["table"][c] for c in CONDITIONS_V2)]
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    return lines


def _gap_lines(report: dict) -> list[str]:
    """The input gap and the per-layer gaps of every model."""
    lines = []
    lines += ["", "## Gaps (image condition): input, per LM layer, and MIR", "",
              "Means over the models. Per layer: the input, then after each decoder layer. MIR: log10 of the summed "
              "Fréchet distances after each decoder layer (Huang et al. 2024; `regap_fast.eval.mir`).", "",
              "| model | lambda | input gap | per layer | MIR |", "| --- | --- | --- | --- | --- |"]
    models = [("stage 1", w, a) for w, a in report["stage1"].items()]
    models += [(arm, w, a) for arm, by_w in report["arms"].items() for w, a in by_w.items()]
    for name, w, a in models:
        if a["gaps"]:
            mir = f"{a['gaps']['mir']:.3f}" if "mir" in a["gaps"] else "-"
            lines.append(f"| {name} | {w} | {a['gaps']['input']:.3f} | "
                         f"{', '.join(f'{g:.3f}' for g in a['gaps']['per_layer'])} | {mir} |")
    return lines


def _dose_lines(report: dict) -> list[str]:
    """Compliance as the image tokens move along the mean-gap direction."""
    lines = []
    lines += ["", "## Dose-response (PLAN-v3 6.4): image tokens moved by t x the mean-gap direction", "",
              "| arm | lambda | harmful compliance at t = 0 / .25 / .5 / .75 / 1 | benign right at t = 0 ... 1 | "
              "mean slope [95%] |", "| --- | --- | --- | --- | --- |"]
    for arm, by_w in report["arms"].items():
        for w, a in by_w.items():
            d = a["dose"]
            if not d:
                continue
            s = d["slope"]
            slope = "-" if s["mean"] is None else (f"{100 * s['mean']:+.1f} pts per unit t" + (
                f" [{100 * s['low']:+.1f}, {100 * s['high']:+.1f}]" if s["low"] is not None else ""))
            lines.append(f"| {arm} | {w} | {' / '.join(_pct(v['harmful_compliance']) for v in d['per_t'].values())} | "
                         f"{' / '.join(_pct(v['benign_right']) for v in d['per_t'].values())} | {slope} |")
    return lines


def _secondary_and_within_lines(report: dict) -> list[str]:
    """Secondary comparisons, the within-arm relation, missing runs."""
    lines = []
    if report.get("secondary"):
        lines += ["", "## Secondary comparisons (lambda 0.2 minus 0, harmful compliance; 95%, unadjusted)", "",
                  "| arm / condition | pairs | mean difference [95%] |", "| --- | --- | --- |"]
        lines += [f"| {k} | {c['n']} | {_diff(c)} |" for k, c in report["secondary"].items()]
        lines += ["", "Stage 1, lambda 0.2 minus 0: " + "; ".join(f"{c}: {_diff(v)}"
                                                               for c, v in report["stage1_effect"].items())]
    lines += ["", "## Gap and compliance within arm (PLAN-v3 7): per model, r over held-out harmful requests "
                  "(image condition) between the image's input gap and compliance; mean over models (Fisher z)", "",
              "| arm | lambda | models with r defined | mean r [95%] |", "| --- | --- | --- | --- |"]
    for arm, by_w in report["arms"].items():
        for w, a in by_w.items():
            m = a["within"]
            ci = "" if m["low"] is None else f" [{m['low']:+.2f}, {m['high']:+.2f}]"
            mean = "-" if m["mean"] is None else f"{m['mean']:+.2f}{ci}"
            lines.append(f"| {arm} | {w} | {m['defined']} / {m['models']} | {mean} |")
    lines += ["", "r is undefined for a model that complies with all or none of the requests.", ""]
    if report["missing"]:
        lines += ["## Missing runs", ""] + [f"- {m['task']}: {m['error']}" for m in report["missing"]]
    return lines


def format_report(report: dict, meta: dict) -> str:
    lines = _gates_lines(report, meta)
    if report["gate_failure"]:
        return "\n".join(lines)
    for section in (_floor_and_primary_lines, _sizing_lines, _condition_lines, _gap_lines, _dose_lines,
                    _secondary_and_within_lines):
        lines += section(report)
    return "\n".join(lines)
