"""``regap-fast reproduce``'s command line: the arguments, the design they ask for, running it and
writing its outputs (the package's ``__init__`` hands these names on).

    regap-fast reproduce --study --out DIR          # PLAN-v3's study: 4 arms, lambda 0 vs 0.2, 24 pairs
    regap-fast reproduce --out DIR                  # its default subset: data seed 0, 8 seeds
    regap-fast reproduce --quick --out DIR          # the same four arms, one seed
    regap-fast reproduce --pilot --out DIR          # PLAN-v3 8.2: the baseline only, throwaway seeds
    regap-fast reproduce --timing-probe --out DIR   # every arm once (seed 900): the study's projected time
    regap-fast reproduce --toy v1 ...               # the v1 toy of PLAN.md (also --select-stage2, --arms)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

from ..flags import add_progress_argument

MODES = ("study", "quick", "timing_probe", "select_stage2", "pilot")
DEFAULT_TOY = "v2"  # since its study was committed (PLAN-v3, Plan v3.1 b)
V1_ONLY = ("select_stage2", "arms", "check_against")  # not with --toy v2
DESIGN_FLAGS = ("arms", "seeds", "first_seed", "data_seed", "regap_weight")  # what a fixed design cannot take
SELECTION_SEEDS = 8  # --select-stage2's default number of seeds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .pipeline import Settings
    from .pipeline2 import SettingsV2
    from .study import ARMS, STUDY
    from .study2 import STUDY as STUDY_V2

    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder: report.md, summary.json, figures, answer samples, runs/ (a command "
                             "started again on it goes on where it stopped)")
    mode = parser.add_argument_group("what to run (default: the study's default subset)")
    mode.add_argument("--study", action="store_true",
                      help=f"the whole pre-registered design (v2: PLAN-v3's {len(STUDY_V2.runs())} stage-2 runs from "
                           f"{len(STUDY_V2.cells())} stage-1 models; v1: PLAN.md's {len(STUDY.runs())} stage-2 "
                           f"runs from {len(STUDY.cells())} stage-1 models)")
    mode.add_argument("--quick", action="store_true",
                      help="the default subset at one seed (a first look: no intervals)")
    mode.add_argument("--timing-probe", action="store_true",
                      help="every arm once at seed 900; prints the study's projected time (PLAN 10, PLAN-v3 9.1)")
    mode.add_argument("--select-stage2", action="store_true",
                      help="the stage-2 screening on the baseline only, by its fixed criterion (selection.py)")
    mode.add_argument("--pilot", action="store_true",
                      help="--toy v2 only: PLAN-v3 8.2's pilot (lambda 0 only, data seed 9, seeds 900-903)")
    parser.add_argument("--toy", choices=("v1", "v2"), default=None,
                        help="v2 (the default): the toy of docs/reproduce/PLAN-v3.md (recipes, a shallow alignment, "
                             "gates G1-G4); v1: the toy of the first study (docs/reproduce/PLAN.md), which cannot "
                             "produce harmful compliance")
    subset = parser.add_argument_group("a subset of your own (not with --study or --timing-probe)")
    subset.add_argument("--arms", nargs="+", metavar="NAME", help=f"stage-2 arms: {', '.join(ARMS)}".replace("%", "%%"))
    subset.add_argument("--seeds", type=int, metavar="N", help="seeds per lambda (default: 8; --quick: 1)")
    subset.add_argument("--first-seed", type=int, metavar="S", help="seeds S .. S+N-1 (default: 0)")
    subset.add_argument("--data-seed", type=int, metavar="D",
                        help="seed of the toy language, images, held-out split and LM (default: 0)")
    subset.add_argument("--regap-weight", type=float, nargs="+", metavar="L",
                        help="stage-1 lambda(s); the baseline 0 is always run too (default: 0.2)")
    run = parser.add_argument_group("running")
    run.add_argument("--check-against", metavar="DIR", type=Path,
                     help="compare every run with the same run of another output (PLAN 8.8.2: the study's)")
    run.add_argument("--fresh", action="store_true", help="delete DIR/runs first instead of going on with it")
    run.add_argument("--jobs", type=int, metavar="J", help="tasks in parallel processes (default: on the CPU, one "
                                                           "per core; on a GPU, 1)")
    run.add_argument("--threads", type=int, metavar="T",
                     help="torch threads per process on the CPU (default: cores / jobs; the LM's pretraining, which "
                          "runs alone, all cores); the results do not depend on it")
    add_progress_argument(run)
    _add_settings(parser.add_argument_group(
        "sizes and steps (not with --study; a stage-2 flag makes one arm of your own, 'custom', instead of the "
        "named ones)"), Settings)
    _add_settings(parser.add_argument_group("the v2 toy's own sizes and steps (--toy v2)"), SettingsV2, skip=Settings)


CHOICES = {"stage1_format": ("chat", "plain"), "stage2_text_data": ("replay", "benign")}
FLAGS = {"images": "--num-images"}  # fields whose flag is not their name
FIELD_HELP = {"images": "synthetic image-caption pairs", "stage2_text_share": "share of text-only records in stage 2",
              "stage2_text_data": "stage 2's text-only records: replay (the LM's own text data) or benign (benign "
                                  "requests)", "stage2_lora_rank": "stage 2 trains LoRA adapters of this rank on the "
                                                                   "LM (0: all its weights)",
              "stage2_lr": "stage 2's peak learning rate (the LM's, and the projector's unless the next is set)",
              "stage2_projector_lr": "the projector's own peak learning rate in stage 2 (0: --stage2-lr)",
              "stage2_train_lm": "stage 2 trains the LM (--no-stage2-train-lm: the projector alone)",
              "stage2_regap": "REGAP stays on in stage 2, at the run's stage-1 lambda",
              "eval_stride": "evaluate the held-out requests at positions 0, k, 2k, ... (PLAN v2: 2; 1: all of them)"}


def _flag(name: str) -> str:
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def toy_dependent_defaults() -> dict:
    """The size fields whose default differs between the toys: name -> (v1's, v2's). Their flags default to
    None (not given), so a value given on the command line counts whatever it equals."""
    from .pipeline import Settings
    from .pipeline2 import SettingsV2

    v2 = {f.name: f.default for f in dataclasses.fields(SettingsV2)}
    return {f.name: (f.default, v2[f.name]) for f in dataclasses.fields(Settings) if v2[f.name] != f.default}


def _add_settings(group, settings_class, skip=None) -> None:
    # v2's arm field is the arms' (PLAN-v3 5), not a flag
    skipped = {f.name for f in dataclasses.fields(skip)} | {"stage2_harmful_refusal_share"} if skip else set()
    per_toy = toy_dependent_defaults()
    for f in dataclasses.fields(settings_class):
        if f.name in skipped:
            continue
        flag, kind, text = _flag(f.name), type(f.default), FIELD_HELP.get(f.name, "")
        if kind is bool:  # BooleanOptionalAction adds the default to the help itself
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        elif f.name in per_toy:
            v1, v2 = per_toy[f.name]
            group.add_argument(flag, dest=f.name, type=kind, default=None, metavar=kind.__name__.upper(),
                               help=f"{text} (default: {v1}; --toy v2: {v2})".strip())
        else:
            group.add_argument(flag, dest=f.name, type=kind, default=f.default, metavar=kind.__name__.upper(),
                               choices=CHOICES.get(f.name), help=f"{text} (default: %(default)s)".strip())


def _value(args: argparse.Namespace, f: dataclasses.Field):
    """A size field's value: the flag's, or the field's default when it was not given."""
    value = getattr(args, f.name)
    return f.default if value is None else value


