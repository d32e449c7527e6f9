"""``report.md``: the statistics of ``report.py`` as the tables of PLAN section 7, each naming its judge,
stage and interval. Nothing is computed here but the formatting."""

from __future__ import annotations

from . import study
from .measure import GAP_CONDITIONS
from .pipeline import CONDITION_NAMES, DESCRIPTIONS
from .report import JUDGE_NAMES, STAGE1, STAGE_PAIRS
from .selection import describe_stage2

ORIGINS = {  # PLAN 4.1's "where it comes from"
    "llava-like": "screening candidate closest to LLaVA-1.5 (`selection.CANDIDATES`)",
    study.BASE_ARM: "the issue-15 default, chosen by the screening's criterion (`stage2-selection/`)",
    "gentle-stage2": "committed run `gentle-stage2/`", "image-only": "committed run `previous-default-stage2/`",
    "round1-replay-2%": "committed run `round1/` (round 1's `replay-2%`)",
    "projector-only": f"new: {study.BASE_ARM} with the LM frozen",
    "lora-r8": f"new: {study.BASE_ARM} with LoRA on the LM",
    study.KEEP_ON_ARM: f"new: {study.BASE_ARM} with REGAP kept on (weight = the stage-1 lambda)",
}


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def pts(x) -> str:
    return "-" if x is None else f"{100 * x:+.1f}"


def ci(interval, scale: float = 100.0, digits: int = 1) -> str:
    lo, hi = interval
    return "-" if lo is None else f"[{scale * lo:+.{digits}f}, {scale * hi:+.{digits}f}]"


def wilson(p: dict) -> str:
    return f"{pct(p['rate'])} [{pct(p['ci95'][0])}, {pct(p['ci95'][1])}]"


def wtl(d: dict) -> str:
    return f"{d['wins']} / {d['ties']} / {d['losses']}"


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _data_seed_means(d: dict, seeds) -> list[str]:
    return [pts(d["by_data_seed"].get(str(s))) for s in seeds]


def _confidence(family: int) -> str:
    return f"{100 * (1 - study.ALPHA / family):.2f}%"


# --------------------------------------------------------------------------------------------------
# the primary table and the claim
# --------------------------------------------------------------------------------------------------


def arms_table(design: study.Design, base) -> list[str]:
    rows = [[i + 1, f"`{arm}`", describe_stage2(study.arm_settings(base, fields)), ORIGINS.get(arm, "given by flags")]
            for i, (arm, fields) in enumerate(design.arms.items())]
    return table(["#", "arm", "stage 2", "where it comes from"], rows)


def recipe_lines(tab: dict, design: study.Design, verdicts: bool) -> list[str]:
    """One table per lambda: per arm the paired difference (points), its intervals, the data seeds' means."""
    seeds = list(design.seeds)
    lines = []
    for w in [f"{x:g}" for x in design.regap_lambdas()]:
        header = ["arm", "REGAP - baseline (points)", "95% CI (unadjusted)"]
        if verdicts:
            header += [f"{_confidence(design.primary_family())} CI (adjusted, family {design.primary_family()})",
                       "verdict"]
        header += ["won / tied / lost", *(f"data seed {s}" for s in seeds)] + (["LM-dependent"] if verdicts else [])
        rows = []
        for arm, by_w in tab.items():
            d = by_w[w]
            row = [f"`{arm}`", pts(d["mean"]), ci(d["ci95"])]
            if verdicts:
                row += [ci(d["adjusted"]), f"**{d['verdict']}**" if d["verdict"] else "-"]
            row += [wtl(d), *_data_seed_means(d, seeds)] + (["yes" if d["lm_dependent"] else ""] if verdicts else [])
            rows.append(row)
        lines += ["", f"**lambda {w}** vs 0 (n = {max((by_w[w]['n'] for by_w in tab.values()), default=0)} pairs):", ""]
        lines += table(header, rows)
    return lines


def baseline_lines(base: dict) -> list[str]:
    rows = [[f"`{arm}`", wilson(b["unsafe_text"]), wilson(b["unsafe_image"]), wilson(b["benign_answered"]["text"]),
             wilson(b["benign_answered"]["image"]), "yes" if b["informative"] else "no: " + ", ".join(b["reasons"])]
            for arm, b in base.items()]
    rule = study.INFORMATIVE
    return [f"Each arm's baseline: its lambda-0 final models, pooled over seeds (Wilson 95%); the "
            f"`{study.KEEP_ON_ARM}` arm's are `{study.BASE_ARM}`'s (the same runs). Informative (PLAN 8.3): "
            f"text-only unsafe <= {100 * rule.max_text_unsafe:g}%, synthetic-image unsafe >= "
            f"{100 * rule.min_image_unsafe:g}%, benign answered >= {100 * rule.min_benign_answered:g}% text only and "
            "with a synthetic-set image.", ""] + table(
        ["arm", "unsafe, text only", "unsafe, synthetic image", "benign answered, text only",
         "benign answered, synthetic image", "informative"], rows)


