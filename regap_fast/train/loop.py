"""The training loop: LLaVA stage 1 / stage 2 with REGAP. ``train`` sets up a ``Run``, runs its steps and
finishes it; ``train_step`` reads straight down.

    loss = lm + lambda * gap        (lambda = --regap-weight; 0 skips the gap entirely)

Global-batch exactness. Every optimizer step sees the same global batch, cut into the same
micro-batches, however many processes share it (``StepSampler``). The losses are sums over the
micro-batches divided by the *global* counts (label tokens; samples with an image and a caption),
known before the first backward from the batches themselves. So one process with 8 accumulation
steps and 4 processes with 2 each compute the same gradient, up to the order of floating-point
sums; and a resumed run recomputes exactly the steps it had not finished.

Around the loop: the processes (``dist.py``), the model side (``model_setup.py``), the data side
(``data_setup.py``), checkpoints (``checkpoint.py``) and what the run tells its user (``report.py``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Optional

import torch
from torch.utils.data import DataLoader

from ..data import Collator
from ..data.llava import TooManyBadRecords
from ..gap_layer import TextNormScale, check_layer
from ..model import VisionLanguageModel
from . import report
from .checkpoint import Counters, load_checkpoint, remove_step_folders, save_checkpoint
from .config import TrainConfig
from .data_setup import batch_counts, first_example, load_data, make_loader, prompt_format, synthetic_source
from .dist import Dist, setup_distributed
from .errors import RunError
from .metrics import MetricsLogger
from .output_folder import OutputFolder
from .model_setup import (attention_context, build_model, describe_trainable, export_model, model_inputs, setup_stage,
                          wrap)
from .preflight import Plan, preflight

log = logging.getLogger("regap_fast.train")


@dataclass
class Run:
    """A set-up run: what the loop reads and updates. ``step`` is the last finished step."""
    cfg: TrainConfig
    d: Dist
    out: Path
    vlm: VisionLanguageModel
    model: torch.nn.Module  # vlm, or vlm wrapped in DDP (FSDP shards vlm itself)
    params: list[torch.nn.Parameter]  # the trained ones
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: Iterator[dict]  # micro-batches, ``accum`` per step
    eval_loader: Optional[DataLoader]  # None: nothing held out
    accum: int
    total: int
    step: int
    counters: Counters
    amp: Callable[[], ContextManager]  # bf16 autocast, or nothing
    sdpa_ctx: Callable[[], ContextManager]  # SDPA held to its flash kernel, or nothing
    metrics: MetricsLogger
    facts: report.Facts
    folder: OutputFolder  # what this run wrote in out (rank 0 keeps the manifest)
    scale: Optional[TextNormScale] = None  # --regap-scale text-norm


def train(cfg: TrainConfig, plan: Optional[Plan] = None) -> dict:
    """Run (or resume) one training job; returns its summary (also written to OUT/summary.json on rank 0).

    Bad settings raise ``ValueError``/``FileNotFoundError``/``FileExistsError`` before anything is built or
    written; a run that cannot go on raises ``RunError``. ``plan``: ``preflight(cfg)`` when the caller has
    already run it (the command line does, before it imports this module)."""
    plan = plan or preflight(cfg)
    d = setup_distributed()
    folder = OutputFolder(cfg.out)
    ok = False
    try:
        try:
            run = setup(plan, d, folder)
        except BaseException:
            if d.main:  # nothing trained: take back what this run wrote (a resumed run's files stay)
                folder.discard()
            raise
        try:
            run_steps(run)
            summary = finish(run)
        finally:
            if d.main:
                folder.record()
        ok = True
        return summary
    finally:
        d.close(ok)


def setup(plan: Plan, d: Dist, folder: OutputFolder) -> Run:
    """Everything the loop needs, built in order: model, data, optimizer, the step to resume from."""
    cfg, ckpt = plan.cfg, plan.checkpoint
    out = Path(cfg.out)
    if d.main:
        if cfg.overwrite:  # a fresh start: nothing of an earlier run may be resumed or reused; the user's stays
            folder.remove_previous()
            remove_step_folders(out)
        folder.begin()
    d.barrier()
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
    start, counters = 0, Counters()
    if ckpt is not None:
        start, counters = load_checkpoint(ckpt, vlm, optimizer, scheduler)
        log.info("resumed from %s at step %d", ckpt, start)

    collate = Collator(vlm.tokenizer.pad_token_id)
    loader = make_loader(train_set, collate, cfg, d, accum, start, total)
    eval_loader = DataLoader(eval_set, batch_size=cfg.micro_batch_size, collate_fn=collate) if len(eval_set) else None
    probe = next(iter(eval_loader)) if eval_loader else collate([first_example(train_set)])
    sdpa_ctx, attention = attention_context(vlm, model_inputs(probe, d.device), d, bf16)
    facts = report.Facts(arch=vlm.config.arch, attention=attention, trainable=describe_trainable(vlm),
                         trainable_parameters=sum(p.numel() for p in params), prompt_format=prompt_format(cfg),
                         bf16=bf16, train_records=len(train_set), held_out_records=len(eval_set),
                         malformed_records=source.malformed, unreadable_held_out_records=unreadable)
    metrics = MetricsLogger(out, enabled=d.main, resume_step=start if ckpt else None, tensorboard=cfg.tensorboard)
    run = Run(cfg, d, out, vlm, model, params, optimizer, scheduler, iter(loader), eval_loader, accum, total, start,
              counters, amp, sdpa_ctx, metrics, facts, folder, regap_scale(cfg, vlm, total, counters))
    if d.main:
        report.log_plan(cfg, facts, total, d.world, accum)
    if counters.initial_eval is None and eval_loader is not None:
        counters.initial_eval = evaluate(vlm, eval_loader, d, amp, cfg.regap_layer)
        metrics.log({"step": 0, **counters.initial_eval})
    return run


def regap_scale(cfg: TrainConfig, vlm: VisionLanguageModel, total: int, counters: Counters) -> Optional[TextNormScale]:
    """--regap-layer checked against the model; --regap-scale text-norm's estimator, restored when resuming."""
    check_layer(cfg.regap_layer, vlm.language_model)
    if cfg.regap_scale != "text-norm":
        return None
    scale = TextNormScale(cfg.regap_scale_steps or max(1, math.ceil(cfg.warmup_ratio * total)))
    if counters.regap_scale is not None:
        scale.load_state_dict(counters.regap_scale)
    return scale


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