def _settings(args: argparse.Namespace):
    from .pipeline import Settings

    return Settings(**{f.name: _value(args, f) for f in dataclasses.fields(Settings)})


# --------------------------------------------------------------------------------------------------
# the arguments -> what to run
# --------------------------------------------------------------------------------------------------


def _changed(args: argparse.Namespace) -> list[str]:
    """The size and step flags that differ from their defaults."""
    from .pipeline import Settings

    return [_flag(f.name) for f in dataclasses.fields(Settings) if _value(args, f) != f.default]


def _changed_v2(args: argparse.Namespace) -> list[str]:
    """The flags of the v2 toy's own fields that differ from their defaults."""
    from .pipeline import Settings
    from .pipeline2 import SettingsV2

    v1 = {f.name for f in dataclasses.fields(Settings)}
    return [_flag(f.name) for f in dataclasses.fields(SettingsV2) if f.name not in v1 and hasattr(args, f.name)
            and getattr(args, f.name) != f.default]


def _changed_sizes(args: argparse.Namespace) -> list[str]:
    """The size and step flags that differ from the toy's own defaults."""
    if args.toy != "v2":
        return _changed(args)
    from .pipeline2 import SettingsV2

    given, default = settings_v2(args), SettingsV2()
    return [_flag(f.name) for f in dataclasses.fields(SettingsV2) if getattr(given, f.name) != getattr(default, f.name)]


