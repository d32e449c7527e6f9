"""A LLaVA-style stage-1 training step, REGAP on vs off: the headline of the GPU report.

Stage 1 as LLaVA-1.5 runs it: CLIP ViT-L/14-336 (frozen) -> the projector (trained, fp32 master
weights, bf16 autocast) -> a Llama-7B-shaped LM (frozen, bf16, gradients flow through it to the
image tokens), SDPA's FlashAttention kernel, AdamW. Random weights from configs: the timings do not
depend on the weights. The same model and batch run with lambda = 0 (the gap is never computed) and
lambda > 0 (``projector_gap_loss``: the fused projector and the pooled caption embeddings).
"""

from __future__ import annotations

import contextlib

import torch

from regap_fast.constants import IGNORE_INDEX
from regap_fast.model import ModelConfig, VisionLanguageModel

CLIP_L_336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
LLAMA_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                tie_word_embeddings=False)
SIZES = {
    "7b": (CLIP_L_336, LLAMA_7B),
    # the same structure, small enough for a CPU smoke test
    "tiny": (dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=32, patch_size=8),
             dict(model_type="llama", hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)),
}


def build_model(size: str, device: torch.device) -> VisionLanguageModel:
    vision, text = SIZES[size]
    bf16 = device.type == "cuda"
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if bf16 else torch.float32)  # build a 7B LM in bf16 directly
    try:
        with torch.device(device):
            vlm = VisionLanguageModel.from_config(ModelConfig(vision_config=vision, text_config=text))
    finally:
        torch.set_default_dtype(old)
    vlm.requires_grad_(False)
    vlm.projector.float().requires_grad_(True)  # stage 1: only the projector trains (fp32 master weights)
    return vlm.to(device)


def synthetic_batch(vlm: VisionLanguageModel, batch: int, caption_len: int, device, seed: int = 0) -> dict:
    """One stage-1 batch: [bos] <576 image slots> prompt caption, captions of varying length (right-padded)."""
    g = torch.Generator().manual_seed(seed)
    n_img, vocab = vlm.num_image_tokens, len(vlm.tokenizer)
    S = 1 + n_img + 4 + caption_len
    ids = torch.randint(3, vocab, (batch, S), generator=g)
    image = torch.zeros(batch, S, dtype=torch.bool)
    image[:, 1:1 + n_img] = True
    lengths = torch.randint(caption_len // 2, caption_len + 1, (batch,), generator=g)
    caption = torch.zeros(batch, S, dtype=torch.bool)
    for b in range(batch):
        caption[b, 1 + n_img + 4: 1 + n_img + 4 + int(lengths[b])] = True
    ids[image] = 0
    ids[(~image) & (~caption) & (torch.arange(S) > 1 + n_img + 4)] = vlm.tokenizer.pad_token_id
    labels = torch.where(caption, ids, torch.full_like(ids, IGNORE_INDEX))
    size = vlm.image_size
    pixels = torch.randn(batch, 3, size, size, generator=g)
    return {k: v.to(device) for k, v in dict(input_ids=ids, pixel_values=pixels, image_mask=image,
                                             labels=labels, caption_mask=caption).items()}


def make_step(vlm: VisionLanguageModel, batch: dict, regap_weight: float):
    params = [p for p in vlm.parameters() if p.requires_grad]
    cuda = batch["input_ids"].device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, fused=cuda)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    if cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        attn = lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])  # noqa: E731
    else:
        attn = contextlib.nullcontext

    def step():
        with amp(), attn():
            out = vlm(**batch, regap_weight=regap_weight)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out
    return step


def section(rehearse: bool, device, dtype, ceilings: dict, quick: bool = True, log=print, batch: int = 8,
            caption_len: int = 64, regap_weight: float = 0.1) -> dict:
    """REGAP on vs off, interleaved: time and peak memory of the whole step (tiny on the CPU when rehearsing)."""
    import common

    size = "tiny" if rehearse else "7b"
    batch = 2 if rehearse else batch
    log(f"train step: building the {size} CLIP + Llama model on {device}")
    vlm = build_model(size, torch.device(device))
    data = synthetic_batch(vlm, batch, caption_len, device)
    steps = {"off": make_step(vlm, data, 0.0), "on": make_step(vlm, data, regap_weight)}
    for fn in steps.values():  # warm-up: allocator, cuDNN/cuBLAS heuristics
        for _ in range(2):
            fn()
    peak = {name: common.peak_memory_bytes(fn) for name, fn in steps.items()}
    rounds = 1 if rehearse else 4 if quick else 12
    times = common.time_interleaved({k: [v] for k, v in steps.items()}, warmup=1, rounds=rounds, per_round=1)
    res = {"description": f"{'CLIP ViT-L/14-336' if size == '7b' else 'tiny CLIP'} frozen + projector trained + "
                          f"{'Llama-7B-shaped' if size == '7b' else 'tiny'} LM frozen, bf16 autocast, SDPA flash, "
                          f"AdamW; batch {batch} x {data['input_ids'].shape[1]} tokens ({vlm.num_image_tokens} image "
                          f"tokens, captions {caption_len // 2}..{caption_len}), lambda {regap_weight}",
           "size": size, "batch": batch, "seq_len": data["input_ids"].shape[1], "regap_weight": regap_weight}
    for name in steps:
        res[name] = {"time": times[name], "peak_mem_bytes": peak[name]}
        log(f"  train step REGAP {name}: {times[name]['median_ms']:.2f} ms, peak {peak[name] / 2**30:.2f} GiB")
    res["time_ratio"] = times["on"]["median_ms"] / times["off"]["median_ms"]
    res["peak_mem_ratio"] = peak["on"] / max(peak["off"], 1)
    return res
