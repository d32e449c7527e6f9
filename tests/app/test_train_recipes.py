"""Training recipes (llava-1.5, sharegpt4v, minigpt4): presets and their overrides, what trains, REGAP's
gradient into the vision tower and the embedding table, and a few stage-1 steps of each architecture."""

import argparse
import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from regap_fast import gap_loss_reference
from regap_fast.data import IGNORE_INDEX, Collator, synthetic
from regap_fast.model import ModelConfig, VisionLanguageModel
from regap_fast.train import TrainConfig, train
from regap_fast.train.config import add_config_arguments, config_from_args
from regap_fast.train.layout import latest_checkpoint
from regap_fast.train.model_setup import describe_trainable, setup_stage, vision_blocks_to_train
from regap_fast.train.recipes import RECIPES

from helpers import TINY_TEXT, all_backend_params, blip2_config, images

TINY_CLIP4 = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, image_size=32, patch_size=16, projection_dim=32)


def parse(*argv) -> TrainConfig:
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    return config_from_args(p.parse_args(list(argv)))


# --------------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------------


def test_presets_set_what_the_papers_used():
    c = parse("--recipe", "llava-1.5")
    assert (c.arch, c.stage, c.train_vision, c.lm_trainable(), c.peak_lr(), c.warmup_ratio, c.global_batch_size) == \
        ("llava", 1, "none", False, 1e-3, 0.03, 256)
    assert c.image_aspect_ratio == "pad"  # LLaVA-1.5's --image_aspect_ratio pad
    assert parse("--recipe", "llava-1.5", "--image-aspect-ratio", "keep").image_aspect_ratio == "keep"
    c = parse("--recipe", "sharegpt4v")
    assert (c.arch, c.stage, c.train_vision, c.lm_trainable(), c.peak_lr(), c.global_batch_size) == \
        ("llava", 1, "latter-half", True, 2e-5, 256)
    c = parse("--recipe", "minigpt4")
    assert (c.arch, c.train_vision, c.lm_trainable(), c.peak_lr(), c.weight_decay, c.global_batch_size,
            c.max_steps, c.warmup_ratio, c.min_lr_ratio) == ("minigpt4", "none", False, 1e-4, 0.05, 256, 20000,
                                                            0.25, 0.8)
    plain = parse()  # no recipe: the defaults, unchanged
    assert (plain.arch, plain.train_vision, plain.lm_trainable(), plain.peak_lr()) == ("llava", "none", False, 1e-3)
    assert plain.image_aspect_ratio == "keep"


def test_an_explicit_flag_beats_the_preset():
    c = parse("--recipe", "sharegpt4v", "--lr", "1e-5", "--no-train-lm", "--global-batch-size", "64")
    assert (c.lr, c.train_lm, c.global_batch_size, c.train_vision) == (1e-5, False, 64, "latter-half")
    # even a flag that repeats the built-in default: MiniGPT-4's preset says weight decay 0.05
    c = parse("--recipe", "minigpt4", "--weight-decay", "0", "--warmup-ratio", "0.03", "--arch", "llava")
    assert (c.weight_decay, c.warmup_ratio, c.arch, c.lr) == (0.0, 0.03, "llava", 1e-4)
    # from Python: from_recipe marks its keywords as explicit
    c = TrainConfig.from_recipe("minigpt4", weight_decay=0.0, max_steps=5)
    assert (c.weight_decay, c.max_steps, c.lr) == (0.0, 5, 1e-4)
    # and a plain TrainConfig(recipe=...) fills the fields left at their defaults
    c = TrainConfig(recipe="sharegpt4v", lr=3e-5)
    assert (c.lr, c.train_vision, c.train_lm) == (3e-5, "latter-half", True)


def test_bad_recipe_settings_are_refused():
    with pytest.raises(ValueError, match="unknown recipe"):
        TrainConfig(recipe="llava-2")
    with pytest.raises(ValueError, match="--train-vision"):
        TrainConfig(train_vision="half").check()
    with pytest.raises(ValueError, match="--lora is for stage 2"):
        TrainConfig(lora=True).check()
    TrainConfig.from_recipe("sharegpt4v", lora=True).check()  # the LM trains: LoRA is allowed
    assert set(RECIPES) == {"llava-1.5", "sharegpt4v", "minigpt4"}


def test_vision_blocks_to_train():
    torch.manual_seed(0)
    vlm = VisionLanguageModel.from_config(ModelConfig(vision_config=TINY_CLIP4, text_config=TINY_TEXT))
    # LLaVA's features come from the penultimate layer: block 3 never feeds the projector
    assert vision_blocks_to_train(vlm, "latter-half") == [2]
    assert vision_blocks_to_train(vlm, "all") == [0, 1, 2]
    assert vision_blocks_to_train(vlm, "1") == [1, 2] == vision_blocks_to_train(vlm, "-3")
    assert vision_blocks_to_train(vlm, "none") == []
    m4 = VisionLanguageModel.from_config(ModelConfig(arch="minigpt4", vision_config=blip2_config(vision_layers=4),
                                                     text_config=TINY_TEXT))
    assert vision_blocks_to_train(m4, "latter-half") == [2, 3]  # the ViT's last state feeds the Q-Former