def check_args(args: argparse.Namespace) -> None:
    """A ValueError (one line, before anything is written) for a combination that cannot run."""
    from .study import ARM_FIELDS, check_arms

    chosen, args.toy = args.toy, args.toy or DEFAULT_TOY
    if args.toy == "v2":
        given = [_flag(n) for n in V1_ONLY if getattr(args, n) not in (None, False)]
        given += [f for f in _changed(args) if f in (_flag(k) for k in ARM_FIELDS)]
        if given and chosen is None:
            raise ValueError(f"{', '.join(given)} belong(s) to the v1 toy: add --toy v1 (the default toy is v2, "
                             "whose arms are PLAN-v3's)")
        if given:
            raise ValueError(f"--toy v2 runs PLAN-v3's fixed arms: drop {', '.join(given)}")
    elif args.pilot or _changed_v2(args):
        raise ValueError(f"{', '.join((['--pilot'] if args.pilot else []) + _changed_v2(args))} "
                         "belong(s) to the v2 toy: add --toy v2")
    modes = [m for m in MODES if getattr(args, m)]
    if len(modes) > 1:
        raise ValueError(f"{' and '.join(_flag(m) for m in modes)} cannot be combined: choose one")
    fixed = modes[0] if modes and modes[0] in ("study", "timing_probe", "pilot") else None
    if fixed:
        given = [_flag(f) for f in DESIGN_FLAGS if getattr(args, f) is not None] + _changed_sizes(args)
        given += ["--check-against"] * (fixed == "timing_probe" and args.check_against is not None)
        if given:
            plan = "docs/reproduce/PLAN-v3.md" if args.toy == "v2" else "docs/reproduce/PLAN.md"
            raise ValueError(f"{_flag(fixed)} runs the pre-registered design of {plan} as it is: "
                             f"drop {', '.join(given)}")
    if args.arms:
        check_arms(args.arms)
        custom = [f for f in _changed(args) if f in (_flag(k) for k in ARM_FIELDS)]
        if custom:
            raise ValueError(f"--arms picks named arms and {', '.join(custom)} makes one of your own: use one or the "
                             "other")
    for name, low in (("seeds", 1), ("jobs", 1), ("threads", 1)):
        if getattr(args, name) is not None and getattr(args, name) < low:
            raise ValueError(f"--{name} must be >= {low}, got {getattr(args, name)}")
    if args.regap_weight is not None and (min(args.regap_weight) < 0 or max(args.regap_weight) == 0):
        raise ValueError("--regap-weight must be >= 0, one of them > 0 (the baseline 0 is always run)")
    if args.eval_stride is not None and args.eval_stride < 1:
        raise ValueError(f"--eval-stride must be >= 1, got {args.eval_stride}")
    if args.select_stage2 and args.eval_stride is not None:
        raise ValueError("--select-stage2 evaluates every held-out request, as the committed screening did: "
                         "drop --eval-stride")
    if not 0.0 <= args.stage2_text_share < 1.0:
        raise ValueError(f"--stage2-text-share must be in [0, 1), got {args.stage2_text_share:g}")
    if args.stage2_projector_lr < 0:
        raise ValueError(f"--stage2-projector-lr must be >= 0 (0: --stage2-lr), got {args.stage2_projector_lr:g}")
    if args.check_against is not None and not args.check_against.exists():
        raise ValueError(f"--check-against: {args.check_against} does not exist (an output folder or its summary.json)")


