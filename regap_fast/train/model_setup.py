"""The model side of a training run: build or load it, choose what trains, wrap it for DDP/FSDP, find
out which attention kernel runs, and export the trained model at the end."""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path

import torch
import torch.distributed as dist

from ..model import COMPONENTS, ModelConfig, VisionLanguageModel, load_model
from .config import TrainConfig
from .dist import Dist
from .errors import RunError

log = logging.getLogger("regap_fast.train")

MODEL_INPUTS = ("input_ids", "pixel_values", "image_mask", "labels", "caption_mask")


def model_inputs(batch: dict, device: torch.device) -> dict:
    """The tensors of a Collator batch that the model takes, on ``device``."""
    return {k: (batch[k].to(device, non_blocking=True) if batch[k] is not None else None) for k in MODEL_INPUTS}


def build_model(cfg: TrainConfig, out: Path, d: Dist, resuming: bool, dtype: torch.dtype) -> VisionLanguageModel:
    """From --model, from --vision-tower/--language-model, or the tiny default from configs (``--arch``).

    Pretrained weights are read in ``dtype`` (bf16 when training in bf16: a 7B LM is then 14 GB of host
    memory per process, not 28); ``setup_stage`` makes the trained parts fp32. A config-built model is
    saved to OUT/initial_model on a fresh start and read back on resume, so its frozen weights never
    depend on re-running a random init."""
    torch.manual_seed(cfg.seed)  # the same init on every rank
    mcfg = ModelConfig(arch=cfg.arch, vision_feature_layer=cfg.vision_feature_layer,
                       attn_implementation=cfg.attn_implementation, projector_backend=cfg.projector_backend,
                       image_aspect_ratio=cfg.image_aspect_ratio)
    if cfg.model:
        vlm = load_model(cfg.model, device="cpu", dtype=dtype)
        vlm.config.projector_backend = vlm.projector.backend = cfg.projector_backend
        if "image_aspect_ratio" in cfg.recipe_overrides:  # else the saved model's own setting
            vlm.config.image_aspect_ratio = cfg.image_aspect_ratio
        if vlm.config.arch != cfg.arch and "arch" in cfg.recipe_overrides:
            raise ValueError(f"--arch {cfg.arch}, but --model {cfg.model} is a {vlm.config.arch} model")
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
            raise ValueError(f"--train-vision {spec}: the vision tower has {n} blocks")
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
            raise RunError("--lora needs the peft package: pip install peft") from None
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
    parts = []
    for comp in COMPONENTS:
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
            raise ValueError("--fsdp needs several processes: run under torchrun")
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
    vlm.save_pretrained(path, components=[c for c in COMPONENTS if c in trained], state_dict=state)
