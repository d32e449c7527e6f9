"""What a training run tells its user: the plan at the start (a few log lines), the summary at the end
(OUT/summary.json, and a few lines for a person)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .checkpoint import Counters
from .config import TrainConfig
from .metrics import plot_runs, read_jsonl

log = logging.getLogger("regap_fast.train")


@dataclass
class Facts:
    """What setting up the run found out: its log and its summary report them."""
    arch: str
    attention: str  # which attention kernels run
    trainable: str  # which parameters train, per component (``describe_trainable``)
    trainable_parameters: int
    prompt_format: str  # plain or chat
    bf16: bool
    train_records: int
    held_out_records: int
    malformed_records: int  # dropped when the data file was read
    unreadable_held_out_records: int  # held out, but their image or text would not load


def _n(count: int, noun: str) -> str:
    """'1 process', '2 processes', '1 record', '3 records'."""
    plural = noun + ("es" if noun.endswith(("s", "ch")) else "s")
    return f"{count:,} {noun if count == 1 else plural}"


def log_plan(cfg: TrainConfig, f: Facts, steps: int, processes: int, accum: int) -> None:
    recipe = f", recipe {cfg.recipe}" if cfg.recipe else ""
    log.info("%s%s, stage %d (%s format%s), %s; attention: %s", f.arch, recipe, cfg.stage, f.prompt_format,
             ", LoRA" if cfg.lora else "", "bf16 autocast" if f.bf16 else "fp32", f.attention)
    log.info("data: %s for training, %s held out (%d malformed dropped)", _n(f.train_records, "record"),
             _n(f.held_out_records, "record"), f.malformed_records)
    projector_lr = f", projector {cfg.mm_projector_lr:.2g}" if cfg.mm_projector_lr is not None else ""
    log.info("%s x %s (%s x %s of %d); lr %.2g%s (warm-up %g, weight decay %g); lambda %g%s",
             _n(steps, "step"), _n(cfg.global_batch_size, "sample"), _n(processes, "process"),
             _n(accum, "micro-batch"), cfg.micro_batch_size, cfg.peak_lr(), projector_lr, cfg.warmup_ratio,
             cfg.weight_decay, cfg.regap_weight, " (squared distance)" if cfg.regap_squared else "")
    log.info("%s trainable parameters: %s", f"{f.trainable_parameters:,}", f.trainable)


def log_measurement(step: int, total: int, rec: dict, held: dict) -> None:
    log.info("step %d/%d: loss %.4f, gap %s | held-out: loss %.4f, gap %.4f | %.0f tokens/s", step, total,
             rec["lm_loss"], "-" if rec["gap"] is None else f"{rec['gap']:.4f}", held["eval_lm_loss"],
             held["eval_gap"], rec["tokens_per_s"])


def read_final_eval(path: Path) -> dict:
    """The last held-out loss and gap in a metrics.jsonl (nothing when nothing was measured)."""
    rows = [r for r in read_jsonl(path) if "eval_gap" in r]
    return {"final_gap": rows[-1]["eval_gap"], "final_lm_loss": rows[-1]["eval_lm_loss"]} if rows else {}


def summarize(cfg: TrainConfig, f: Facts, counters: Counters, steps: int, total: int, out: Path,
              final_eval: dict, model: Optional[Path]) -> dict:
    """The run in one JSON object: what summary.json holds and ``train`` returns."""
    seconds = counters.train_seconds
    initial = counters.initial_eval or {}
    summary = {"steps": steps, "total_steps": total, "train_seconds": seconds,
               "steps_per_second": steps / seconds if seconds else None, "regap_weight": cfg.regap_weight,
               "attention": f.attention, "skipped_records": counters.skipped, "arch": f.arch,
               "recipe": cfg.recipe, "trainable_parameters": f.trainable_parameters, "trainable": f.trainable,
               "malformed_records": f.malformed_records, "unreadable_held_out_records": f.unreadable_held_out_records,
               "initial_gap": initial.get("eval_gap"), "initial_lm_loss": initial.get("eval_lm_loss"),
               "final_gap": None, "final_lm_loss": None, "out": str(out),
               "model": str(model) if model is not None else None}
    return {**summary, **final_eval}


def write_summary(summary: dict, cfg: TrainConfig, out: Path) -> None:
    """OUT/summary.json and, with --plot, OUT/metrics.png (rank 0 only)."""
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if cfg.plot:
        plot_runs({f"lambda={cfg.regap_weight:g}": out / "metrics.jsonl"}, out / "metrics.png")
    log.info("done: %d steps in %.0f s; summary in %s", summary["steps"], summary["train_seconds"],
             out / "summary.json")


def format_summary(summary: dict) -> str:
    """The end of a run in a few lines, for a person (summary.json keeps everything)."""
    def number(x):
        return "-" if x is None else f"{x:.4f}"
    rate = f" ({summary['steps_per_second']:.1f} steps/s)" if summary.get("steps_per_second") else ""
    lines = [f"trained {summary['steps']} of {summary['total_steps']} steps in {summary['train_seconds']:.0f} s{rate}"]
    if summary.get("final_gap") is not None:
        lines.append(f"held-out: caption loss {number(summary['initial_lm_loss'])} -> "
                     f"{number(summary['final_lm_loss'])}, gap {number(summary['initial_gap'])} -> "
                     f"{number(summary['final_gap'])}")
    bad = summary.get("skipped_records", 0) + summary.get("malformed_records", 0)
    if bad:
        lines.append(f"bad records: {summary['malformed_records']} malformed (dropped), "
                     f"{summary['skipped_records']} skipped when drawn")
    where = summary.get("model")
    lines.append(f"model: {where}  (regap_fast.model.load_model({where!r}))" if where else
                 "model: not exported (the run stopped early or --no-save-model); checkpoints under "
                 f"{Path(summary['out']) / 'checkpoints'}")
    lines.append(f"full record: {Path(summary['out']) / 'summary.json'}")
    return "\n".join(lines)