def _claim_text(c: dict | None) -> str:
    return "not computed (no intervals: one seed)" if c is None else f"**{c['outcome']}** ({c['name']}): {c['rule']}"


def claim_lines(claims: dict) -> list[str]:
    primary = claims.get(f"{study.PRIMARY_LAMBDA:g}") or next(iter(claims.values()), None)
    lines = []
    if primary is not None:
        c = primary["informative"]
        head = f"**Outcome at lambda {study.PRIMARY_LAMBDA:g}, over the informative arms (the keep-on arm excluded): "
        if c is None:
            lines.append(head + "not computed (no intervals: one seed).**")
        else:
            lines += [head + f"{c['outcome']} ({c['name']}).** The rule that gives it: {c['rule']}.", "",
                      f"What the README says under this outcome (PLAN 8.4): \"{c['readme']}\"."]
    rows = [[w, _claim_text(c["informative"]), _claim_text(c["all_arms"]),
             " / ".join(str(c["counts"].get(v, 0)) for v in ("lower", "not distinguishable", "higher"))]
            for w, c in claims.items()]
    return lines + ["", "The same rule at every lambda, over the informative arms and over every arm but the keep-on "
                    "one (no filter); the last column counts the verdicts of all arms:", ""] + table(
        ["lambda", "informative arms", "all arms (no filter)", "lower / not distinguishable / higher"], rows)


# --------------------------------------------------------------------------------------------------
# stage 1, keeping REGAP on, the other conditions
# --------------------------------------------------------------------------------------------------


def stage1_lines(stage1: dict, design: study.Design) -> list[str]:
    family = design.stage1_family()
    lines = []
    for judge, by_cond in stage1.items():
        rows = []
        for cond, by_w in by_cond.items():
            for w, e in by_w.items():
                d = e.get("paired")
                rows.append([DESCRIPTIONS[cond], w, wilson(e["pooled"]), pts(d["mean"]) if d else "",
                             ci(d["ci95"]) if d else "", ci(d["adjusted"]) if d and "adjusted" in d else "",
                             f"**{d['verdict']}**" if d and d.get("verdict") else "", wtl(d) if d else ""])
        lines += ["", f"Judge: {JUDGE_NAMES[judge]}.", ""] + table(
            ["condition", "lambda", "unsafe (pooled, Wilson 95%)", "REGAP - baseline (points)", "95% CI",
             f"{_confidence(family)} CI (adjusted, family {family})", "verdict", "won / tied / lost"], rows)
    return lines


def keep_on_lines(keep: dict | None, design: study.Design) -> list[str]:
    if keep is None:
        return ["", f"Not measured: this run has no `{study.KEEP_ON_ARM}` arm."]
    family = design.keep_on_family()
    rows = []
    for cond, by_w in keep.items():
        for w, d in by_w.items():
            adjusted = "adjusted" in d
            rows.append([DESCRIPTIONS[cond], w, pts(d["mean"]), ci(d["ci95"]), ci(d["adjusted"]) if adjusted else "",
                         f"**{d['verdict']}**" if adjusted and d["verdict"] else "", wtl(d)])
    return ["", f"`{study.KEEP_ON_ARM}` minus `{study.BASE_ARM}` at the same lambda, after stage 2 (won: lower with "
            "REGAP kept on); three-way judge.", ""] + table(
        ["condition", "lambda", "difference (points)", "95% CI",
         f"{_confidence(family)} CI (adjusted, family {family})", "verdict", "won / tied / lost"], rows)


def other_conditions_lines(recipe: dict, design: study.Design) -> list[str]:
    lines = []
    for judge, by_cond in recipe.items():
        for cond, tab in by_cond.items():
            if judge == "toy" and cond == study.PRIMARY_CONDITION:
                continue  # the primary table
            lines += ["", f"#### {DESCRIPTIONS[cond]}, {JUDGE_NAMES[judge]}"]
            lines += recipe_lines(tab, design, verdicts=False)
    return lines


# --------------------------------------------------------------------------------------------------
# gaps and correlations
# --------------------------------------------------------------------------------------------------


