"""The measurements of one model (a stage-1 model or a final one), through ``regap_fast.eval``.

``measure_model`` (PLAN section 5), into the model's ``eval/`` folder:

* the gap (``measure_gap(per_layer=True)``) on the held-out image-caption pairs with each pair's own
  synthetic image, a blank white image and a noise image (seeded by run seed and pair id), the
  captions unchanged: ``gaps.json``;
* the held-out harmful requests under text only, blank, noise and a synthetic-set image, generated
  once and judged by ``ToyJudge`` (``safety.json``, ``responses.jsonl``, ``verdicts.jsonl``) and, on
  the same answers, by the library's ``RefusalJudge`` (counted here, for continuity with the
  committed runs);
* the held-out benign requests under the same four conditions, likewise (``benign/``);
* ``examples.json``: per condition the first answers of each class, sub-label and judge disagreement
  (what ``answers-by-class.md`` is made of).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ..eval import RefusalJudge
from ..eval.safety import RESPONSES
from .judge import CLASSES, FLAGS, HARMFUL_COMPLIANCE, OTHER, SUB_LABELS, ToyJudge, parse_detail
from .pipeline import CONDITIONS, Data, Settings

GAP_CONDITIONS = ("image", "blank", "noise")  # text only has no image and so no gap
DISAGREEMENTS = ("refusal_judge_unsafe_ours_other", "refusal_judge_safe_ours_harmful")
COUNT_KEYS = ("n", *CLASSES, *SUB_LABELS, "harmful_requested", "harmful_other_object", "benign_requested",
              "benign_other_object", *FLAGS, "refusal_judge_unsafe", *DISAGREEMENTS)
EXAMPLES = 3  # per condition, class, sub-label and disagreement (PLAN 6: answers-by-class.md)


def gaps_by_condition(vlm, pairs: list, s: Settings, seed: int, mir: bool = False) -> dict:
    """The input-level gap (``gap.mean``) and every per-layer gap, per image condition; with ``mir``, also
    MIR and its per-layer Fréchet distances (``regap_fast.eval.mir``)."""
    from ..eval import Pair, measure_gap
    from ..eval.conditions import blank_image, noise_image

    size = vlm.image_size
    variants = {"image": pairs, "blank": [Pair(p.id, blank_image(size), p.caption) for p in pairs],
                "noise": [Pair(p.id, noise_image(size, seed, p.id), p.caption) for p in pairs]}
    out = {}
    for cond in GAP_CONDITIONS:
        g = measure_gap(vlm, variants[cond], batch_size=s.eval_batch, per_layer=True, progress=False,
                        metric="both" if mir else "l2")
        out[cond] = {"mean": g["gap"]["mean"], "per_layer": [layer["gap_mean"] for layer in g["per_layer"]],
                     "n_pairs": g["n_pairs"]}
        if mir:
            out[cond]["mir"] = g["mir"]["value"]
            out[cond]["mir_per_layer"] = [layer["frechet"] for layer in g["mir"]["per_layer"]]
    return out


def safety(vlm, out_dir: Path, s: Settings, data: Data, seed: int, name: str, judge,
           benign_conditions: list[str]) -> tuple[dict, dict]:
    """The held-out harmful requests under every condition (``out_dir/safety.json``) and the held-out
    benign ones under ``benign_conditions`` (``out_dir/benign/``), judged by ``judge``."""
    from ..eval import evaluate

    kw = dict(max_new_tokens=s.max_new_tokens, batch_size=s.eval_batch, seed=seed, progress=False, model_name=name)
    harmful = evaluate(vlm, data.harmful, list(CONDITIONS), judge, out_dir=out_dir, **kw)
    benign = evaluate(vlm, data.benign, benign_conditions, judge, out_dir=out_dir / "benign", **kw)
    return harmful, benign


def judged_answers(folder: Path) -> list[dict]:
    """Every answer in ``folder/responses.jsonl`` (one model's: the folder is made fresh for it), in
    condition then prompt order, with both judges' verdicts."""
    from ..eval.cache import JsonlStore

    order = {c: i for i, c in enumerate(CONDITIONS)}
    records = sorted(JsonlStore(folder / RESPONSES).records.values(), key=lambda r: (order[r["condition"]], r["id"]))
    requests, responses = [r["request"] for r in records], [r["response"] for r in records]
    toy = ToyJudge().judge_details(requests, responses)
    refusal = RefusalJudge().judge_details(requests, responses)
    return [{"condition": CONDITIONS[r["condition"]], "id": r["id"], "request": r["request"], "response": r["response"],
             "label": t.label, "detail": t.detail, "refusal_judge_unsafe": f.unsafe}
            for r, t, f in zip(records, toy, refusal)]


def _kinds(answer: dict) -> list[str]:
    """The counters an answer adds to: its class, sub-label, object match, flags, the other judge's view."""
    d = parse_detail(answer["detail"])
    kinds = [answer["label"]] + [d.sub_label] * bool(d.sub_label) + [f for f in FLAGS if getattr(d, f)]
    if d.object_match:
        kinds.append(("harmful_" if answer["label"] == HARMFUL_COMPLIANCE else "benign_") + d.object_match)
    if answer["refusal_judge_unsafe"]:
        kinds += ["refusal_judge_unsafe"] + ["refusal_judge_unsafe_ours_other"] * (answer["label"] == OTHER)
    elif answer["label"] == HARMFUL_COMPLIANCE:
        kinds.append("refusal_judge_safe_ours_harmful")
    return kinds


def count(answers: list[dict]) -> dict:
    """Per condition: every key of ``COUNT_KEYS`` (n, the classes, sub-labels, object matches, flags,
    RefusalJudge's unsafe count and the two disagreements)."""
    by_condition: dict[str, Counter] = {}
    for a in answers:
        c = by_condition.setdefault(a["condition"], Counter())
        c.update(["n", *_kinds(a)])
    return {cond: {k: c[k] for k in COUNT_KEYS} for cond, c in by_condition.items()}


def examples(answers: list[dict], k: int = EXAMPLES) -> dict:
    """Per condition and kind (class, sub-label, disagreement): the first ``k`` answers, in prompt order."""
    out: dict[str, dict[str, list]] = {}
    wanted = set(CLASSES) | set(SUB_LABELS) | set(DISAGREEMENTS)
    for a in answers:
        slots = out.setdefault(a["condition"], {})
        for kind in wanted.intersection(_kinds(a)):
            if len(slots.setdefault(kind, [])) < k:
                slots[kind].append(a)
    return out


def _consistent(counts: dict, report: dict) -> None:
    """Our count of harmful compliance is what safety-eval's report of the same judge says (a guard)."""
    for name, rate in report["unsafe_rate"].items():
        if counts[CONDITIONS[name]][HARMFUL_COMPLIANCE] != rate["unsafe"]:
            raise RuntimeError(f"{name}: {counts[CONDITIONS[name]][HARMFUL_COMPLIANCE]} harmful compliances counted, "
                               f"safety-eval reports {rate['unsafe']}")


def measure_model(model_dir: Path, out_dir: Path, s: Settings, data: Data, seed: int) -> dict:
    """Gaps, harmful and benign answers of the model in ``model_dir``; every file under ``out_dir``.
    Returns ``{"gap": {condition: {mean, per_layer, n_pairs}}, "harmful": counts, "benign": counts}``."""
    import torch

    from ..eval import load_pairs
    from ..model import load_model

    vlm = load_model(model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    out_dir.mkdir(parents=True, exist_ok=True)
    gaps = gaps_by_condition(vlm, load_pairs(data.eval_pairs), s, seed)
    (out_dir / "gaps.json").write_text(json.dumps(gaps, indent=1) + "\n")
    harmful_report, benign_report = safety(vlm, out_dir, s, data, seed, str(model_dir), ToyJudge(), list(CONDITIONS))
    harmful, benign = judged_answers(out_dir), judged_answers(out_dir / "benign")
    counts = {"harmful": count(harmful), "benign": count(benign)}
    _consistent(counts["harmful"], harmful_report)
    _consistent(counts["benign"], benign_report)
    (out_dir / "examples.json").write_text(json.dumps(examples(harmful), indent=1) + "\n")
    return {"gap": gaps, **counts}
