"""``regap-fast safety-eval``: the unsafe-response rate of a model under image conditions.

Each harmful request is sent under each condition (text only, blank, noise, typographic, the
benchmark's own images: see ``regap_fast.eval.conditions``); the answers are generated in batches
(greedy by default) with the model's chat template and appended to ``OUT/responses.jsonl`` as they
come, then judged (``OUT/verdicts.jsonl``, the same way). Both files are keyed, so an interrupted
run started again with the same arguments resumes where it stopped: no finished answer is computed
twice or lost. The report (``OUT/safety.json``, ``safety.csv``, ``safety.png``) gives the unsafe
rate per condition and per category with Wilson 95% intervals, and the safety degradation of each
image condition: its unsafe rate minus the text-only rate on the same prompts, with Newcombe's
paired interval. It names the judge it used.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ._cli import (add_image_folder_argument, add_model_arguments, add_progress_argument, device_and_dtype,
                   load_vlm, show_progress)
from .cache import JsonlStore
from .conditions import TEXT_ONLY, condition_input, condition_text, parse_conditions
from .judges import BEAVERDAM_THRESHOLD, CATEGORY_SEP, BeaverDamJudge, GuardModelJudge, RefusalJudge, Verdict
from .prompts import BENCHMARKS, Prompt, load_prompts
from .stats import paired_difference_interval, wilson_interval

RESPONSES, VERDICTS = "responses.jsonl", "verdicts.jsonl"
REPORT_JSON, REPORT_CSV, REPORT_PNG = "safety.json", "safety.csv", "safety.png"


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def _describe(judge) -> dict:
    describe = getattr(judge, "describe", None)
    return describe() if describe else {"name": getattr(judge, "name", type(judge).__name__)}


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _progress(total: int, done: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc=desc, unit="answer", disable=not enabled, dynamic_ncols=True)


def evaluate(vlm, prompts: Sequence[Prompt], conditions=None, judge=None, *, out_dir, max_new_tokens: int = 128,
             batch_size: int = 8, do_sample: bool = False, temperature: float = 1.0, seed: int = 0,
             model_name: str | None = None, progress: bool = True, judge_batch_size: int = 64) -> dict:
    """Generate, judge and report; returns the report (also written to ``out_dir``).

    Args:
        vlm: a ``regap_fast.model.VisionLanguageModel`` (anything with ``generate`` and ``image_size``); one
            whose ``answers_without_image`` is False gets no ``none`` condition ("all" leaves it out).
        prompts: from ``regap_fast.eval.prompts``.
        conditions: condition names, or a comma-separated string (default: every available one).
        judge: anything with ``judge(prompts, responses) -> list[bool]`` (default: ``RefusalJudge()``).
        out_dir: where the caches and the report go; reuse it to resume.
        max_new_tokens, do_sample, temperature: generation settings (greedy by default).
        seed: seeds the noise images (and sampling, when on; sampled answers are not reproducible
            across an interrupted run).
        model_name: identifies the model in the cache keys: a folder reused with another model or
            other settings never mixes answers.
        judge_batch_size: responses handed to the judge at a time (and cached after each).
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to evaluate")
    if max_new_tokens < 1 or batch_size < 1 or judge_batch_size < 1:
        raise ValueError("max_new_tokens, batch_size and judge_batch_size must be >= 1")
    judge = judge if judge is not None else RefusalJudge()
    named = [c.strip() for c in conditions.split(",")] if isinstance(conditions, str) else list(conditions or [])
    conditions = parse_conditions(conditions, prompts)
    if TEXT_ONLY in conditions and not getattr(vlm, "answers_without_image", True):  # BLIP-2, PaliGemma
        if TEXT_ONLY in named:
            raise ValueError(f"this model answers only with an image: leave the {TEXT_ONLY!r} condition out")
        conditions.remove(TEXT_ONLY)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"model": model_name, "max_new_tokens": max_new_tokens, "do_sample": do_sample,
                "temperature": temperature if do_sample else None, "seed": seed, "image_size": vlm.image_size}
    if do_sample:
        import torch

        torch.manual_seed(seed)
    responses = _generate(vlm, prompts, conditions, settings, out_dir / RESPONSES, batch_size, progress)
    judge_info = _describe(judge)
    verdicts = _judge(judge, judge_info, responses, out_dir / VERDICTS, judge_batch_size, progress)
    rows = [{"id": r["id"], "condition": r["condition"], "category": r["category"], "unsafe": v["unsafe"],
             "label": v["label"], "detail": v.get("detail", "")} for r, v in zip(responses, verdicts)]
    report = build_report(rows, conditions, judge_info, settings, len(prompts))
    write_report(report, out_dir)
    return report


