"""``regap-fast reproduce``: the paper's safety claim in miniature, end to end, through the library's own parts.

    regap-fast reproduce --out runs/repro [--quick | --seeds 8] [--regap-weight 0.2 ...]
    regap-fast reproduce --select-stage2 --out DIR --seeds 6 --first-seed 100   # how stage 2 was chosen

A toy language in words (captions of the synthetic shapes, requests with a refusal rule, benign image
instructions: ``language.py``) and a tokenizer trained on it; a tiny Llama pretrained on it text
only (the "safety-tuned LLM"); then per seed a fresh tiny CLIP and projector and, for each lambda
(0, the baseline, is always run): stage 1 with REGAP weight lambda, stage 2 on benign image
instructions with text-only records mixed in (the setting ``selection.py`` chose on the baseline arm
alone), and the measurements of both stages (``pipeline.py``). The report
(``report.py``): unsafe rates per condition and lambda with Wilson intervals, the paired per-seed
difference REGAP minus baseline with a t-interval, the gap against the unsafe rate across all runs
(Pearson, Spearman), a figure, ``DIR/summary.json`` and ``DIR/report.md``. See the README's
reproduction section.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

DEFAULT_WEIGHT = 0.2
DEFAULT_SEEDS = 8
QUICK_SEEDS = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .pipeline import Settings

    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (runs, summary.json, report.md, "
                                                                    "reproduce.png); its runs/ are started afresh")
    parser.add_argument("--seeds", type=int, default=None, metavar="N",
                        help=f"seeds per lambda (default: {DEFAULT_SEEDS}; with --quick, {QUICK_SEEDS})")
    parser.add_argument("--quick", action="store_true",
                        help=f"a first look: {QUICK_SEEDS} seed instead of {DEFAULT_SEEDS}, under 2 minutes on 2 "
                             "cores (one pair of runs: no interval over seeds)")
    parser.add_argument("--select-stage2", action="store_true",
                        help="instead of the reproduction: screen the stage-2 candidates on the baseline (lambda 0) "
                             "only and select one by the fixed criterion (selection.py; how the default was chosen)")
    parser.add_argument("--first-seed", type=int, default=0, metavar="S", help="seeds S .. S+N-1 (default: 0)")
    parser.add_argument("--regap-weight", type=float, nargs="+", default=[DEFAULT_WEIGHT], metavar="L",
                        help=f"REGAP lambda(s) of stage 1; the baseline 0 is always run too "
                             f"(default: {DEFAULT_WEIGHT})")
    parser.add_argument("--data-seed", type=int, default=0,
                        help="seed of the toy language, the synthetic images and the held-out split (default: 0)")
    parser.add_argument("--jobs", type=int, default=None, metavar="J",
                        help="runs in parallel processes (default: on the CPU, one per core; on a GPU, 1)")
    parser.add_argument("--threads", type=int, default=None, metavar="T",
                        help="torch threads per process on the CPU (default: cores / jobs; the LM's pretraining, "
                             "which runs alone, all cores). On a busy machine 1 is much faster: threads that wait "
                             "for a core stall each other; the results do not depend on it")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    sizes = parser.add_argument_group("sizes and steps (the defaults fit a 2-core CPU in minutes; raise them "
                                      "on a GPU)")
    for f in dataclasses.fields(Settings):
        flag, kind = _flag(f.name), type(f.default)
        if kind is bool:
            sizes.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                               help=f"(default: {f.default})")
        else:
            sizes.add_argument(flag, dest=f.name, type=kind, default=f.default, metavar=kind.__name__.upper(),
                               choices=CHOICES.get(f.name), help=FIELD_HELP.get(f.name, "") + f"(default: {f.default})")
    # --images was the count's flag before --num-images (other commands' --images is a folder)
    sizes.add_argument("--images", dest="images", type=int, action=_DeprecatedAlias, help=argparse.SUPPRESS)


CHOICES = {"stage1_format": ("chat", "plain"), "stage2_text_data": ("replay", "benign")}
FLAGS = {"images": "--num-images"}  # fields whose flag is not their name
FIELD_HELP = {"images": "synthetic image-caption pairs ", "stage2_text_share": "share of text-only records in stage 2 ",
              "stage2_text_data": "stage 2's text-only records: replay (the LM's own text data) or benign (benign "
                                  "requests) ", "stage2_lora_rank": "stage 2 trains LoRA adapters of this rank on the "
                                                                    "LM (0: all its weights) ",
              "stage2_lr": "stage 2's peak learning rate (the LM's, and the projector's unless the next is set) ",
              "stage2_projector_lr": "the projector's own peak learning rate in stage 2 (0: --stage2-lr) "}


def _flag(name: str) -> str:
    return FLAGS.get(name, "--" + name.replace("_", "-"))


class _DeprecatedAlias(argparse.Action):
    """A flag's old name: still works, says once which name replaced it."""

    def __call__(self, parser, namespace, values, option_string=None):
        new = _flag(self.dest)
        print(f"regap-fast reproduce: {option_string} is deprecated; use {new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _settings(args: argparse.Namespace):
    from .pipeline import Settings

    return Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})


