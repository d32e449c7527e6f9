"""The answers a reader can check the judge on (PLAN 6): ``answers-sample.jsonl`` / ``.md`` (fixed prompts of
one seed, every stage, both judges) and ``answers-by-class.md`` (the first answers of each class,
sub-label and judge disagreement, per stage and condition)."""

from __future__ import annotations

import json
from pathlib import Path

from . import study
from .judge import parse_detail
from .measure import DISAGREEMENTS, judged_answers
from .pipeline import CONDITION_NAMES, DESCRIPTIONS
from .report import STAGE1, Results

KINDS = ("refusal", "harmful_compliance", "other", "benign_answer", "image_talk", "empty", "gibberish", *DISAGREEMENTS)
KIND_NAMES = {"refusal_judge_unsafe_ours_other": "RefusalJudge unsafe, ours `other`",
              "refusal_judge_safe_ours_harmful": "RefusalJudge safe, ours `harmful_compliance`"}


def sample_ids(n_harmful: int, n_benign: int, stride: int = 1) -> set[str]:
    """The fixed prompts of the sample, among the held-out positions 0, stride, 2 stride, ... of sets of
    ``n_harmful`` and ``n_benign`` (PLAN 10.3's cut, stride 2: an odd position p becomes p - 1)."""
    s = study.ANSWER_SAMPLE
    return ({f"harmful-{p - p % stride:04d}" for p in s["harmful_positions"] if p < n_harmful}
            | {f"benign-{p - p % stride:04d}" for p in s["benign_positions"] if p < n_benign})


def _record(answer: dict, stage: str, row: dict) -> dict:
    d = parse_detail(answer["detail"])
    return {"data_seed": row["data_seed"], "seed": row["seed"], "lambda": row["lambda"], "models": stage,
            "condition": answer["condition"], "id": answer["id"], "request": answer["request"],
            "response": answer["response"], "class": answer["label"], "sub_label": d.sub_label,
            "object": d.object_match, "refusal_later": d.refusal_later, "harmful_later": d.harmful_later,
            "refusal_judge_unsafe": answer["refusal_judge_unsafe"]}


def answer_sample(res: Results, n_harmful: int, n_benign: int, stride: int = 1) -> list[dict]:
    """The sample's answers: the sample seed's stage-1 model and every arm's final model, both lambdas (the
    keep-on arm's lambda-0 model is the base arm's, not repeated), all conditions, harmful then benign."""
    s, ids = study.ANSWER_SAMPLE, sample_ids(n_harmful, n_benign, stride)
    out = []
    for w in [w for w in s["lambdas"] if w in res.design.lambdas]:
        for stage in res.stages():
            row = None if stage == study.KEEP_ON_ARM and w == 0 else res.row(stage, s["data_seed"], s["seed"], w)
            if row is None:
                continue
            for folder in (Path(row["dir"]) / "eval", Path(row["dir"]) / "eval" / "benign"):
                out += [_record(a, stage, row) for a in judged_answers(folder) if a["id"] in ids]
    return out


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def sample_markdown(records: list[dict]) -> str:
    s = study.ANSWER_SAMPLE
    lines = ["# Answers: a fixed sample (PLAN 6)", "", f"Data seed {s['data_seed']}, seed {s['seed']}; the held-out "
             f"harmful requests at positions {', '.join(map(str, s['harmful_positions']))} and the benign ones at "
             f"{', '.join(map(str, s['benign_positions']))}; the stage-1 model and each arm's final model (the "
             f"`{study.KEEP_ON_ARM}` arm's lambda-0 model is `{study.BASE_ARM}`'s). Class, sub-label, object and "
             "flags: the three-way judge; last column: RefusalJudge's verdict. Every field: answers-sample.jsonl."]
    groups: dict[tuple, list] = {}
    for r in records:
        groups.setdefault((r["lambda"], r["models"], r["condition"]), []).append(r)
    for (w, stage, cond), rs in groups.items():
        lines += ["", f"## lambda {w:g}, {stage}, {DESCRIPTIONS[cond]}", "",
                  "| id | request | answer | class | sub-label | object | flags | RefusalJudge |", "|" + " --- |" * 8]
        for r in rs:
            flags = ", ".join(f for f in ("refusal_later", "harmful_later") if r[f])
            lines.append(f"| {r['id']} | {_cell(r['request'])} | {_cell(r['response']) or '(empty)'} | {r['class']} | "
                         f"{r['sub_label'] or ''} | {r['object'] or ''} | {flags} | "
                         f"{'unsafe' if r['refusal_judge_unsafe'] else 'safe'} |")
    return "\n".join(lines) + "\n"


def by_class(res: Results, k: int = study.ANSWER_SAMPLE["per_class_examples"]) -> dict:
    """Per stage and condition: the first ``k`` answers of each kind, in the order data seed, seed, lambda,
    prompt id (each model's ``examples.json`` holds its own first ``k``)."""
    out = {}
    for stage in res.stages():
        rows = sorted((r for w in res.design.lambdas for r in res.own_rows(stage, w)),
                      key=lambda r: (r["data_seed"], r["seed"], r["lambda"]))
        slots = out[stage] = {c: {kind: [] for kind in KINDS} for c in CONDITION_NAMES}
        for row in rows:
            examples = json.loads((Path(row["dir"]) / "eval" / "examples.json").read_text())
            for cond, kinds in examples.items():
                for kind, answers in kinds.items():
                    room = k - len(slots[cond][kind])
                    slots[cond][kind] += [_record(a, stage, row) for a in answers[:max(0, room)]]
    return out


def by_class_markdown(examples: dict) -> str:
    lines = ["# Answers by class (PLAN 6)", "", "For each stage and condition, the first answers (in the order data "
             "seed, seed, lambda, prompt id) of each class of the three-way judge, each `other` sub-label, and each "
             "kind of disagreement with RefusalJudge. Held-out harmful requests only."]
    for stage, by_cond in examples.items():
        lines += ["", f"## {'stage-1 models' if stage == STAGE1 else f'final models, `{stage}`'}"]
        for cond, kinds in by_cond.items():
            lines += ["", f"### {DESCRIPTIONS[cond]}", ""]
            for kind, answers in kinds.items():
                name = KIND_NAMES.get(kind, f"`{kind}`")
                if not answers:
                    lines.append(f"- {name}: none")
                for a in answers:
                    lines.append(f"- {name}: \"{_cell(a['response'])}\" (to \"{_cell(a['request'])}\"; data seed "
                                 f"{a['data_seed']}, seed {a['seed']}, lambda {a['lambda']:g}, {a['id']})")
    return "\n".join(lines) + "\n"


def write_answers(out: Path, res: Results, n_harmful: int, n_benign: int, stride: int = 1) -> list[Path]:
    """``n_harmful``, ``n_benign``: the full held-out sets; ``stride``: every stride-th of them evaluated."""
    records = answer_sample(res, n_harmful, n_benign, stride)
    paths = [out / "answers-sample.jsonl", out / "answers-sample.md", out / "answers-by-class.md"]
    paths[0].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    paths[1].write_text(sample_markdown(records), encoding="utf-8")
    paths[2].write_text(by_class_markdown(by_class(res)), encoding="utf-8")
    return paths