def _generate(vlm, prompts, conditions, settings, path, batch_size, progress) -> list[dict]:
    """Every (condition, prompt) answer, from the cache or generated now; in condition, prompt order."""
    store = JsonlStore(path)
    settings_id = _digest(settings)
    work = {c: [(p, f"{c}|{settings_id}|{p.id}") for p in prompts if condition_text(c, p) is not None]
            for c in conditions}
    for condition, items in work.items():
        for prompt, key in items:  # a changed prompt file must not reuse answers to other requests
            old = store.records.get(key)
            if old and (old["request"], old["text"]) != (prompt.text, condition_text(condition, prompt)):
                raise ValueError(f"{path} holds an answer for prompt {prompt.id!r} under {condition!r} to a different "
                                 f"request; the prompt file changed since: use a new --out folder")
    total = sum(len(items) for items in work.values())
    todo = {c: [(p, k) for p, k in items if k not in store] for c, items in work.items()}
    with _progress(total, total - sum(map(len, todo.values())), "generate", progress) as bar:
        for condition, items in todo.items():
            bar.set_postfix_str(condition)
            for chunk in _batches(items, batch_size):
                inputs = [condition_input(condition, p, size=vlm.image_size, seed=settings["seed"]) for p, _ in chunk]
                answers = vlm.generate([i.text for i in inputs], [i.image for i in inputs],
                                       max_new_tokens=settings["max_new_tokens"], do_sample=settings["do_sample"],
                                       temperature=settings["temperature"] or 1.0, batch_size=batch_size)
                if len(answers) != len(chunk) or not all(isinstance(a, str) for a in answers):
                    raise RuntimeError(f"vlm.generate returned {len(answers)} answers for {len(chunk)} requests")
                store.append({"key": key, "id": p.id, "condition": condition, "settings": settings_id,
                              "category": p.category, "request": p.text, "text": i.text, "image": i.image_desc,
                              "response": a} for (p, key), i, a in zip(chunk, inputs, answers))
                bar.update(len(chunk))
    return [store[k] for items in work.values() for _, k in items]


def _judge(judge, judge_info, responses, path, batch_size, progress) -> list[dict]:
    store = JsonlStore(path)
    judge_id = _digest(judge_info)
    keys = [f"{judge_id}|{r['key']}" for r in responses]
    todo = [(k, r) for k, r in zip(keys, responses) if k not in store]
    details = getattr(judge, "judge_details", None)
    with _progress(len(responses), len(responses) - len(todo), f"judge ({judge_info.get('name')})", progress) as bar:
        for chunk in _batches(todo, batch_size):
            requests, answers = [r["request"] for _, r in chunk], [r["response"] for _, r in chunk]
            if details is not None:
                verdicts = details(requests, answers)
            else:
                verdicts = [Verdict(bool(u), "unsafe" if u else "safe") for u in judge.judge(requests, answers)]
            if len(verdicts) != len(chunk):
                raise RuntimeError(f"the judge returned {len(verdicts)} verdicts for {len(chunk)} responses")
            store.append({"key": k, "response": r["key"], "unsafe": bool(v.unsafe), "label": v.label,
                          "detail": v.detail} for (k, r), v in zip(chunk, verdicts))
            bar.update(len(chunk))
    return [store[k] for k in keys]


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------


def _none_if_nan(x: float):
    return None if x is None or math.isnan(x) else x


def _rate(rows: list[dict]) -> dict:
    n, k = len(rows), sum(r["unsafe"] for r in rows)
    lo, hi = wilson_interval(k, n)
    return {"n": n, "unsafe": k, "rate": _none_if_nan(k / n if n else math.nan),
            "ci95": [_none_if_nan(lo), _none_if_nan(hi)], "labels": dict(Counter(r["label"] for r in rows))}


def _degradation(rows: list[dict], base: dict[str, bool]) -> dict:
    pairs = [(r["unsafe"], base[r["id"]]) for r in rows if r["id"] in base]
    diff, lo, hi = paired_difference_interval([a for a, _ in pairs], [b for _, b in pairs])
    return {"n_pairs": len(pairs), "diff": _none_if_nan(diff), "ci95": [_none_if_nan(lo), _none_if_nan(hi)]}


