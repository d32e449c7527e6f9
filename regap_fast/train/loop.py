"""The training loop: LLaVA stage 1 / stage 2 with REGAP, in one readable function.

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
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ..data import IGNORE_INDEX, Collator, LlavaDataset, StepSampler, load_records
from ..model import VisionLanguageModel, load_model
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .metrics import MetricsLogger, plot_runs

log = logging.getLogger("regap_fast.train")

MODEL_INPUTS = ("input_ids", "pixel_values", "image_positions", "labels", "caption_positions")


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
# model
# --------------------------------------------------------------------------------------------------


def build_model(cfg: TrainConfig, out: Path, d: Dist, resuming: bool, dtype: torch.dtype) -> VisionLanguageModel:
    """From --model, from --vision-tower/--language-model, or the tiny default from configs (``--arch``).

    Pretrained weights are read in ``dtype`` (bf16 when training in bf16: a 7B LM is then 14 GB of host
    memory per process, not 28); ``setup_stage`` makes the trained parts fp32. A config-built model is
    saved to OUT/initial_model on a fresh start and read back on resume, so its frozen weights never
    depend on re-running a random init."""
    from ..model import ModelConfig

    torch.manual_seed(cfg.seed)  # the same init on every rank
    mcfg = ModelConfig(arch=cfg.arch, vision_feature_layer=cfg.vision_feature_layer,
                       attn_implementation=cfg.attn_implementation, projector_backend=cfg.projector_backend)
    if cfg.model:
        vlm = load_model(cfg.model, device="cpu", dtype=dtype)
        vlm.config.projector_backend = vlm.projector.backend = cfg.projector_backend
        if vlm.config.arch != cfg.arch and "arch" in cfg.recipe_overrides:
            raise SystemExit(f"--arch {cfg.arch}, but --model {cfg.model} is a {vlm.config.arch} model")
        if vlm.config.arch != cfg.arch and cfg.recipe:
            log.warning("the %s recipe is made for --arch %s; --model %s is a %s model", cfg.recipe, cfg.arch,
                        cfg.model, vlm.config.arch)
    elif cfg.vision_tower:
        vlm = VisionLanguageModel.from_pretrained_parts(cfg.vision_tower, cfg.language_model, config=mcfg,
                                                        dtype=dtype, projector_weights=cfg.projector_weights)
    elif resuming and (out / "initial_model").is_dir():
        vlm = load_model(out / "initial_model", device="cpu", dtype=torch.float32)
    else:
        vlm = VisionLanguageModel.from_config(mcfg)
        if cfg.projector_weights:
            vlm.load_projector_weights(cfg.projector_weights)
        if d.main:
            vlm.save_pretrained(out / "initial_model")
    vlm.set_attn_implementation(cfg.attn_implementation)
    return vlm


def vision_blocks_to_train(vlm: VisionLanguageModel, spec: str) -> list[int]:
    """Indices of the vision tower's blocks that ``--train-vision`` trains. Blocks after the feature layer
    (LLaVA's last block, with its penultimate-layer features) get no gradient: they stay frozen."""
    blocks, used = vlm.vision_blocks()
    n = len(blocks)
    if spec == "none":
        start = n
    elif spec == "all":
        start = 0
    elif spec == "latter-half":
        start = n // 2
    else:
        k = int(spec)
        start = k if k >= 0 else n + k
        if not 0 <= start <= n:
            raise SystemExit(f"--train-vision {spec}: the vision tower has {n} blocks")
    chosen = list(range(start, n))
    unused = [i for i in chosen if i >= used]
    if unused:
        log.info("vision blocks %s come after the feature layer (%d of %d blocks feed the projector): no gradient "
                 "reaches them, they stay frozen", _ranges(unused), used, n)
    return [i for i in chosen if i < used]


def setup_stage(vlm: VisionLanguageModel, cfg: TrainConfig, bf16: bool) -> None:
    """What trains: the projector always; the LM (all weights, or LoRA adapters) in stage 2 or with
    --train-lm; the vision blocks of --train-vision. Frozen modules are kept in bf16 when training in
    bf16 (LLaVA does the same); trained ones in fp32."""
    vlm.requires_grad_(False)
    vlm.projector.float().requires_grad_(True)
    train_lm = cfg.lm_trainable()
    blocks, _ = vlm.vision_blocks()
    if bf16 and not cfg.fsdp:  # FSDP keeps one dtype per shard group and casts for compute itself
        vlm.vision_tower.to(torch.bfloat16)
        if not train_lm or cfg.lora:
            vlm.language_model.to(torch.bfloat16)
    for i in vision_blocks_to_train(vlm, cfg.train_vision):
        blocks[i].float().requires_grad_(True)
    if train_lm and cfg.lora:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise SystemExit("--lora needs the peft package: pip install peft") from None
        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        vlm.language_model = get_peft_model(vlm.language_model, lora)
    elif train_lm:
        vlm.language_model.float().requires_grad_(True)
    if cfg.gradient_checkpointing:
        vlm.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        vlm.language_model.config.use_cache = False


def _ranges(indices) -> str:
    """[1, 2, 3, 7] -> '1-3,7'"""
    out, run = [], []
    for i in sorted(indices):
        if run and i != run[-1] + 1:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(i)
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def describe_trainable(vlm: VisionLanguageModel) -> str:
    """Which parameters train, per component: 'all' or the blocks (and LoRA adapters), with counts."""
    import re

    parts = []
    for comp in ("vision_tower", "projector", "language_model"):
        named = list(getattr(vlm, comp).named_parameters())
        total = sum(p.numel() for _, p in named)
        trained = [(n, p) for n, p in named if p.requires_grad]
        k = sum(p.numel() for _, p in trained)
        if not trained:
            parts.append(f"{comp}: frozen ({total:,})")
            continue
        if k == total:
            parts.append(f"{comp}: all {k:,}")
            continue
        blocks: dict[str, set] = {}
        other = []
        for n, _ in trained:
            m = re.match(r"(.*?)\.(\d+)\.", n)
            if m:
                blocks.setdefault(m.group(1), set()).add(int(m.group(2)))
            else:
                other.append(n)
        what = [f"{prefix}.[{_ranges(ix)}]" for prefix, ix in blocks.items()] + other[:4]
        lora = " (LoRA adapters)" if any("lora_" in n for n, _ in trained) else ""
        parts.append(f"{comp}: {k:,} of {total:,}{lora} in {', '.join(what)}")
    return "; ".join(parts)


def wrap(vlm: VisionLanguageModel, cfg: TrainConfig, d: Dist, bf16: bool) -> torch.nn.Module:
    """DDP (gradients all-reduced, overlapped with backward), FSDP2 (parameters sharded), or as is."""
    if cfg.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not dist.is_initialized():
            raise SystemExit("--fsdp needs several processes: run under torchrun")
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        # one shard group per LM block (the classes transformers marks as never to be split); the rest
        # (embeddings, head, projector, vision tower) in the root group. Not the tower's own group: a
        # sharded transformers module loses its output_hidden_states (transformers 5.23).
        blocks = set(getattr(vlm.language_model, "_no_split_modules", None) or [])
        for m in vlm.language_model.modules():
            if type(m).__name__ in blocks:
                fully_shard(m, mp_policy=mp)
        fully_shard(vlm, mp_policy=mp)
        return vlm
    if d.world > 1:
        return torch.nn.parallel.DistributedDataParallel(
            vlm, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    return vlm


def attention_context(vlm: VisionLanguageModel, batch: dict, d: Dist, bf16: bool):
    """Which attention kernels run, and a context manager that holds SDPA to its flash kernel when that
    kernel can run this model (probed once on a real batch), so that the log says what ran."""
    impl = vlm.config.attn_implementation
    if impl != "sdpa":
        return contextlib.nullcontext, f"{impl} (transformers)"
    if d.device.type != "cuda" or not bf16:
        precision = "bf16" if bf16 else "fp32"
        return contextlib.nullcontext, f"sdpa on {d.device.type} ({precision}: PyTorch picks the kernel)"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flash():
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    try:
        with torch.no_grad(), flash(), torch.autocast("cuda", dtype=torch.bfloat16):
            vlm(**{k: batch[k] for k in MODEL_INPUTS})
    except RuntimeError as exc:
        return contextlib.nullcontext, f"sdpa (its flash kernel cannot run here: {str(exc).splitlines()[0]})"
    return flash, "sdpa with its FlashAttention-2 kernel (bf16, no mask)"


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


def load_data(cfg: TrainConfig, vlm: VisionLanguageModel, out: Path, d: Dist):
    """(train dataset, held-out dataset, number of malformed records dropped)."""
    if cfg.data:
        data_path = Path(cfg.data)
        image_folder = Path(cfg.image_folder) if cfg.image_folder else data_path.parent
    else:
        from ..data import synthetic

        if d.main:
            synthetic.write_dataset(out / "data", cfg.synthetic_samples, seed=cfg.seed)
        if d.world > 1:
            dist.barrier()
        data_path = synthetic.write_dataset(out / "data", cfg.synthetic_samples, seed=cfg.seed)
        image_folder = out / "data"
    records, problems = load_records(data_path)
    n_eval = min(cfg.eval_samples, len(records) // 10)
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    held = set(order[:n_eval])
    fmt = cfg.prompt_format if cfg.prompt_format != "auto" else ("plain" if cfg.stage == 1 else "chat")
    encoder = vlm.encoder(fmt, cfg.max_length)

    def dataset(recs):
        return LlavaDataset(recs, image_folder, vlm.image_transform, encoder)
    train = dataset([r for i, r in enumerate(records) if i not in held])
    evals = dataset([records[i] for i in sorted(held)])
    return train, evals, len(problems), fmt


def model_inputs(batch: dict, device: torch.device) -> dict:
    return {k: (batch[k].to(device, non_blocking=True) if batch[k] is not None else None) for k in MODEL_INPUTS}


def batch_counts(batch: dict) -> torch.Tensor:
    """[label tokens, samples with image and caption, input tokens, skipped records] of a micro-batch."""
    return torch.tensor([
        (batch["labels"][:, 1:] != IGNORE_INDEX).sum().item(),
        (batch["image_positions"].any(1) & batch["caption_positions"].any(1)).sum().item(),
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
# the loop
# --------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) one training job; returns its summary (also written to OUT/summary.json on rank 0)."""
    cfg.check()
    d = setup_distributed()
    ok = False
    try:
        summary = _train(cfg, d)
        ok = True
        return summary
    finally:
        d.close(ok)


def _train(cfg: TrainConfig, d: Dist) -> dict:
    out = Path(cfg.out)
    ckpt = None
    if cfg.resume:
        ckpt = latest_checkpoint(out) if cfg.resume == "auto" else Path(cfg.resume)
        if cfg.resume != "auto" and not ckpt.is_dir():
            raise FileNotFoundError(f"--resume {cfg.resume}: no such checkpoint folder")
    elif latest_checkpoint(out) is not None:
        raise SystemExit(f"{out} already holds checkpoints: pass --resume auto to continue that run, "
                         "or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.seed)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and d.device.type == "cuda")
    amp = (lambda: torch.autocast(d.device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    # FSDP keeps one dtype per shard group (it casts for compute itself): everything loads in fp32 there
    vlm = build_model(cfg, out, d, resuming=ckpt is not None,
                      dtype=torch.bfloat16 if bf16 and not cfg.fsdp else torch.float32)
    setup_stage(vlm, cfg, bf16)
    vlm.to(d.device)
    train_set, eval_set, malformed, fmt = load_data(cfg, vlm, out, d)

    G, mb = cfg.global_batch_size, cfg.micro_batch_size
    if G % (mb * d.world):
        raise SystemExit(f"--global-batch-size {G} must be a multiple of --micro-batch-size x processes "
                         f"= {mb} x {d.world}")
    accum = G // (mb * d.world)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train_set) / G))

    model = wrap(vlm, cfg, d, bf16)
    params = [p for p in vlm.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.peak_lr(),
                                  betas=(0.9, 0.999), fused=d.device.type == "cuda" and not cfg.fsdp)
    scheduler = make_scheduler(optimizer, cfg, total)

    start, extra = 0, {"skipped": 0, "tokens": 0, "train_seconds": 0.0, "initial_eval": None}
    if ckpt is not None:
        start, extra = load_checkpoint(ckpt, vlm, optimizer, scheduler)
        log.info("resumed from %s at step %d", ckpt, start)

    collate = Collator(vlm.tokenizer.pad_token_id)
    sampler = StepSampler(len(train_set), G, mb, rank=d.rank, world_size=d.world, seed=cfg.seed,
                          start_step=start, total_steps=total)
    workers = cfg.num_workers
    loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                        pin_memory=d.device.type == "cuda", persistent_workers=False,
                        prefetch_factor=2 * accum if workers else None)
    eval_loader = DataLoader(eval_set, batch_size=mb, collate_fn=collate)

    n_trainable = sum(p.numel() for p in params)
    trainable = describe_trainable(vlm)
    first_eval_batch = next(iter(eval_loader))
    sdpa_ctx, attention = attention_context(vlm, model_inputs(first_eval_batch, d.device), d, bf16)
    if d.main:
        log.info("%s%s, stage %d (%s format%s): %s trainable parameters; %d train / %d held-out records "
                 "(%d malformed dropped); %d steps x %d samples (%d processes x %d micro-batches of %d); "
                 "lr %.2g (warm-up %g, weight decay %g); lambda %g; %s; attention: %s", vlm.config.arch,
                 f", recipe {cfg.recipe}" if cfg.recipe else "", cfg.stage, fmt, ", LoRA" if cfg.lora else "",
                 f"{n_trainable:,}", len(train_set), len(eval_set), malformed, total, G, d.world, accum, mb,
                 cfg.peak_lr(), cfg.warmup_ratio, cfg.weight_decay, cfg.regap_weight,
                 "bf16 autocast" if bf16 else "fp32", attention)
        log.info("trainable parameters: %s", trainable)
    metrics = MetricsLogger(out, enabled=d.main, resume_step=start if ckpt else None, tensorboard=cfg.tensorboard)
    if extra["initial_eval"] is None:
        extra["initial_eval"] = evaluate(vlm, eval_loader, d, amp)
        metrics.log({"step": 0, **extra["initial_eval"]})

    from tqdm.auto import tqdm

    # None: tqdm turns itself off when stderr is not a terminal (CI logs stay readable)
    bar = tqdm(total=total, initial=start, disable=None if d.main and cfg.progress else True, dynamic_ncols=True,
               unit="step")
    it = iter(loader)
    regap = cfg.regap_weight > 0
    model.train()
    step = start
    for step in range(start + 1, total + 1):
        t0 = time.perf_counter()
        micro = [next(it) for _ in range(accum)]
        for b in micro:
            for msg in b["skipped"]:
                log.warning("rank %d: skipped bad record %s", d.rank, msg)
        counts = d.all_sum(sum(batch_counts(b) for b in micro))  # global: label tokens, gap samples, ...
        n_tok, n_gap = counts[0].clamp(min=1).item(), counts[1].clamp(min=1).item()
        sums = torch.zeros(2, dtype=torch.float64, device=d.device)  # on the device: no sync per micro-batch
        for i, b in enumerate(micro):
            # DDP all-reduces the gradients once, after the last micro-batch
            sync = i == accum - 1 or not isinstance(model, torch.nn.parallel.DistributedDataParallel)
            with (contextlib.nullcontext() if sync else model.no_sync()):
                with amp(), sdpa_ctx():
                    o = model(**model_inputs(b, d.device), regap_weight=cfg.regap_weight)
                loss = o["lm_loss_sum"] / n_tok
                has_gap = regap and o["gap_sum"] is not None  # None: no image in this micro-batch
                if has_gap:
                    loss = loss + cfg.regap_weight * o["gap_sum"] / n_gap
                # DDP averages gradients over processes; the loss is a global sum, so undo the average
                (loss * d.world).backward()
            sums[0] += o["lm_loss_sum"].detach()
            if has_gap:
                sums[1] += o["gap_sum"].detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        sums = d.all_sum(sums)
        dt = time.perf_counter() - t0
        extra["train_seconds"] += dt
        extra["tokens"] += int(counts[2])
        extra["skipped"] += int(counts[3])
        rec = {"step": step, "lm_loss": sums[0].item() / n_tok, "gap": sums[1].item() / n_gap if regap else None,
               "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), "tokens_per_s": counts[2].item() / dt,
               "skipped": extra["skipped"], "seconds": extra["train_seconds"]}
        rec["loss"] = rec["lm_loss"] + (cfg.regap_weight * rec["gap"] if regap else 0.0)
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == total:
            rec.update(evaluate(vlm, eval_loader, d, amp))
            if d.main:
                log.info("step %d/%d: loss %.4f, gap %s | held-out: loss %.4f, gap %.4f | %.0f tokens/s", step, total,
                         rec["lm_loss"], "-" if rec["gap"] is None else f"{rec['gap']:.4f}", rec["eval_lm_loss"],
                         rec["eval_gap"], rec["tokens_per_s"])
        metrics.log(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{rec['lm_loss']:.3f}", gap="-" if rec["gap"] is None else f"{rec['gap']:.3f}",
                        tok_s=f"{rec['tokens_per_s']:.0f}", refresh=False)
        stop = cfg.stop_at_step is not None and step >= cfg.stop_at_step
        if (cfg.save_every and step % cfg.save_every == 0) or step == total or stop:
            save_checkpoint(out, step, vlm, optimizer, scheduler, extra, keep=cfg.keep_checkpoints)
        if stop and step < total:
            log.info("stopped at step %d of %d (--stop-at-step); continue with --resume auto", step, total)
            break
    bar.close()
    metrics.close()

    summary = {"steps": step, "train_seconds": extra["train_seconds"],
               "steps_per_second": step / extra["train_seconds"] if extra["train_seconds"] else None,
               "regap_weight": cfg.regap_weight, "attention": attention, "skipped_records": extra["skipped"],
               "arch": vlm.config.arch, "recipe": cfg.recipe, "trainable_parameters": n_trainable,
               "trainable": trainable,
               "malformed_records": malformed, **{"initial_" + k[5:]: v for k, v in extra["initial_eval"].items()}}
    final = read_final_eval(out / "metrics.jsonl") if d.main else {}
    summary.update(final)
    if cfg.save_model and step == total:
        export_model(vlm, cfg, out / "model", d)
    if d.main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if cfg.plot:
            plot_runs({f"lambda={cfg.regap_weight:g}": out / "metrics.jsonl"}, out / "metrics.png")
        log.info("done: %s", summary)
    return summary


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
