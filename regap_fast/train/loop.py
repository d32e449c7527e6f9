"""The training loop: LLaVA stage 1 / stage 2 with REGAP. ``setup`` builds a ``Run``; ``train_step`` reads
straight down.

    loss = lm + lambda * gap        (lambda = --regap-weight; 0 skips the gap entirely)

Global-batch exactness. Every optimizer step sees the same global batch, cut into the same
micro-batches, however many processes share it (``StepSampler``). The losses are sums over the
micro-batches divided by the *global* counts (label tokens; samples with an image and a caption),
known before the first backward from the batches themselves. So one process with 8 accumulation
steps and 4 processes with 2 each compute the same gradient, up to the order of floating-point
sums; and a resumed run recomputes exactly the steps it had not finished.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ..data import IGNORE_INDEX, Collator, LlavaDataset, StepSampler, load_records
from ..data.llava import TooManyBadRecords
from ..model import VisionLanguageModel
from .checkpoint import load_checkpoint, readable_like_other_outputs, save_checkpoint
from .config import TrainConfig
from .errors import RunError
from .metrics import MetricsLogger, plot_runs
from .model_setup import MODEL_INPUTS, attention_context, build_model, describe_trainable, setup_stage, wrap
from .model_setup import vision_blocks_to_train  # noqa: F401  (its old home: tests import it from here)
from .preflight import DataSource, Plan, preflight

log = logging.getLogger("regap_fast.train")


# --------------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we started the process group, so we must end it

    def close(self, ok: bool) -> None:
        """End a process group this job started. Without it gloo's threads outlive the interpreter and a
        rank that exits first aborts ("terminate called without an active exception")."""
        if self.owns_group and dist.is_initialized():
            if ok:
                dist.barrier()  # no rank tears down while another still talks to it
            dist.destroy_process_group()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over processes (NCCL reduces device tensors only); returned on the CPU."""
        if self.world > 1:
            t = t.to(self.device)
            dist.all_reduce(t)
        return t.cpu()


def setup_distributed() -> Dist:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: NCCL on GPUs, gloo on the CPU; else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    owns = world > 1 and not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Dist(rank, world, local, torch.device("cuda", local) if cuda else torch.device("cpu"), owns)


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