def _table(rows: list[dict], conditions: list[str]) -> tuple[dict, dict]:
    by_condition = {c: [r for r in rows if r["condition"] == c] for c in conditions}
    rates = {c: _rate(rs) for c, rs in by_condition.items()}
    degradation = {}
    if TEXT_ONLY in by_condition:
        base = {r["id"]: r["unsafe"] for r in by_condition[TEXT_ONLY]}
        degradation = {c: _degradation(rs, base) for c, rs in by_condition.items() if c != TEXT_ONLY}
    return rates, degradation


def build_report(rows: list[dict], conditions: list[str], judge: dict, settings: dict, n_prompts: int) -> dict:
    """Rows ``{id, condition, category, unsafe, label}`` -> the report dict written to safety.json."""
    rates, degradation = _table(rows, conditions)
    categories = sorted({r["category"] for r in rows if r["category"] is not None})
    by_category, degradation_by_category = {}, {}
    for cat in categories:
        present = [c for c in conditions if any(r["condition"] == c and r["category"] == cat for r in rows)]
        by_category[cat], degradation_by_category[cat] = _table([r for r in rows if r["category"] == cat], present)
    image_rows = [r for r in rows if r["condition"] != TEXT_ONLY]
    report = {
        "judge": judge,
        "settings": settings,
        "n_prompts": n_prompts,
        "conditions": conditions,
        "unsafe_rate": rates,
        "degradation": degradation,
        "by_category": by_category,
        "degradation_by_category": degradation_by_category,
        "summary": {"text_only": rates.get(TEXT_ONLY), "image": _rate(image_rows) if image_rows else None},
    }
    if judge.get("categories"):  # a multi-label judge: how often each of its harm categories was flagged
        report["judge_categories"] = {c: _category_rates([r for r in rows if r["condition"] == c],
                                                         judge["categories"]) for c in conditions}
    return report


def _category_rates(rows: list[dict], categories: list[str]) -> dict:
    flagged = Counter(name for r in rows if r["unsafe"] for name in (r.get("detail") or "").split(CATEGORY_SEP))
    return {name: {"n": len(rows), "flagged": flagged[name], "rate": _none_if_nan(flagged[name] / len(rows)
                                                                                  if rows else math.nan)}
            for name in categories}


CSV_COLUMNS = ("condition", "category", "n", "unsafe", "unsafe_rate", "ci95_low", "ci95_high",
               "degradation", "degradation_ci95_low", "degradation_ci95_high")


def _csv_rows(report: dict):
    tables = [("all", report["unsafe_rate"], report["degradation"])]
    tables += [(cat, report["by_category"][cat], report["degradation_by_category"][cat])
               for cat in report["by_category"]]
    for category, rates, degradation in tables:
        for condition, r in rates.items():
            d = degradation.get(condition, {"diff": None, "ci95": [None, None]})
            yield (condition, category, r["n"], r["unsafe"], r["rate"], *r["ci95"], d["diff"], *d["ci95"])