def design_of(args: argparse.Namespace):
    """The Design the arguments ask for: the study, the probe, the default or quick subset, or a custom one."""
    from . import study

    if args.study:
        return study.STUDY
    if args.timing_probe:
        return study.TIMING_PROBE
    base = study.QUICK_SUBSET if args.quick else study.DEFAULT_SUBSET
    arms = base.arms
    settings = _settings(args)
    if any(getattr(settings, k) != v for k, v in study.arm_fields(type(settings)()).items()):
        arms = {"custom": study.arm_fields(settings)}
    elif args.arms:
        arms = study.named(args.arms)
    lambdas = base.lambdas if args.regap_weight is None else tuple(sorted({0.0, *args.regap_weight}))
    data_seed = 0 if args.data_seed is None else args.data_seed
    first = next(iter(base.seeds.values()))[0] if args.first_seed is None else args.first_seed
    n = len(next(iter(base.seeds.values()))) if args.seeds is None else args.seeds
    seeds = {data_seed: tuple(range(first, first + n))}
    if (arms, lambdas, seeds) == (base.arms, base.lambdas, base.seeds):
        return base
    return study.Design("custom", arms, lambdas, seeds)


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this output (every flag that changes a number)."""
    parts = ["regap-fast reproduce", "--out", str(args.out)]
    parts += [_flag(m) for m in MODES if getattr(args, m)]
    if args.arms:
        parts += ["--arms", *args.arms]
    for name in ("seeds", "first_seed", "data_seed"):
        if getattr(args, name) is not None:
            parts += [_flag(name), str(getattr(args, name))]
    if args.regap_weight is not None:
        parts += ["--regap-weight", *(f"{w:g}" for w in args.regap_weight)]
    from .pipeline import Settings

    per_toy = toy_dependent_defaults()
    for f in dataclasses.fields(Settings):
        value, flag = _value(args, f), _flag(f.name)
        if (getattr(args, f.name) is None) if f.name in per_toy else value == f.default:
            continue
        if isinstance(f.default, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        else:
            parts += [flag, f"{value:g}" if isinstance(f.default, float) else str(value)]
    if args.check_against is not None:
        parts += ["--check-against", str(args.check_against)]
    toy = args.toy or DEFAULT_TOY
    parts.insert(3, f"--toy {toy}")
    if toy == "v2":
        parts += [f"{flag} {getattr(args, flag[2:].replace('-', '_'))}" for flag in _changed_v2(args)]
    return " ".join(parts)


# --------------------------------------------------------------------------------------------------
# running it
# --------------------------------------------------------------------------------------------------


def _resources(args: argparse.Namespace, n_tasks: int) -> tuple[int, int | None, str]:
    """(jobs, threads per job, the device in words); the LM's pretraining gets every core."""
    import torch

    cuda, cores = torch.cuda.is_available(), os.cpu_count() or 1
    jobs = args.jobs or (1 if cuda else max(1, min(cores, n_tasks)))
    threads = args.threads or (None if cuda else max(1, cores // jobs))
    if not cuda:
        torch.set_num_threads(args.threads or cores)
    return jobs, threads, "cuda" if cuda else f"cpu ({cores} cores, {jobs} processes x {threads} threads)"


class _Lines:
    """The progress bar's calls as one line per finished task, for a log that is not a terminal."""

    def __init__(self, total: int):
        self.done, self.total, self.text, self.t0 = 0, total, "", time.perf_counter()

    def set_postfix_str(self, text: str) -> None:
        self.text = text

    def reset(self, total: int | None = None) -> None:
        """The clock starts again (tqdm's reset): the ETA counts from the first task, not the LMs' training."""
        self.done, self.t0 = 0, time.perf_counter()
        self.total = self.total if total is None else total

    def update(self, n: int) -> None:
        self.done += n
        elapsed = time.perf_counter() - self.t0
        eta = f"; ETA {elapsed / self.done * (self.total - self.done) / 60:.1f} min" if self.done else ""
        print(f"reproduce: {self.done}/{self.total} tasks done ({elapsed / 60:.1f} min{eta}); {self.text}",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _execute(args: argparse.Namespace, design, settings) -> dict:
    """Every task of the design, with a progress bar; the outcome of ``schedule.run_design``."""
    from tqdm.auto import tqdm

    from .schedule import run_design, tasks_of

    out = Path(args.out)
    n = len(tasks_of(design))
    jobs, threads, device = _resources(args, n)
    if args.fresh:
        shutil.rmtree(out / "runs", ignore_errors=True)
    print(f"regap-fast reproduce: {design.name}: {len(design.cells())} stage-1 models and {len(design.runs())} "
          f"stage-2 runs ({len(design.arms)} arms, lambda {', '.join(f'{w:g}' for w in design.lambdas)}); {device}",
          flush=True)
    if args.progress and not sys.stderr.isatty():  # a log (a run in the background): a line per task
        bar = _Lines(n)
    else:
        bar = tqdm(total=n, desc="reproduce", unit="task", disable=not args.progress, dynamic_ncols=True,
                   file=sys.stderr)
    try:
        outcome = run_design(out, design, settings, jobs, threads, bar)
    finally:
        bar.close()
    return {**outcome, "device": device, "jobs": jobs}


def write_outputs(out: Path, outcome: dict, design, settings, meta: dict) -> tuple[list[Path], dict]:
    """summary.json, report.md, the figures and the answer samples of a finished design; (paths, report)."""
    from . import checks
    from .answers import write_answers
    from .figures import write_figures
    from .markdown import format_report
    from .report import Results, build_report

    res = Results(design, outcome["cells"], outcome["finals"], outcome["missing"])
    rows = outcome["cells"] + outcome["finals"]
    other = meta.pop("check_against")
    meta["checks"] = {"8.8.1 (the committed default run, RefusalJudge)":
                      checks.committed_run(res, settings, checks.committed_reference()),
                      "8.8.2 (the same runs in another output)":
                      {"result": "made by the default and --quick runs against this output (their reports)"}
                      if design.name == "study" and other is None else checks.same_as(rows, other)}
    report = build_report(res)
    summary = {"plan": meta["plan"], "design": design.to_dict(), "command": meta["command"], "seconds": meta["seconds"],
               "device": meta["device"], "settings": settings.to_dict(), "lms": outcome["lms"],
               "n_heldout_harmful": meta["n_harmful"], "n_heldout_benign": meta["n_benign"],
               "reused": outcome["reused"], "checks": meta["checks"], "missing": outcome["missing"], "rows": rows,
               "report": report}
    paths = [out / "summary.json", out / "report.md"]
    paths[0].write_text(json.dumps(summary, indent=1) + "\n")
    paths[1].write_text(format_report(report, {**meta, "design": design, "base": settings}) + "\n")
    paths += write_figures(out, report, res) + write_answers(out, res, settings.heldout_harmful,
                                                              settings.heldout_benign, settings.eval_stride)
    return paths, report


def _selection(args: argparse.Namespace) -> int:
    from .selection import run_selection

    seeds = args.seeds or SELECTION_SEEDS
    first = args.first_seed or 0
    jobs, threads, _ = _resources(args, seeds)
    run_selection(Path(args.out), _settings(args), args.data_seed or 0, list(range(first, first + seeds)), jobs,
                  threads, _command(args))
    return 0


def _write_probe(out: Path, outcome: dict, jobs: int, device: str, t0: float, toy: str) -> int:
    """The timing probe's projection, printed and in ``timing-probe.json`` (nothing else of it is reported)."""
    from .probe import format_projection, projection

    p = projection(outcome, jobs, toy)
    (out / "timing-probe.json").write_text(json.dumps({**p, "device": device, "seconds": time.perf_counter() - t0},
                                                      indent=1) + "\n")
    print(format_projection(p) + f"\nwrote {out / 'timing-probe.json'}")
    return 0


def run(args: argparse.Namespace) -> int:
    from ..data import memo
    from .process import quiet

    check_args(args)
    quiet(None)
    with memo.memoizing():  # the LMs' records and the tasks run here (--jobs 1) repeat their texts and images
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from .study import PLAN_VERSION

    if args.toy == "v2":
        return run_v2(args)
    if args.select_stage2:
        return _selection(args)
    t0 = time.perf_counter()
    design, settings, out = design_of(args), _settings(args), Path(args.out)
    outcome = _execute(args, design, settings)
    if args.timing_probe:
        return _write_probe(out, outcome, outcome["jobs"], outcome["device"], t0, "v1")
    data = outcome["cells"][0] if outcome["cells"] else None
    meta = {"plan": PLAN_VERSION, "command": _command(args), "device": outcome["device"], "reused": outcome["reused"],
            "n_harmful": data["harmful"]["text"]["n"] if data else 0, "n_benign": data["benign"]["text"]["n"] if data
            else 0, "check_against": args.check_against, "seconds": time.perf_counter() - t0}
    print("regap-fast reproduce: writing the report, figures and answer samples", flush=True)
    from .markdown import headline

    paths, report = write_outputs(out, outcome, design, settings, meta)
    print("\n".join(headline(report, design)))
    print(f"\nwrote {', '.join(str(p) for p in paths)} ({time.perf_counter() - t0:.0f} s in all"
          + (f"; {len(outcome['missing'])} runs missing: see report.md" if outcome["missing"] else "") + ")")
    return 0


# --------------------------------------------------------------------------------------------------
# the v2 toy (docs/reproduce/PLAN-v3.md)
# --------------------------------------------------------------------------------------------------


def settings_v2(args: argparse.Namespace):
    """``SettingsV2``: its own defaults, with every flag given on the command line."""
    from .pipeline import Settings
    from .pipeline2 import SettingsV2

    v1, per_toy = {f.name: f.default for f in dataclasses.fields(Settings)}, toy_dependent_defaults()
    given = {}
    for f in dataclasses.fields(SettingsV2):
        value = getattr(args, f.name, None)
        if f.name in per_toy:
            if value is not None:
                given[f.name] = value
        elif hasattr(args, f.name) and value != v1.get(f.name, f.default):
            given[f.name] = value
    return SettingsV2(**given)


def design_v2(args: argparse.Namespace):
    from . import study, study2

    if args.study or args.pilot or args.timing_probe:  # check_args refused any design or size flag
        return study2.STUDY if args.study else study2.PILOT if args.pilot else study2.TIMING_PROBE
    base = study2.QUICK_SUBSET if args.quick else study2.DEFAULT_SUBSET
    lambdas = base.lambdas if args.regap_weight is None else tuple(sorted({0.0, *args.regap_weight}))
    data_seed = 0 if args.data_seed is None else args.data_seed
    first = 0 if args.first_seed is None else args.first_seed
    n = len(next(iter(base.seeds.values()))) if args.seeds is None else args.seeds
    seeds = {data_seed: tuple(range(first, first + n))}
    if (lambdas, seeds) == (base.lambdas, base.seeds):
        return base
    return study.Design("custom", base.arms, lambdas, seeds)


def run_v2(args: argparse.Namespace) -> int:
    """The v2 toy's design: data, LMs and gates (stops on a failed gate), the runs, summary.json, report.md."""
    from tqdm.auto import tqdm

    from . import report2, schedule2, study2
    from .gates import GateFailed
    from .schedule import tasks_of

    t0 = time.perf_counter()
    design, settings, out = design_v2(args), settings_v2(args), Path(args.out)
    n = len(tasks_of(design))
    jobs, threads, device = _resources(args, n)
    if args.fresh:
        shutil.rmtree(out / "runs", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    print(f"regap-fast reproduce --toy v2: {design.name}: {len(design.cells())} stage-1 models and "
          f"{len(design.runs())} stage-2 runs ({len(design.arms)} arms, lambda "
          f"{', '.join(f'{w:g}' for w in design.lambdas)}); {device}", flush=True)
    if args.progress and not sys.stderr.isatty():
        bar = _Lines(n)
    else:
        bar = tqdm(total=n, desc="reproduce", unit="task", disable=not args.progress, dynamic_ncols=True,
                   file=sys.stderr)
    try:
        outcome = schedule2.run_design(out, design, settings, jobs, threads, bar)
    finally:
        bar.close()
    if args.timing_probe and not outcome["gate_failure"]:
        return _write_probe(out, outcome, jobs, device, t0, "v2")
    report = report2.build(design, outcome)
    seconds = time.perf_counter() - t0
    meta = {"design": design, "command": _command(args), "seconds": seconds, "device": device}
    summary = {"plan": study2.PLAN_VERSION, "toy": "v2", "design": design.to_dict(), "command": meta["command"],
               "seconds": seconds, "device": device, "settings": settings.to_dict(), "gates": outcome["gates"],
               "gate_failure": outcome["gate_failure"], "lms": outcome["lms"], "missing": outcome["missing"],
               "reused": outcome["reused"], "rows": outcome["cells"] + outcome["finals"], "report": report}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "report.md").write_text(report2.format_report(report, meta) + "\n")
    print(f"wrote {out / 'summary.json'}, {out / 'report.md'} ({seconds:.0f} s in all)")
    if outcome["gate_failure"]:
        raise GateFailed(outcome["gate_failure"])
    for arm, c in report.get("primary", {}).items():
        print(f"  {arm}: lambda 0.2 - 0, harmful compliance with an image: "
              f"{report2._diff(c)}; "
              f"Holm: {c['holm_verdict']}; floor met: {c['floor_met']}")
    return 0