def held_out_count(n_records: int, eval_samples: int) -> int:
    """Records held out to measure on: ``--eval-samples``, at most a tenth of the set, but at least one
    whenever any is asked for (a tenth of a tiny set rounds to none)."""
    if eval_samples <= 0 or n_records < 2:
        return 0
    return max(1, min(eval_samples, n_records // 10))


def split_records(records: list[dict], cfg: TrainConfig) -> tuple[list[dict], list[dict]]:
    """(training records, held-out records): a seeded draw, the same on every rank and on resume."""
    n_eval = held_out_count(len(records), cfg.eval_samples)
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def prompt_format(cfg: TrainConfig) -> str:
    return cfg.prompt_format if cfg.prompt_format != "auto" else ("plain" if cfg.stage == 1 else "chat")


def synthetic_source(cfg: TrainConfig, out: Path, d: Dist) -> DataSource:
    """The embedded shapes set, written under OUT/data (by rank 0; the others wait, then read it)."""
    from ..data import synthetic

    if d.main:
        synthetic.write_dataset(out / "data", cfg.synthetic_samples, seed=cfg.seed)
    if d.world > 1:
        dist.barrier()
    path = synthetic.write_dataset(out / "data", cfg.synthetic_samples, seed=cfg.seed)
    records, problems = load_records(path)
    return DataSource(records, len(problems), out / "data")


def load_data(cfg: TrainConfig, vlm: VisionLanguageModel, source: DataSource):
    """(train dataset, held-out dataset, held-out records dropped as unreadable). A bad held-out record
    is dropped once here, so that measuring never meets it (the training set replaces bad records as
    it draws them)."""
    from ..data.llava import BadRecord

    encoder = vlm.encoder(prompt_format(cfg), cfg.max_length)

    def dataset(recs, cache=False):
        return LlavaDataset(recs, source.image_folder, vlm.image_transform, encoder, cache=cache)
    train_records, eval_records = split_records(source.records, cfg)
    probe = dataset(eval_records)
    good = []
    for rec in eval_records:
        try:
            probe.load(rec)
            good.append(rec)
        except BadRecord as exc:
            log.warning("held-out record %s dropped: %s", rec["id"], exc)
    return dataset(train_records, cfg.cache_samples), dataset(good, cfg.cache_samples), len(eval_records) - len(good)


def model_inputs(batch: dict, device: torch.device) -> dict:
    return {k: (batch[k].to(device, non_blocking=True) if batch[k] is not None else None) for k in MODEL_INPUTS}


def batch_counts(batch: dict) -> torch.Tensor:
    """[label tokens, samples with image and caption, input tokens, skipped records] of a micro-batch."""
    return torch.tensor([
        (batch["labels"][:, 1:] != IGNORE_INDEX).sum().item(),
        (batch["image_mask"].any(1) & batch["caption_mask"].any(1)).sum().item(),
        batch["attention_mask"].sum().item(),
        len(batch["skipped"])], dtype=torch.float64)


@torch.no_grad()
def evaluate(vlm: VisionLanguageModel, loader: DataLoader, d: Dist, amp) -> dict:
    """Held-out caption loss and gap (every rank computes the same numbers: no communication)."""
    was_training = vlm.training
    vlm.eval()
    sums = torch.zeros(4, dtype=torch.float64)
    for batch in loader:
        with amp():
            out = vlm(**model_inputs(batch, d.device), compute_gap=True)
        sums += torch.tensor([out["lm_loss_sum"].item(), out["num_tokens"].item(),
                              out["gap_sum"].item() if out["gap_sum"] is not None else 0.0,
                              out["num_gap_samples"].item() if out["num_gap_samples"] is not None else 0])
    vlm.train(was_training)
    return {"eval_lm_loss": (sums[0] / sums[1].clamp(min=1)).item(),
            "eval_gap": (sums[2] / sums[3].clamp(min=1)).item()}


# --------------------------------------------------------------------------------------------------
# setup: everything the loop needs, in one small object
# --------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """A set-up run: what the loop reads and updates. ``step`` is the last finished step."""
    cfg: TrainConfig
    d: Dist
    out: Path
    vlm: VisionLanguageModel
    model: torch.nn.Module  # vlm, or vlm wrapped in DDP
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: object
    batches: object  # iterator over micro-batches, ``accum`` per step
    eval_loader: Optional[DataLoader]  # None: nothing held out
    accum: int
    total: int
    step: int
    extra: dict  # counters saved in checkpoints: skipped, tokens, train_seconds, initial_eval
    amp: object
    sdpa_ctx: object
    metrics: MetricsLogger
    facts: dict  # what the summary reports: arch, attention, trainable, malformed, ...


def train(cfg: TrainConfig, plan: Optional[Plan] = None) -> dict:
    """Run (or resume) one training job; returns its summary (also written to OUT/summary.json on rank 0).

    Bad settings raise ``ValueError``/``FileNotFoundError``/``FileExistsError`` before anything is built or
    written; a run that cannot go on raises ``RunError``. ``plan``: ``preflight(cfg)`` when the caller has
    already run it (the command line does, before it imports this module)."""
    plan = plan or preflight(cfg)
    d = setup_distributed()
    ok = False
    try:
        run = setup(plan, d)
        run_steps(run)
        summary = finish(run)
        ok = True
        return summary
    finally:
        d.close(ok)


def setup(plan: Plan, d: Dist) -> Run:
    cfg, ckpt = plan.cfg, plan.checkpoint
    out = Path(cfg.out)
    if cfg.overwrite and d.main:  # a fresh start: nothing of the previous run may be resumed or reused
        for stale in ("checkpoints", "initial_model"):
            shutil.rmtree(out / stale, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.seed)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and d.device.type == "cuda")
    amp = (lambda: torch.autocast(d.device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    # FSDP keeps one dtype per shard group (it casts for compute itself): everything loads in fp32 there
    vlm = build_model(cfg, out, d, resuming=ckpt is not None,
                      dtype=torch.bfloat16 if bf16 and not cfg.fsdp else torch.float32)
    setup_stage(vlm, cfg, bf16)
    vlm.to(d.device)
    source = plan.data or synthetic_source(cfg, out, d)
    train_set, eval_set, unreadable = load_data(cfg, vlm, source)

    accum = cfg.global_batch_size // (cfg.micro_batch_size * d.world)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train_set) / cfg.global_batch_size))
    model = wrap(vlm, cfg, d, bf16)
    params = [p for p in vlm.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg, fused=d.device.type == "cuda" and not cfg.fsdp,
                               projector_params=list(vlm.projector.parameters()))
    scheduler = make_scheduler(optimizer, cfg, total)
    start, extra = 0, {"skipped": 0, "tokens": 0, "train_seconds": 0.0, "initial_eval": None}
    if ckpt is not None:
        start, extra = load_checkpoint(ckpt, vlm, optimizer, scheduler)
        log.info("resumed from %s at step %d", ckpt, start)

    collate = Collator(vlm.tokenizer.pad_token_id)
    loader = make_loader(train_set, collate, cfg, d, accum, start, total)
    eval_loader = DataLoader(eval_set, batch_size=cfg.micro_batch_size, collate_fn=collate) if len(eval_set) else None
    probe = next(iter(eval_loader)) if eval_loader else collate([first_example(train_set)])
    sdpa_ctx, attention = attention_context(vlm, model_inputs(probe, d.device), d, bf16)
    facts = {"arch": vlm.config.arch, "attention": attention, "trainable": describe_trainable(vlm),
             "trainable_parameters": sum(p.numel() for p in params), "format": prompt_format(cfg),
             "malformed": source.malformed, "unreadable_held_out": unreadable, "bf16": bf16,
             "train_records": len(train_set), "held_out_records": len(eval_set)}
    run = Run(cfg, d, out, vlm, model, params, optimizer, scheduler, iter(loader), eval_loader, accum, total, start,
              extra, amp, sdpa_ctx, MetricsLogger(out, enabled=d.main, resume_step=start if ckpt else None,
                                                  tensorboard=cfg.tensorboard), facts)
    if d.main:
        log_plan(run)
    if extra["initial_eval"] is None and eval_loader is not None:
        extra["initial_eval"] = evaluate(vlm, eval_loader, d, amp)
        run.metrics.log({"step": 0, **extra["initial_eval"]})
    return run


def first_example(dataset) -> dict:
    """The first example that loads (what the attention probe runs on when nothing is held out)."""
    try:
        return dataset[0]
    except TooManyBadRecords as exc:  # every record bad
        raise RunError(str(exc).splitlines()[0]) from None


def make_optimizer(params: list, cfg: TrainConfig, fused: bool, projector_params=()) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on biases and norms). With ``--mm-projector-lr`` the
    projector's parameters (``projector_params``) get that peak lr, the rest ``--lr``. The rest's groups
    come first, so the lr the metrics log (group 0's) is ``--lr``'s whenever more than the projector trains."""
    lr = cfg.peak_lr()
    own = {id(p) for p in projector_params} if cfg.mm_projector_lr is not None else set()
    groups = []
    for part, part_lr in ((False, lr), (True, cfg.mm_projector_lr)):
        mine = [p for p in params if (id(p) in own) == part]
        groups += [{"params": [p for p in mine if p.ndim >= 2], "weight_decay": cfg.weight_decay, "lr": part_lr},
                   {"params": [p for p in mine if p.ndim < 2], "weight_decay": 0.0, "lr": part_lr}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999), fused=fused)


def make_loader(train_set, collate, cfg: TrainConfig, d: Dist, accum: int, start: int, total: int) -> DataLoader:
    sampler = StepSampler(len(train_set), cfg.global_batch_size, cfg.micro_batch_size, rank=d.rank,
                          world_size=d.world, seed=cfg.seed, start_step=start, total_steps=total)
    workers = cfg.num_workers
    return DataLoader(train_set, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                      pin_memory=d.device.type == "cuda", persistent_workers=False,
                      prefetch_factor=2 * accum if workers else None)


def _n(count: int, noun: str) -> str:
    """'1 process', '2 processes', '1 record', '3 records'."""
    plural = noun + ("es" if noun.endswith(("s", "ch")) else "s")
    return f"{count:,} {noun if count == 1 else plural}"


def log_plan(run: Run) -> None:
    cfg, f = run.cfg, run.facts
    recipe = f", recipe {cfg.recipe}" if cfg.recipe else ""
    log.info("%s%s, stage %d (%s format%s), %s; attention: %s", f["arch"], recipe, cfg.stage, f["format"],
             ", LoRA" if cfg.lora else "", "bf16 autocast" if f["bf16"] else "fp32", f["attention"])
    log.info("data: %s for training, %s held out (%d malformed dropped)", _n(f["train_records"], "record"),
             _n(f["held_out_records"], "record"), f["malformed"])
    projector_lr = f", projector {cfg.mm_projector_lr:.2g}" if cfg.mm_projector_lr is not None else ""
    log.info("%s x %s (%s x %s of %d); lr %.2g%s (warm-up %g, weight decay %g); lambda %g%s",
             _n(run.total, "step"), _n(cfg.global_batch_size, "sample"), _n(run.d.world, "process"),
             _n(run.accum, "micro-batch"), cfg.micro_batch_size, cfg.peak_lr(), projector_lr, cfg.warmup_ratio,
             cfg.weight_decay,
             cfg.regap_weight, " (squared distance)" if cfg.regap_squared else "")
    log.info("%s trainable parameters: %s", f"{f['trainable_parameters']:,}", f["trainable"])


# --------------------------------------------------------------------------------------------------
# the loop: lr (scheduled) -> micro-steps -> clip -> step -> log -> eval/checkpoint
# --------------------------------------------------------------------------------------------------


def run_steps(run: Run) -> None:
    from tqdm.auto import tqdm

    cfg = run.cfg
    # None: tqdm turns itself off when stderr is not a terminal (logs stay readable)
    bar = tqdm(total=run.total, initial=run.step, disable=None if run.d.main and cfg.progress else True,
               dynamic_ncols=True, unit="step")
    run.model.train()
    for step in range(run.step + 1, run.total + 1):
        rec = train_step(run, step)
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == run.total:
            rec.update(measure(run, step, rec))
        run.metrics.log(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{rec['lm_loss']:.3f}", gap="-" if rec["gap"] is None else f"{rec['gap']:.3f}",
                        tok_s=f"{rec['tokens_per_s']:.0f}", refresh=False)
        run.step = step
        stop = cfg.stop_at_step is not None and step >= cfg.stop_at_step
        if (cfg.save_every and step % cfg.save_every == 0) or step == run.total or stop:
            save_checkpoint(run.out, step, run.vlm, run.optimizer, run.scheduler, run.extra, keep=cfg.keep_checkpoints,
                            config=cfg.to_dict())
        if stop and step < run.total:
            log.info("stopped at step %d of %d (--stop-at-step); continue with --resume auto", step, run.total)
            break
    bar.close()
    run.metrics.close()


def next_micro_batches(run: Run) -> list[dict]:
    try:
        micro = [next(run.batches) for _ in range(run.accum)]
    except TooManyBadRecords as exc:  # the dataset gives up after a run of bad records
        # from a DataLoader worker the message carries the worker's traceback: keep the dataset's line
        reason = next((line for line in str(exc).splitlines() if " in a row from index " in line), str(exc)).strip()
        raise RunError(reason) from None
    for b in micro:
        for msg in b["skipped"]:
            log.warning("skipped bad record %s", msg)
    return micro


def train_step(run: Run, step: int) -> dict:
    """One optimizer step over the global batch; returns its metrics record."""
    cfg, d = run.cfg, run.d
    t0 = time.perf_counter()
    micro = next_micro_batches(run)
    counts = d.all_sum(sum(batch_counts(b) for b in micro))  # global: label tokens, gap samples, ...
    n_tok, n_gap = counts[0].clamp(min=1).item(), counts[1].clamp(min=1).item()
    regap = cfg.regap_weight > 0
    sums = torch.zeros(2, dtype=torch.float64, device=d.device)  # on the device: no sync per micro-batch
    for i, b in enumerate(micro):
        # DDP all-reduces the gradients once, after the last micro-batch
        sync = i == run.accum - 1 or not isinstance(run.model, torch.nn.parallel.DistributedDataParallel)
        with (contextlib.nullcontext() if sync else run.model.no_sync()):
            with run.amp(), run.sdpa_ctx():
                o = run.model(**model_inputs(b, d.device), regap_weight=cfg.regap_weight,
                              regap_squared=cfg.regap_squared)
            loss = o["lm_loss_sum"] / n_tok
            has_gap = regap and o["gap_sum"] is not None  # None: no image in this micro-batch
            if has_gap:
                loss = loss + cfg.regap_weight * o["gap_sum"] / n_gap
            # DDP averages gradients over processes; the loss is a global sum, so undo the average
            (loss * d.world).backward()
        sums[0] += o["lm_loss_sum"].detach()
        if has_gap:
            sums[1] += o["gap_sum"].detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    sums = d.all_sum(sums)
    dt = time.perf_counter() - t0
    extra = run.extra
    extra["train_seconds"] += dt
    extra["tokens"] += int(counts[2])
    extra["skipped"] += int(counts[3])
    rec = {"step": step, "lm_loss": sums[0].item() / n_tok, "gap": sums[1].item() / n_gap if regap else None,
           "lr": run.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), "tokens_per_s": counts[2].item() / dt,
           "skipped": extra["skipped"], "seconds": extra["train_seconds"]}
    rec["loss"] = rec["lm_loss"] + (cfg.regap_weight * rec["gap"] if regap else 0.0)
    return rec


def measure(run: Run, step: int, rec: dict) -> dict:
    """The held-out loss and gap at this step (nothing when nothing is held out), logged on rank 0."""
    if run.eval_loader is None:
        return {}
    held = evaluate(run.vlm, run.eval_loader, run.d, run.amp)
    if run.d.main:
        log.info("step %d/%d: loss %.4f, gap %s | held-out: loss %.4f, gap %.4f | %.0f tokens/s", step, run.total,
                 rec["lm_loss"], "-" if rec["gap"] is None else f"{rec['gap']:.4f}", held["eval_lm_loss"],
                 held["eval_gap"], rec["tokens_per_s"])
    return held


# --------------------------------------------------------------------------------------------------
# the end: summary, model, plot
# --------------------------------------------------------------------------------------------------


def finish(run: Run) -> dict:
    cfg, d, out, extra, f = run.cfg, run.d, run.out, run.extra, run.facts
    seconds = extra["train_seconds"]
    initial = extra["initial_eval"] or {}
    summary = {"steps": run.step, "total_steps": run.total, "train_seconds": seconds,
               "steps_per_second": run.step / seconds if seconds else None, "regap_weight": cfg.regap_weight,
               "attention": f["attention"], "skipped_records": extra["skipped"], "arch": f["arch"],
               "recipe": cfg.recipe, "trainable_parameters": f["trainable_parameters"], "trainable": f["trainable"],
               "malformed_records": f["malformed"], "unreadable_held_out_records": f["unreadable_held_out"],
               "initial_gap": initial.get("eval_gap"), "initial_lm_loss": initial.get("eval_lm_loss"),
               "final_gap": None, "final_lm_loss": None, "out": str(out), "model": None}
    summary.update(read_final_eval(out / "metrics.jsonl") if d.main else {})
    if cfg.save_model and run.step == run.total:
        export_model(run.vlm, cfg, out / "model", d)
        summary["model"] = str(out / "model")
    if d.main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if cfg.plot:
            plot_runs({f"lambda={cfg.regap_weight:g}": out / "metrics.jsonl"}, out / "metrics.png")
        log.info("done: %d steps in %.0f s; summary in %s", run.step, seconds, out / "summary.json")
    return summary


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


def make_scheduler(optimizer, cfg: TrainConfig, total: int):
    """Linear warm-up over ``warmup_ratio`` of the steps, then cosine decay to ``min_lr_ratio`` x lr."""
    from transformers import get_cosine_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

    warmup = math.ceil(cfg.warmup_ratio * total)
    if cfg.min_lr_ratio > 0:
        return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total, min_lr_rate=cfg.min_lr_ratio)
    return get_cosine_schedule_with_warmup(optimizer, warmup, total)


def read_final_eval(path: Path) -> dict:
    from .metrics import read_jsonl

    rows = [r for r in read_jsonl(path) if "eval_gap" in r]
    return {"final_gap": rows[-1]["eval_gap"], "final_lm_loss": rows[-1]["eval_lm_loss"]} if rows else {}


def export_model(vlm: VisionLanguageModel, cfg: TrainConfig, path: Path, d: Dist) -> None:
    """The trained model in load_model's format. Frozen parts that came from a folder are not copied."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = None
    if cfg.fsdp:  # a collective: every rank takes part, rank 0 gets the full weights
        state = get_model_state_dict(vlm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not d.main:
        return
    vlm.merge_lora()
    trained = {"projector"} | ({"language_model"} if cfg.lm_trainable() else set())
    if vlm.config.vision_path is None or any(p.requires_grad for p in vlm.vision_tower.parameters()):
        trained.add("vision_tower")
    if vlm.config.lm_path is None:
        trained.add("language_model")
    vlm.save_pretrained(path, components=[c for c in ("vision_tower", "projector", "language_model") if c in trained],
                        state_dict=state)
    for weights in path.glob("*.safetensors"):
        readable_like_other_outputs(weights)