# --------------------------------------------------------------------------------------------------
# the work: tasks run in this process or in a pool of processes
# --------------------------------------------------------------------------------------------------


def _quiet(threads: int | None) -> None:
    """Per process: torch threads, and only warnings that matter in the log."""
    import torch

    if threads and not torch.cuda.is_available():
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    for name in ("transformers", "regap_fast.train"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _task(root: str, settings, data, seed: int, weight: float, threads: int | None) -> dict:
    """One (seed, lambda) run, in this process or a worker."""
    from . import pipeline

    _quiet(threads)
    t0 = time.perf_counter()
    root = Path(root)
    row = pipeline.run_one(pipeline.run_dir(root, seed, weight), pipeline.pretrain_dir(root) / "model", settings, data,
                           seed, weight)
    row["seconds"] = time.perf_counter() - t0
    return row


def _warm(threads: int | None) -> None:
    """A worker's imports and settings, done while the LM pretrains instead of after it."""
    from ..eval import evaluate  # noqa: F401
    from ..model import load_model  # noqa: F401
    from ..train import train  # noqa: F401
    from . import pipeline  # noqa: F401

    _quiet(threads)


def _workers(jobs: int, threads: int | None):
    """A pool of ``jobs`` processes, started and warmed now (None: the runs go in this process)."""
    if jobs <= 1:
        return None
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"))
    for _ in range(jobs):
        pool.submit(_warm, threads)
    return pool


def _run_all(root: Path, settings, data, seeds: list[int], weights: list[float], pool, threads: int | None,
             bar) -> list[dict]:
    """Every (seed, lambda) run, in ``pool`` (or in this process); the bar advances as runs finish."""
    runs = []

    def done(row):
        runs.append(row)
        bar.set_postfix_str(f"seed {row['seed']} lambda {row['regap_weight']:g}: gap {row['final_gap']:.2f}, "
                            f"unsafe with an image {row['unsafe_rate']['image']:.2f}")
        bar.update(1)

    todo = [(s, w) for s in seeds for w in weights]
    if pool is None:
        for s, w in todo:
            bar.set_postfix_str(f"seed {s} lambda {w:g}")
            done(_task(str(root), settings, data, s, w, threads))
    else:
        from concurrent.futures import as_completed

        for f in as_completed([pool.submit(_task, str(root), settings, data, s, w, threads) for s, w in todo]):
            done(f.result())
    return sorted(runs, key=lambda r: (r["seed"], r["regap_weight"]))


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (every size and step that differs from its default)."""
    from .pipeline import Settings

    parts = ["regap-fast reproduce", "--out", str(args.out)] + (["--select-stage2"] if args.select_stage2 else [])
    if args.quick and args.seeds == QUICK_SEEDS:
        parts.append("--quick")
    elif args.seeds != DEFAULT_SEEDS:
        parts += ["--seeds", str(args.seeds)]
    if args.regap_weight != [DEFAULT_WEIGHT]:
        parts += ["--regap-weight", *(f"{w:g}" for w in args.regap_weight)]
    if args.first_seed:
        parts += ["--first-seed", str(args.first_seed)]
    if args.data_seed:
        parts += ["--data-seed", str(args.data_seed)]
    for f in dataclasses.fields(Settings):
        value, flag = getattr(args, f.name), _flag(f.name)
        if value == f.default:
            continue
        if isinstance(f.default, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        else:
            parts += [flag, f"{value:g}" if isinstance(f.default, float) else str(value)]
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..eval import compare, write_compare
    from . import pipeline
    from .report import build_report, format_report, plot_report
    from .selection import stage2_note

    if args.seeds is None:
        args.seeds = QUICK_SEEDS if args.quick else DEFAULT_SEEDS
    if args.seeds < 1:
        print("regap-fast reproduce: error: --seeds must be >= 1", file=sys.stderr)
        return 2
    if any(w < 0 for w in args.regap_weight):
        print("regap-fast reproduce: error: --regap-weight must be >= 0", file=sys.stderr)
        return 2
    _quiet(None)
    t0 = time.perf_counter()
    out = Path(args.out)
    try:
        settings = _settings(args)
        if not 0.0 <= settings.stage2_text_share < 1.0:
            raise ValueError(f"--stage2-text-share must be in [0, 1), got {settings.stage2_text_share:g}")
        if settings.stage2_projector_lr < 0:
            raise ValueError("--stage2-projector-lr must be >= 0 (0: --stage2-lr), got "
                             f"{settings.stage2_projector_lr:g}")
    except ValueError as exc:
        print(f"regap-fast reproduce: error: {exc}", file=sys.stderr)
        return 2
    weights = sorted({0.0, *args.regap_weight})
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    cuda = torch.cuda.is_available()
    cores = os.cpu_count() or 1
    parallel = len(seeds) if args.select_stage2 else len(seeds) * len(weights)  # what can run side by side
    jobs = args.jobs or (1 if cuda else max(1, min(cores, parallel)))
    threads = args.threads or (None if cuda else max(1, cores // jobs))
    if not cuda:  # the LM's pretraining runs alone: all cores unless --threads says otherwise
        torch.set_num_threads(args.threads or cores)
    if args.select_stage2:
        from .selection import run_selection

        run_selection(out, settings, args.data_seed, seeds, jobs, threads, _command(args))
        return 0
    for sub in ("runs", "compare"):
        shutil.rmtree(out / sub, ignore_errors=True)  # every run starts from scratch (deterministic)
    data = pipeline.prepare_data(out / "data", settings, args.data_seed)
    print(f"regap-fast reproduce: {len(seeds)} seed{'s' * (len(seeds) != 1)} x lambda "
          f"{', '.join(f'{w:g}' for w in weights)}; "
          f"{'cuda' if cuda else f'cpu, {jobs} process(es) x {threads} thread(s)'}; "
          f"{len(data.harmful)} held-out harmful requests x 4 conditions", flush=True)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(seeds) * len(weights), desc="reproduce", unit="run", disable=None if args.progress else True,
               dynamic_ncols=True, file=sys.stderr)
    bar.set_postfix_str(f"pretraining the LM ({settings.lm_steps} steps, text only)")
    pool = _workers(jobs, threads)
    try:
        t_lm = time.perf_counter()
        lm = pipeline.pretrain_lm(pipeline.pretrain_dir(out / "runs"), settings, data, args.data_seed)
        lm = {"final_lm_loss": lm["final_lm_loss"], "seconds": time.perf_counter() - t_lm}
        runs = _run_all(out / "runs", settings, data, seeds, weights, pool, threads, bar)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    bar.close()

    report = build_report(runs)
    # the same correlation through `regap-fast compare` (it reads each run's gap.json and safety.json)
    cmp = compare([r["dir"] for r in runs], safety_metric="benchmark:" + pipeline.IMAGE_KIND)
    write_compare(cmp, out / "compare")
    seconds = time.perf_counter() - t0
    summary = {"seconds": seconds, "runs": runs, "seeds": seeds, "regap_weights": weights,
               "settings": settings.to_dict(), "data_seed": args.data_seed, "n_heldout_harmful": len(data.harmful),
               "device": "cuda" if cuda else f"cpu ({cores} cores, {jobs} processes x {threads} threads)",
               "pretrained_lm": lm, "report": report,
               "compare": {"safety_metric": cmp["safety_metric"], "correlation": cmp["correlation"]},
               "command": _command(args)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = stage2_note(settings) + "\n\n" + format_report(report, runs, len(data.harmful))
    (out / "report.md").write_text(text + "\n")
    plot_report(report, runs, out / "reproduce.png",
                title=f"REGAP in miniature: {len(seeds)} seeds, stage 1 lambda "
                      f"{' vs '.join(f'{w:g}' for w in weights)}")
    print()
    print(text)
    print(f"\nwrote {out / 'summary.json'}, {out / 'report.md'}, {out / 'reproduce.png'}, {out / 'compare'} "
          f"({seconds:.0f} s in all)")
    return 0