def _spread(s: dict, digits: int = 3) -> str:
    return "-" if s["mean"] is None else f"{s['mean']:.{digits}f} ({s['min']:.{digits}f} to {s['max']:.{digits}f})"


def gap_lines(gaps: dict, level: str = "input") -> list[str]:
    """Gap means (min to max over seeds), and REGAP minus baseline, at one level of the gap."""
    rows = [[stage, w, *(_spread(by_c[c][level]) for c in GAP_CONDITIONS)]
            for stage, by_w in gaps["means"].items() for w, by_c in by_w.items() if by_c["image"][level]["n"]]
    lines = table(["models", "lambda", *(f"gap, {DESCRIPTIONS[c]}" for c in GAP_CONDITIONS)], rows)
    rows = []
    for stage, by_w in gaps["paired"].items():
        for w, by_c in by_w.items():
            cells = []
            for c in GAP_CONDITIONS:
                d = by_c[c][level]
                ratio = "-" if d["ratio"] is None else f"{d['ratio']:.2f}"
                cells.append(f"{d['mean']:+.3f} {ci(d['ci95'], 1.0, 3)}, ratio {ratio}{', smaller' * d['smaller']}"
                             if d["mean"] is not None else "-")
            rows.append([stage, w, *cells])
    return lines + ["", "REGAP minus baseline, paired (95% CI), the ratio of the means; \"smaller\": the interval "
                    "lies below 0 (PLAN 8.7):", ""] + table(
        ["models", "lambda vs 0", *(DESCRIPTIONS[c] for c in GAP_CONDITIONS)], rows)


def gap_change_lines(change: dict) -> list[str]:
    rows = [[f"`{arm}`", w, *(_spread(by_c[c]) for c in GAP_CONDITIONS)]
            for arm, by_w in change.items() for w, by_c in by_w.items()]
    return table(["arm", "lambda", *(f"final - stage-1 gap, {DESCRIPTIONS[c]}" for c in GAP_CONDITIONS)], rows)


def _corr(c: dict) -> str:
    if c.get("note"):
        return c["note"]
    return (f"r {c['pearson']['r']:+.2f} (p {c['pearson']['p']:.2g}), "
            f"rho {c['spearman']['rho']:+.2f} (p {c['spearman']['p']:.2g})")


def correlation_lines(entries: list[dict], level: str) -> list[str]:
    """One row per (stage pair, scope, raw / centred), a column per condition, at one level of the gap."""
    rows, index = [], {}
    for e in entries:
        if e["layer"] == level:
            index.setdefault((e["stages"], e["scope"], e["centred"]), {})[e["condition"]] = e
    for (stages, scope, centred), by_c in index.items():
        n = next(iter(by_c.values()))["n"]
        rows.append([stages, scope + (" (centred per data seed)" if centred else ""), n,
                     *(_corr(by_c[c]) for c in GAP_CONDITIONS)])
    return table(["stage pair", "scope", "n", *(DESCRIPTIONS[c] for c in GAP_CONDITIONS)], rows)


# --------------------------------------------------------------------------------------------------
# utility, the judge, the checks
# --------------------------------------------------------------------------------------------------


def utility_lines(util: dict) -> list[str]:
    rows = [[stage, w, DESCRIPTIONS[c], *(wilson(e[name]) for name in e)]
            for stage, by_w in util["rates"].items() for w, by_c in by_w.items() for c, e in by_c.items()
            if e["answered"]["n"]]
    lines = table(["models", "lambda", "condition", *next(iter(next(iter(util["rates"].values())).values()))["text"]],
                  rows)
    rows = []
    for stage, by_w in util["paired"].items():
        for w, by_c in by_w.items():
            cells = [f"{pts(by_c[c]['answered']['mean'])} {ci(by_c[c]['answered']['ci95'])}" for c in CONDITION_NAMES]
            rows.append([stage, w, *cells, "**yes**" if by_c["costs_utility"] else "no"])
    lines += ["", "Benign answered, REGAP minus baseline (points, paired, 95% CI); \"costs utility\" (PLAN 8.7): the "
              "synthetic-image interval lies below 0:", ""]
    lines += table(["models", "lambda vs 0", *(DESCRIPTIONS[c] for c in CONDITION_NAMES), "costs utility"], rows)
    rows = [[w, _spread(e), f"{e['paired']['mean']:+.4f} {ci(e['paired']['ci95'], 1.0, 4)}" if "paired" in e else ""]
            for w, e in util["caption_loss"].items()]
    return lines + ["", "Stage 1's held-out caption loss (mean, min to max over seeds; REGAP minus baseline, paired, "
                    "95% CI):", ""] + table(["lambda", "caption loss", "REGAP - baseline"], rows)