def write_report(report: dict, out_dir) -> None:
    """safety.json, safety.csv (one row per condition and category; category ``all`` first), safety.png."""
    from .plots import plot_safety

    out_dir = Path(out_dir)
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with open(out_dir / REPORT_CSV, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(_csv_rows(report))
    plot_safety(report, out_dir / REPORT_PNG)


def format_report(report: dict) -> str:
    """The per-condition table printed at the end of a run."""
    pct = lambda x: "   -  " if x is None else f"{100 * x:5.1f}%"
    lines = [f"judge: {report['judge'].get('name')}   prompts: {report['n_prompts']}",
             f"{'condition':<22}{'n':>6}{'unsafe':>8}{'rate':>8}   {'95% CI':<17}{'vs none':>8}   95% CI"]
    for c, r in report["unsafe_rate"].items():
        d = report["degradation"].get(c)
        line = f"{c:<22}{r['n']:>6}{r['unsafe']:>8}{pct(r['rate']):>8}   [{pct(r['ci95'][0])}, {pct(r['ci95'][1])}]"
        if d:
            line += f" {'-' if d['diff'] is None else format(100 * d['diff'], '+6.1f') + '%':>8}   " \
                    f"[{pct(d['ci95'][0])}, {pct(d['ci95'][1])}]"
        lines.append(line)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", required=True, metavar="PATH",
                        help="harmful requests: a CSV (AdvBench, HarmBench, or prompt[,category]), a JSONL, "
                             "an MM-SafetyBench folder, or FigStep's safebench.csv")
    parser.add_argument("--benchmark", choices=BENCHMARKS, default="auto",
                        help="how to read --prompts (default: from the path)")
    add_image_folder_argument(parser, "the benchmark's image folder (default: where its repository puts it, next "
                                      "to the questions; MM-SafetyBench: its imgs/ folder, or the folder its "
                                      "archive unpacked into)")
    parser.add_argument("--conditions", metavar="LIST",
                        help="comma-separated: none, white, black, noise, typo, benchmark[:KIND], all "
                             "(default: all available)")
    parser.add_argument("--judge", choices=("refusal", "guard", "beaverdam"), default="refusal",
                        help="refusal-phrase matching, a local Llama-Guard-style classifier (--guard-model), or a "
                             "local QA-moderation classifier in Beaver-dam-7B's format (--judge-model)")
    parser.add_argument("--guard-model", metavar="DIR", help="the classifier folder for --judge guard")
    parser.add_argument("--judge-model", metavar="DIR", help="the classifier folder for --judge beaverdam "
                                                             "(or guard)")
    parser.add_argument("--judge-threshold", type=float, default=BEAVERDAM_THRESHOLD, metavar="P",
                        help="--judge beaverdam flags an answer when a category's probability exceeds P "
                             f"(default {BEAVERDAM_THRESHOLD}, QAModeration.predict's)")
    parser.add_argument("--refusal-mode", choices=("substring", "prefix"), default="substring",
                        help="where --judge refusal looks for refusal phrases (default: anywhere, as GCG)")
    parser.add_argument("--out", "--output_dir", required=True, metavar="DIR",
                        help="output folder; rerun with it to resume").hidden_aliases = ("--output_dir",)
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest answer, in tokens")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="with --sample")
    parser.add_argument("--seed", type=int, default=0, help="noise images (and sampling)")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N prompts (a quick look)")
    add_progress_argument(parser)
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    # bad inputs fail here, before the model is loaded
    for flag in ("batch_size", "max_new_tokens"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    judge_model = args.judge_model or (args.guard_model if args.judge == "guard" else None)
    if args.judge == "guard" and not judge_model:
        raise ValueError("--judge guard needs --guard-model DIR (a local Llama-Guard-style checkpoint)")
    if args.judge == "beaverdam" and not judge_model:
        raise ValueError("--judge beaverdam needs --judge-model DIR (a local Beaver-dam-7B-style classifier)")
    if args.judge != "beaverdam" and args.judge_threshold != BEAVERDAM_THRESHOLD:
        raise ValueError("--judge-threshold applies to --judge beaverdam only")
    prompts = load_prompts(args.prompts, args.benchmark, args.image_folder, args.limit)
    parse_conditions(args.conditions, prompts)  # a bad name fails before the model loads
    if args.judge == "guard":
        judge = GuardModelJudge(judge_model, batch_size=args.batch_size)
    elif args.judge == "beaverdam":
        judge = BeaverDamJudge(judge_model, threshold=args.judge_threshold, batch_size=args.batch_size)
    else:
        judge = RefusalJudge(mode=args.refusal_mode)
    vlm, device, dtype = _load(args)
    if isinstance(judge, (GuardModelJudge, BeaverDamJudge)):
        judge.device, judge.dtype = device, dtype
    report = evaluate(vlm, prompts, args.conditions, judge, out_dir=args.out, max_new_tokens=args.max_new_tokens,
                      batch_size=args.batch_size, do_sample=args.sample, temperature=args.temperature,
                      seed=args.seed, model_name=str(Path(args.model).resolve()), progress=show_progress(args))
    print(format_report(report))
    print(f"wrote {Path(args.out) / REPORT_JSON}, {REPORT_CSV}, {REPORT_PNG} ({RESPONSES}: the answers)")
    return 0


def _load(args: argparse.Namespace):
    """(vlm, device, dtype): a transformers VLM folder with its processor (any family apply_regap supports, through
    its own processor and chat template), else what ``load_model`` reads (the library's own, LLaVA without a
    processor)."""
    from .hf_gap import TransformersVLM, is_transformers_folder

    if is_transformers_folder(args.model):
        device, dtype = device_and_dtype(args)
        return TransformersVLM.from_folder(args.model, device, dtype), device, dtype
    return load_vlm(args)
