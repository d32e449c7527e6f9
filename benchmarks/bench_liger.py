"""Liger-Kernel composes with REGAP: a transformers LLaVA patched with ``apply_liger_kernel_to_llava`` and
then ``apply_regap`` gives the reference loss (no Liger, REGAP on), at a step time within 1% of Liger
alone. Stage 1 as LLaVA-1.5 runs it (projector trained, CLIP and the LM frozen, bf16), a LLaVA with a
Llama LM of 7B width and fewer layers (the per-layer cost is what Liger changes; 32 layers would only
scale both sides).

Needs a GPU and the optional ``liger-kernel`` package; the rehearsal on the CPU runs everything but
Liger's patch (its kernels are GPU Triton kernels) and says so.
"""

from __future__ import annotations

import torch

import regap_fast
from common import time_interleaved

SHAPES = {"gpu": dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=16,
                                  image_size=336, patch_size=14),
                      text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=4, num_attention_heads=32,
                                num_key_value_heads=32, vocab_size=32000),
                      batch=4, caption=64),
          "tiny": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=32, patch_size=8),
                       text=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=2, vocab_size=256),
                       batch=2, caption=8)}
IMAGE_TOKEN = 3


def build_llava(shape: dict, device, dtype):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**shape["vision"]), text_config=LlamaConfig(**shape["text"]),
                      image_token_index=IMAGE_TOKEN, projector_hidden_act="gelu", vision_feature_layer=-2)
    model = LlavaForConditionalGeneration(cfg).to(device, dtype)
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)  # stage 1: only the projector trains
    return model.train()


def batch_for(model, shape: dict, device, dtype) -> dict:
    vc = model.config.vision_config
    n_img = (vc.image_size // vc.patch_size) ** 2
    B, n_cap, V = shape["batch"], shape["caption"], model.config.text_config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.ones(B, 1, dtype=torch.long), torch.full((B, n_img), IMAGE_TOKEN),
                     torch.randint(10, V, (B, n_cap), generator=g)], 1)
    labels = torch.full_like(ids, -100)
    labels[:, 1 + n_img:] = ids[:, 1 + n_img:]
    pixels = torch.randn(B, 3, vc.image_size, vc.image_size, generator=g)
    return {"input_ids": ids.to(device), "labels": labels.to(device), "pixel_values": pixels.to(device, dtype)}


def _step(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        out = model(**batch)
        torch.autograd.grad(out.loss, params)
        return out.loss.detach().float()
    return step


def section(rehearse: bool, device, dtype, ceilings: dict, quick: bool = True, log=print) -> dict:
    shape = SHAPES["tiny" if rehearse else "gpu"]
    try:
        import liger_kernel
        from liger_kernel.transformers import apply_liger_kernel_to_llava
    except ImportError:
        if not rehearse:
            raise RuntimeError("liger-kernel is not installed (an optional dependency: bring its wheel, see "
                               "docs/development.md)") from None
        apply_liger_kernel_to_llava, liger_kernel = None, None
    # three models with the same weights (build_llava seeds itself)
    reference = regap_fast.apply_regap(build_llava(shape, device, dtype), regap_weight=0.1)
    batch = batch_for(reference, shape, device, dtype)
    liger, liger_regap = build_llava(shape, device, dtype), build_llava(shape, device, dtype)
    if apply_liger_kernel_to_llava is not None and not rehearse:
        apply_liger_kernel_to_llava(model=liger)
        apply_liger_kernel_to_llava(model=liger_regap)
    regap_fast.apply_regap(liger_regap, regap_weight=0.1)
    steps = {"reference": _step(reference, batch), "liger": _step(liger, batch),
             "liger_regap": _step(liger_regap, batch)}
    losses = {k: fn().item() for k, fn in steps.items()}
    times = time_interleaved({k: [v] for k, v in steps.items()}, warmup=1 if rehearse else 3,
                             rounds=1 if rehearse else 6 if quick else 15, per_round=1 if rehearse else 2)
    res = {"liger_version": getattr(liger_kernel, "__version__", "not installed" if liger_kernel is None else "?"),
           "liger_applied": apply_liger_kernel_to_llava is not None and not rehearse,
           "description": f"LLaVA, CLIP {shape['vision']['hidden_size']} x {shape['vision']['num_hidden_layers']} "
                          f"layers, Llama {shape['text']['hidden_size']} x {shape['text']['num_hidden_layers']} "
                          f"layers, batch {shape['batch']}, {dtype}, stage 1, lambda 0.1",
           "losses": losses,
           "loss_rel_diff": abs(losses["liger_regap"] - losses["reference"]) / abs(losses["reference"]),
           "time_ratio": times["liger_regap"]["median_ms"] / times["liger"]["median_ms"], **times}
    log(f"  liger: losses {losses}, Liger+REGAP / Liger {res['time_ratio']:.4f}"
        + ("" if res["liger_applied"] else " (rehearsal: Liger's patch not applied)"))
    return res