def judge_lines(counts: dict) -> list[str]:
    keys = ("refusal", "harmful_compliance", "harmful_requested", "other", "benign_answer", "image_talk", "empty",
            "gibberish", "refusal_later", "harmful_later")
    rows = []
    for stage, by_w in counts.items():
        for w, by_c in by_w.items():
            for c, k in by_c.items():
                theirs = k["refusal_judge_unsafe"]
                share = k["refusal_judge_unsafe_ours_other"] / theirs if theirs else None
                rows.append([stage, w, DESCRIPTIONS[c], k["n"], *(k[key] for key in keys),
                             pct(k["harmful_compliance"] / k["n"]), pct(theirs / k["n"]), pct(share)])
    return table(["models", "lambda", "condition", "answers", *keys, "unsafe (three-way)", "unsafe (RefusalJudge)",
                  "RefusalJudge's unsafe that are `other`"], rows)


def checks_lines(checks: dict) -> list[str]:
    return [f"- **{name}**: {c['result']}" + (f" {c['detail']}" if c.get("detail") else "")
            for name, c in checks.items()]


def missing_lines(report: dict) -> list[str]:
    if not report["missing"]:
        return ["", "None: every run of the design finished."]
    lines = ["", *(f"- {m['task']}: {m['error']} ({m['attempts']} attempts)" for m in report["missing"])]
    return lines + ["", "Pairs these break (left out of their cells):", "",
                    *(f"- {p}" for p in report["broken_pairs"])]


# --------------------------------------------------------------------------------------------------
# the whole report
# --------------------------------------------------------------------------------------------------


def intro_lines(meta: dict) -> list[str]:
    design: study.Design = meta["design"]
    seeds = "; ".join(f"data seed {d}: seeds {', '.join(map(str, s))}" for d, s in design.seeds.items())
    what = (f"The study pre-registered in `{study.PLAN}` (plan {study.PLAN_VERSION}), run once as it is."
            if design.name == "study" else
            f"The **{design.name}** subset of the study pre-registered in `{study.PLAN}` (plan {study.PLAN_VERSION}, "
            "section 9): the study's own report (`regap-fast reproduce --study`) is the result; this one applies its "
            f"rules with its own family size ({design.primary_family()}).")
    if sum(len(s) for s in design.seeds.values()) == 1:
        what += " One seed: no intervals over seeds, so no verdicts and no outcome."
    return [f"# REGAP in miniature: {design.name}", "", what, "",
            f"Arms: {len(design.arms)}; lambdas {', '.join(f'{w:g}' for w in design.lambdas)} (0: the baseline); "
            f"{seeds}. {meta['n_harmful']} held-out harmful and {meta['n_benign']} benign requests per model, each "
            "under text only, a blank (white) image, a Gaussian-noise image and a synthetic-set image.", "",
            f"Command: `{meta['command']}`; {meta['seconds']:.0f} s on {meta['device']}"
            + (f" ({meta['reused']} tasks reused from an earlier start)." if meta["reused"] else "."), "",
            "Unsafe = the three-way judge's harmful compliance (`ToyJudge`, PLAN 6) unless a table names "
            "`RefusalJudge`. Differences are REGAP minus the baseline of the same (data seed, seed) and arm, in "
            "percentage points (negative: REGAP lowers it), with Student-t intervals over the pairs.", "",
            "## The arms", ""] + arms_table(design, meta["base"])


def headline(report: dict, design: study.Design) -> list[str]:
    """What the command prints at the end: the primary table and the outcome (report.md has everything)."""
    lines = ["", "After stage 2, synthetic-set image, three-way judge: REGAP minus baseline."]
    lines += recipe_lines(report["recipe"]["toy"][study.PRIMARY_CONDITION], design, verdicts=True)
    return lines + [""] + claim_lines(report["claims"])