# --------------------------------------------------------------------------------------------------
# sharegpt4v: REGAP's gradient reaches the vision tower's trainable blocks and the embedding table
# --------------------------------------------------------------------------------------------------


def _tiny(arch):
    torch.manual_seed(0)
    if arch == "llava":
        return VisionLanguageModel.from_config(ModelConfig(vision_config=TINY_CLIP4, text_config=TINY_TEXT))
    return VisionLanguageModel.from_config(ModelConfig(arch="minigpt4", vision_config=blip2_config(vision_layers=4),
                                                       text_config=TINY_TEXT))


def _batch(vlm, captions, with_image=(True, True, True)):
    enc = vlm.encoder("plain")
    exs = []
    for i, (c, im) in enumerate(zip(captions, with_image)):
        ex = enc.encode([{"from": "gpt", "value": c}], has_image=im)
        ex["pixel_values"] = vlm.image_transform(images(1, seed=i)[0]) if im else None
        exs.append(ex)
    return Collator(vlm.tokenizer.pad_token_id)(exs)


def _unfused(vlm, b, lam):
    """The same loss through plain PyTorch modules: the vision tower, the projector as F.linear (+ GELU),
    the caption side as F.embedding rows, the reference gap loss; the LM on the spliced embeddings."""
    tower, proj = vlm.vision_tower, vlm.projector
    if vlm.config.arch == "llava":
        feats = tower(pixel_values=b["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
        img = F.linear(F.gelu(F.linear(feats, proj.linear_1.weight, proj.linear_1.bias)),
                       proj.linear_2.weight, proj.linear_2.bias)
    else:
        img = F.linear(tower(b["pixel_values"]), proj.weight, proj.bias)
    table = vlm.language_model.get_input_embeddings().weight
    emb = F.embedding(b["input_ids"], table)
    has = b["image_mask"].any(1)
    gap = gap_loss_reference(img, emb[has], None, b["caption_mask"][has])
    spliced = emb.masked_scatter(b["image_mask"].unsqueeze(-1), img)
    logits = vlm.language_model(inputs_embeds=spliced).logits
    lm = F.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    return gap, lm + lam * gap


@pytest.mark.parametrize("backend", [p for p in all_backend_params("projector") if p.values[0] != "cuda"])
@pytest.mark.parametrize("arch", ["llava", "minigpt4"])
@pytest.mark.slow
def test_sharegpt4v_regap_gradients_equal_the_unfused_reference(arch, backend):
    vlm = _tiny(arch)
    vlm.projector.backend = vlm.config.projector_backend = backend
    setup_stage(vlm, TrainConfig.from_recipe("sharegpt4v"), bf16=False)
    vlm.train()
    blocks, _ = vlm.vision_blocks()
    trained_blocks = [2] if arch == "llava" else [2, 3]
    trainable = [p for i in trained_blocks for p in blocks[i].parameters()]
    table = vlm.language_model.get_input_embeddings().weight
    assert all(p.requires_grad for p in trainable) and table.requires_grad
    frozen = [(n, p) for n, p in vlm.vision_tower.named_parameters()
              if not any(p is q for q in trainable)]
    assert frozen and not any(p.requires_grad for _, p in frozen)

    b = _batch(vlm, ["a red circle", "a large blue star on the left", "a small cyan square at the top"])
    lam = 0.7
    inputs = {k: b[k] for k in ("input_ids", "pixel_values", "image_mask", "labels", "caption_mask")}
    out = vlm(**inputs, regap_weight=lam)
    wrt = trainable + [table] + list(vlm.projector.parameters())
    gap_ref, loss_ref = _unfused(vlm, b, lam)
    torch.testing.assert_close(out["gap"], gap_ref, rtol=1e-5, atol=1e-6)
    # REGAP's own gradient: into the trainable vision blocks, the embedding table (the caption side), the projector
    got = torch.autograd.grad(out["gap"], wrt, retain_graph=True)
    want = torch.autograd.grad(gap_ref, wrt, retain_graph=True)
    for i, (g, w) in enumerate(zip(got, want)):
        assert w.abs().max() > 0, i  # the reference really has a gradient there
        torch.testing.assert_close(g, w, rtol=2e-4, atol=1e-6, msg=f"gap gradient {i}")
    # the full loss: the LM's gradient and REGAP's add up right on the shared table
    got = torch.autograd.grad(out["loss"], wrt, retain_graph=True)
    want = torch.autograd.grad(loss_ref, wrt)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=2e-4, atol=1e-6, msg=f"loss gradient {i}")
    # frozen blocks (and the embeddings, the norms, the Q-Former) get no gradient at all
    out["loss"].backward()
    assert all(p.grad is None for _, p in frozen), [n for n, p in frozen if p.grad is not None][:3]
    assert all(p.grad is not None for p in trainable)


def test_text_only_batch_still_gives_trained_vision_blocks_a_gradient():
    """DDP wants a gradient for every trained parameter at every step, even on a batch with no image."""
    vlm = _tiny("llava")
    setup_stage(vlm, TrainConfig.from_recipe("sharegpt4v", stage=2), bf16=False)
    b = _batch(vlm, ["a red circle"], with_image=(False,))
    assert b["pixel_values"] is None
    vlm(b["input_ids"], labels=b["labels"])["loss"].backward()
    blocks, _ = vlm.vision_blocks()
    for p in blocks[2].parameters():
        assert p.grad is not None and not p.grad.any()
    assert "vision_tower: " in describe_trainable(vlm) and "encoder.layers.[2]" in describe_trainable(vlm)


# --------------------------------------------------------------------------------------------------
# a few stage-1 steps of each architecture and recipe: REGAP closes the gap
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return synthetic.write_dataset(tmp_path_factory.mktemp("shapes"), n=120, seed=0, image_size=32)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """The two architectures, small (32 px images, 3 query tokens), saved: --model for the runs below."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: _tiny(arch).save_pretrained(root / arch) for arch in ("llava", "minigpt4")}


def _run(out, data, model, recipe, lam, **kw):
    base = dict(out=str(out), data=str(data), model=str(model), global_batch_size=8, micro_batch_size=8,
                max_steps=10, eval_samples=12, eval_every=0, num_workers=0, progress=False, plot=False,
                tensorboard=False, save_model=False, warmup_ratio=0.0, regap_weight=lam)
    return train(TrainConfig.from_recipe(recipe, **{**base, **kw}))


@pytest.mark.parametrize("recipe, lr", [("minigpt4", 3e-3), ("sharegpt4v", 1e-3)])
@pytest.mark.slow
def test_stage1_steps_regap_ends_with_a_smaller_gap(tmp_path, shapes, tiny_models, recipe, lr, caplog):
    caplog.set_level(logging.INFO, logger="regap_fast.train")
    model = tiny_models[RECIPES[recipe].settings["arch"]]
    runs = {lam: _run(tmp_path / f"l{lam}", shapes, model, recipe, lam, lr=lr) for lam in (0.0, 1.0)}
    assert runs[0.0]["initial_gap"] == runs[1.0]["initial_gap"]
    assert runs[1.0]["final_gap"] < runs[0.0]["final_gap"], runs
    assert runs[1.0]["final_gap"] < runs[1.0]["initial_gap"]
    s = runs[1.0]
    assert s["recipe"] == recipe and s["arch"] == RECIPES[recipe].settings["arch"]
    # the log says which parameters train, and how many
    assert f"{s['trainable_parameters']:,} trainable parameters" in caplog.text
    assert "trainable parameters: " in caplog.text
    weights = load_file(str(latest_checkpoint(tmp_path / "l1.0") / "trainable.safetensors"))
    if recipe == "minigpt4":  # the linear layer only
        assert sorted(weights) == ["projector.bias", "projector.weight"]
        assert s["trainable"].startswith("vision_tower: frozen") and "language_model: frozen" in s["trainable"]
    else:  # the latter half of the tower (that feeds the projector), the projector, the LM
        parts = {k.split(".")[0] for k in weights}
        assert parts == {"vision_tower", "projector", "language_model"}
        # of 4 blocks: the latter half that feeds the penultimate-layer features, block 2 (block 3 is unused)
        assert {k.split(".")[3] for k in weights if k.startswith("vision_tower.")} == {"2"}
        assert "language_model: all" in s["trainable"]


def test_minigpt4_cli_with_projector_weights(tmp_path, shapes):
    """`regap-fast train --recipe minigpt4 --projector-weights stage1.pth` (the tiny default): the projector
    starts from the checkpoint's llama_proj."""
    from regap_fast.cli import main

    w = torch.randn(64, 64) * 0.01  # the tiny default: Q-Former hidden 64 -> LM hidden 64
    torch.save({"model": {"llama_proj.weight": w, "llama_proj.bias": torch.zeros(w.shape[0])}}, tmp_path / "s1.pth")
    rc = main(["train", "--recipe", "minigpt4", "--out", str(tmp_path / "run"), "--data", str(shapes),
               "--projector-weights", str(tmp_path / "s1.pth"), "--max-steps", "1", "--global-batch-size", "4",
               "--micro-batch-size", "4", "--eval-samples", "8", "--num-workers", "0", "--no-progress", "--no-plot",
               "--no-tensorboard", "--lr", "1e-12"])
    assert rc == 0
    from regap_fast.model import load_model

    m = load_model(tmp_path / "run" / "model")
    assert m.config.arch == "minigpt4"
    torch.testing.assert_close(m.projector.weight, w, rtol=0, atol=1e-9)