def make_scheduler(optimizer, cfg: TrainConfig, total: int):
    """Linear warm-up over ``warmup_ratio`` of the steps, then cosine decay to ``min_lr_ratio`` x lr."""
    from transformers import get_cosine_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

    warmup = math.ceil(cfg.warmup_ratio * total)
    if cfg.min_lr_ratio > 0:
        return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total, min_lr_rate=cfg.min_lr_ratio)
    return get_cosine_schedule_with_warmup(optimizer, warmup, total)


@torch.no_grad()
def evaluate(vlm: VisionLanguageModel, loader: DataLoader, d: Dist, amp, layer: int = 0) -> dict:
    """Held-out caption loss and gap (at ``layer``, as trained; unscaled), every rank computing the same numbers
    (no communication)."""
    was_training = vlm.training
    vlm.eval()
    sums = torch.zeros(4, dtype=torch.float64)
    for batch in loader:
        with amp():
            out = vlm(**model_inputs(batch, d.device), compute_gap=True, regap_layer=layer)
        sums += torch.tensor([out["lm_loss_sum"].item(), out["num_tokens"].item(),
                              out["gap_sum"].item() if out["gap_sum"] is not None else 0.0,
                              out["num_gap_samples"].item() if out["num_gap_samples"] is not None else 0])
    vlm.train(was_training)
    return {"eval_lm_loss": (sums[0] / sums[1].clamp(min=1)).item(),
            "eval_gap": (sums[2] / sums[3].clamp(min=1)).item()}


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
            save_checkpoint(run.out, step, run.vlm, run.optimizer, run.scheduler, run.counters,
                            keep=cfg.keep_checkpoints, config=cfg.to_dict())
            if run.d.main:
                run.folder.record()
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
    scale, alpha = run.scale, 1.0
    estimating = regap and scale is not None and scale.frozen is None
    sums = torch.zeros(2, dtype=torch.float64, device=d.device)  # on the device: no sync per micro-batch
    for i, b in enumerate(micro):
        # DDP all-reduces the gradients once, after the last micro-batch
        sync = i == run.accum - 1 or not isinstance(run.model, torch.nn.parallel.DistributedDataParallel)
        with (contextlib.nullcontext() if sync else run.model.no_sync()):
            with run.amp(), run.sdpa_ctx():
                o = run.model(**model_inputs(b, d.device), regap_weight=cfg.regap_weight,
                              regap_squared=cfg.regap_squared, regap_layer=cfg.regap_layer, caption_norms=estimating)
            loss = o["lm_loss_sum"] / n_tok
            has_gap = regap and o["gap_sum"] is not None  # None: no image in this micro-batch
            if has_gap:
                if scale is not None:  # warm-up: this micro-batch's caption tokens join the estimate first
                    if estimating:
                        scale.observe_sums(o["caption_norm_sum"].item(), int(o["caption_tokens"]))
                    alpha = scale.alpha
                loss = loss + cfg.regap_weight * alpha * o["gap_sum"] / n_gap
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
    if scale is not None and regap:  # the step's norms summed over the ranks: one alpha everywhere from here on
        scale.step()
        run.counters.regap_scale = scale.state_dict()
    dt = time.perf_counter() - t0
    c = run.counters
    c.train_seconds += dt
    c.skipped += int(counts[3])
    rec = {"step": step, "lm_loss": sums[0].item() / n_tok, "gap": sums[1].item() / n_gap if regap else None,
           "lr": run.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), "tokens_per_s": counts[2].item() / dt,
           "skipped": c.skipped, "seconds": c.train_seconds}
    rec["loss"] = rec["lm_loss"] + (cfg.regap_weight * alpha * rec["gap"] if regap else 0.0)
    if scale is not None:
        rec["regap_alpha"] = alpha
    return rec


def measure(run: Run, step: int, rec: dict) -> dict:
    """The held-out loss and gap at this step (nothing when nothing is held out), logged on rank 0."""
    if run.eval_loader is None:
        return {}
    held = evaluate(run.vlm, run.eval_loader, run.d, run.amp, run.cfg.regap_layer)
    if run.d.main:
        report.log_measurement(step, run.total, rec, held)
    return held


def finish(run: Run) -> dict:
    """The exported model, and the summary: returned, and on rank 0 written with the plot."""
    cfg, d, out = run.cfg, run.d, run.out
    model = None
    if cfg.save_model and run.step == run.total:
        export_model(run.vlm, cfg, out / "model", d)
        model = out / "model"
    final_eval = report.read_final_eval(out / "metrics.jsonl") if d.main else {}
    summary = report.summarize(cfg, run.facts, run.counters, run.step, run.total, out, final_eval, model)
    if d.main:
        report.write_summary(summary, cfg, out)
    return summary