def format_report(report: dict, meta: dict) -> str:
    design: study.Design = meta["design"]
    family = design.primary_family()
    lines = intro_lines(meta)
    lines += ["", "## 1. The recipe-sensitivity table (primary, PLAN 7.1)", "",
              "After stage 2, with a synthetic-set image, three-way judge: per arm and lambda the mean over the pairs "
              "of unsafe(arm, lambda) - unsafe(arm, 0), its 95% interval (unadjusted) and the interval adjusted for "
              f"the {family} comparisons of this table (Bonferroni, {_confidence(family)}), whose verdict (PLAN 8.2) "
              "is \"lower\" if it lies below 0, \"higher\" if above. LM-dependent: the data seeds' means have opposite "
              "signs." + (f" `{study.KEEP_ON_ARM}`'s baseline is `{study.BASE_ARM}`'s lambda-0 run (the same runs)."
                          if study.KEEP_ON_ARM in design.arms else "")]
    lines += recipe_lines(report["recipe"]["toy"][study.PRIMARY_CONDITION], design, verdicts=True)
    lines += ["", "### The arms' baselines (PLAN 8.3)", ""] + baseline_lines(report["baselines"])
    lines += ["", "## 2. The final-model claim (PLAN 8.4)", ""] + claim_lines(report["claims"])
    lines += ["", "## 3. Stage 1 (PLAN 7.2.2, 8.5)", "", "The stage-1 models (before instruction tuning; the LM is "
              "still the pretrained one, so text-only answers do not depend on lambda). Verdicts for the image "
              f"conditions, adjusted for {design.stage1_family()} comparisons (lambdas x 3 conditions)."]
    lines += stage1_lines(report["stage1"], design)
    lines += ["", "## 4. Keeping REGAP on in stage 2 (PLAN 7.2.3, 8.6)"] + keep_on_lines(report["keep_on"], design)
    lines += ["", "## 5. Descriptive tables (PLAN 7.2)", "", "Everything from here on is descriptive: 95% intervals, "
              "no verdicts, p-values not corrected. Pooled correlations reuse the same stage-1 models and baselines: "
              "their p-values are descriptive only.", "", "### 5.1 The recipe table under the other conditions, and "
              "with RefusalJudge (7.2.1)"] + other_conditions_lines(report["recipe"], design)
    if report["fresh_half"] is not None:
        lines += ["", "### 5.2 The fresh half: data seed 1 alone (7.2.8)", "", "The primary table on seeds 8-15 "
                  "(no run of data seed 1 had been made before the plan); its verdicts use the same family."]
        lines += recipe_lines(report["fresh_half"], study.Design("fresh", design.arms, design.lambdas,
                                                                 {1: design.seeds[1]}), verdicts=True)
    lines += ["", "### 5.3 Gaps (7.2.4)", "", "Mean per-pair gap at the LLM input (`gap.mean`, what REGAP trains) on "
              "the held-out image-caption pairs, with each pair's own image, a blank image and a noise image; mean "
              "(min to max) over seeds. `stage 1`: the stage-1 models; an arm: its final models.", ""]
    lines += gap_lines(report["gaps"])
    lines += ["", "Each final model's gap minus its stage-1 model's (mean, min to max over seeds):", ""]
    lines += gap_change_lines(report["gaps"]["change"])
    lines += ["", "### 5.4 Gap vs unsafe rate (7.2.5)", "", "Pearson r and Spearman rho (p-values) of the input-level "
              "gap with the unsafe rate of the same condition; each row names the stages it pairs. Centred: each "
              "data seed's mean subtracted from both first. Per-layer gaps: appendix.", ""]
    lines += correlation_lines(report["correlations"], "input")
    lines += ["", "### 5.5 Utility (7.2.6)", "", "Held-out benign requests, pooled over seeds (Wilson 95%): answered "
              "(an answer template with a benign object), answered correctly (with the request's own object), and not "
              "refused by RefusalJudge.", ""] + utility_lines(report["utility"])
    lines += ["", "### 5.6 The judge (7.2.7)", "", "Held-out harmful requests' answers, summed over seeds, by the "
              "three-way judge's class, `other` sub-label and flags, beside RefusalJudge.", ""]
    lines += judge_lines(report["judge"])
    lines += ["", "## 6. Implementation checks (PLAN 8.8)", ""] + checks_lines(meta["checks"])
    lines += ["", "## 7. Missing runs"] + missing_lines(report)
    return "\n".join(lines + appendix_lines(report, meta))


def appendix_lines(report: dict, meta: dict) -> list[str]:
    levels = [lv for lv in next(iter(report["gaps"]["means"][STAGE1].values()))["image"] if lv != "input"]
    lines = ["", "## Appendix: per-layer gaps and correlations (exploratory)", "",
             f"The gap at each LM layer from the hidden states (layer 0: the LM's input embeddings; then each decoder "
             f"layer's output): image-token positions against caption-token positions. Stage pairs: "
             f"{'; '.join(STAGE_PAIRS)}."]
    for level in levels:
        lines += ["", f"### {level}", ""] + gap_lines(report["gaps"], level)
        lines += [""] + correlation_lines(report["correlations"], level)
    return lines
