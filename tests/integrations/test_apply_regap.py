"""apply_regap's API and edge cases: the fast path against the generic one, several images per sample,
videos, special and spelled-out caption tokens, re-applying, removing, gradient accumulation, bf16,
checkpointing, torch.compile, the Trainer, and one clear RegapError for each bad input.

The reference is always the unpatched model plus the gap computed by hand in float64 from the
``inputs_embeds`` its language model received (``vlm_families.expected``).
"""

import copy
import types

import pytest
import torch
from helpers import gaps_float64
from torch import nn

transformers = pytest.importorskip("transformers")

from regap_fast.core import RegapError  # noqa: E402
from regap_fast.integrations.transformers import (RegapCallback, apply_regap, regap_state,  # noqa: E402
                                                  remove_regap)
from vlm_families import (BOS, BY_NAME, END, EOS, FIRST_WORD, IMAGE, PAD, START, TEXT, VIDEO,  # noqa: E402
                          caption_items, collate, expected, make_batch, received_embeds)

LLAVA, QWEN2 = BY_NAME["LLaVA-1.5"], BY_NAME["Qwen2-VL"]
FAST = [pytest.param(BY_NAME[n], id=n) for n in ("LLaVA-1.5", "BLIP-2", "InstructBLIP")]


def grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def patched(family, **settings):
    """(the family's tiny model patched with ``settings``, an unpatched copy of it)."""
    model = family.build()
    vanilla = copy.deepcopy(model)
    return apply_regap(model, **settings), vanilla


# --------------------------------------------------------------------------------------------------
# the fast path is the generic path, computed differently
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("family", FAST)
def test_fast_path_gives_the_generic_paths_loss_and_gradients(family, squared):
    fast = family.build()
    generic, vanilla = copy.deepcopy(fast), copy.deepcopy(fast)
    kind = type(generic.get_submodule(family.connector))
    apply_regap(fast, regap_weight=0.5, squared=squared)
    apply_regap(generic, regap_weight=0.5, squared=squared, fuse_projector=False)
    assert regap_state(fast).fused is not None and regap_state(generic).fused is None
    assert type(generic.get_submodule(family.connector)) is kind  # the generic path leaves the modules be
    batch, image_pos, caption = make_batch(family)
    a, b = fast(**batch), generic(**batch)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-7)
    _, gap, _ = expected(vanilla, family, batch, image_pos, caption, 0.5, squared=squared)
    torch.testing.assert_close(a.regap_gap.double(), gap, rtol=1e-5, atol=1e-6)
    a.loss.backward(), b.loss.backward()
    theirs = grads(generic)
    assert grads(fast).keys() == theirs.keys()
    for name, g in grads(fast).items():
        torch.testing.assert_close(g, theirs[name], rtol=1e-4, atol=1e-7, msg=name)


def test_precomputed_image_features_take_the_generic_path_in_that_forward():
    """mm_encoder_outputs bypass the projector call: the gap comes from the LLM's inputs_embeds instead."""
    model = apply_regap(LLAVA.build(), regap_weight=1.0)
    batch, _, _ = make_batch(LLAVA)
    features = model.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True)
    precomputed = dict({k: v for k, v in batch.items() if k != "pixel_values"}, mm_encoder_outputs={"image": features})
    torch.testing.assert_close(model(**precomputed).regap_gap, model(**batch).regap_gap, rtol=1e-6, atol=1e-7)


def test_fuse_projector_can_be_switched_by_applying_again():
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    model = apply_regap(LLAVA.build())
    assert regap_state(model).fused is not None
    apply_regap(model, fuse_projector=False)
    assert regap_state(model).fused is None and type(model.model.multi_modal_projector) is LlavaMultiModalProjector
    apply_regap(model, fuse_projector=True)
    assert type(model.model.multi_modal_projector) is not LlavaMultiModalProjector


# --------------------------------------------------------------------------------------------------
# which tokens count
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [pytest.param(LLAVA, id="fast"), pytest.param(QWEN2, id="generic")])
def test_several_images_per_sample_and_a_text_only_sample(family):
    """Images map to samples through their placeholders; a sample without an image is left out of the mean."""
    model, vanilla = patched(family, regap_weight=1.0)
    batch, image_pos, caption = make_batch(family, images_per_sample=(2, 0, 1))
    assert image_pos.sum(1).tolist()[1] == 0
    _, gap, loss = expected(vanilla, family, batch, image_pos, caption, 1.0)
    out = model(**batch)
    torch.testing.assert_close(out.regap_gap.double(), gap, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), loss, rtol=1e-5, atol=1e-6)


def video_batch(seed=0):
    """Qwen2-VL: sample 0 holds an image, sample 1 a video (4 tokens each after the 2x2 merge)."""
    g = torch.Generator().manual_seed(seed)
    caps = [torch.randint(FIRST_WORD, 64, (n,), generator=g).tolist() for n in (4, 3)]
    rows = [[BOS, START] + [token] * 4 + [END] + cap + [EOS] for token, cap in zip((IMAGE, VIDEO), caps)]
    width = max(map(len, rows))
    ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    caption = torch.zeros_like(ids, dtype=torch.bool)
    for b, cap in enumerate(caps):
        caption[b, 7:7 + len(cap)] = True
    labels = torch.where(caption | (ids == EOS), ids, -100)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": (ids != PAD).long(),
             "pixel_values": torch.randn(16, 96, generator=g), "image_grid_thw": torch.tensor([[1, 4, 4]]),
             "pixel_values_videos": torch.randn(16, 96, generator=g), "video_grid_thw": torch.tensor([[1, 4, 4]]),
             "mm_token_type_ids": ((ids == IMAGE).int() + 2 * (ids == VIDEO).int())}
    return batch, ids == IMAGE, ids == VIDEO, caption


def test_video_tokens_count_as_image_tokens_unless_left_out():
    batch, image_pos, video_pos, caption = video_batch()
    model = QWEN2.build()
    vanilla = copy.deepcopy(model)
    _, with_video, _ = expected(vanilla, QWEN2, batch, image_pos | video_pos, caption, 1.0)
    _, images_only, _ = expected(vanilla, QWEN2, batch, image_pos, caption, 1.0)
    assert abs(float(with_video - images_only)) > 1e-4  # the video sample changes the mean
    torch.testing.assert_close(apply_regap(model, regap_weight=1.0)(**batch).regap_gap.double(), with_video,
                               rtol=1e-5, atol=1e-6)
    apply_regap(model, regap_weight=1.0, include_video=False)
    torch.testing.assert_close(model(**batch).regap_gap.double(), images_only, rtol=1e-5, atol=1e-6)
    only_video = {k: v for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
    only_video["input_ids"] = torch.where(image_pos, PAD, batch["input_ids"])
    only_video["mm_token_type_ids"] = 2 * video_pos.int()
    assert "regap_gap" not in model(**only_video)  # no image left: the forward is vanilla


@pytest.mark.parametrize("family", [pytest.param(LLAVA, id="fast"), pytest.param(QWEN2, id="generic")])
def test_special_tokens_are_not_caption_tokens(family):
    """A caption token id declared special (e.g. a chat-template marker) leaves the caption side."""
    batch, image_pos, caption = make_batch(family)
    marker = int(batch["input_ids"][0][caption[0]][0])
    model, vanilla = patched(family, regap_weight=1.0, special_token_ids=[marker])
    _, gap, _ = expected(vanilla, family, batch, image_pos, caption & (batch["input_ids"] != marker), 1.0)
    torch.testing.assert_close(model(**batch).regap_gap.double(), gap, rtol=1e-5, atol=1e-6)


def test_a_batch_may_spell_out_its_caption_tokens():
    """caption_mask in the batch wins over the labels (e.g. labels that also cover a separator)."""
    model, vanilla = patched(LLAVA, regap_weight=1.0)
    batch, image_pos, caption = make_batch(LLAVA)
    caption &= torch.arange(caption.shape[1]) % 2 == 0  # any subset, not derivable from the labels
    _, gap, _ = expected(vanilla, LLAVA, batch, image_pos, caption, 1.0)
    torch.testing.assert_close(model(**batch, caption_mask=caption).regap_gap.double(), gap, rtol=1e-5, atol=1e-6)
    unlabeled = {k: v for k, v in batch.items() if k != "labels"}
    assert torch.equal(model(**unlabeled, caption_mask=caption).logits, vanilla(**unlabeled).logits)
    with pytest.raises(RegapError, match="caption_mask must be a bool tensor"):
        model(**batch, caption_mask=caption.long())


# --------------------------------------------------------------------------------------------------
# the patch itself
# --------------------------------------------------------------------------------------------------


def test_patch_is_per_instance_and_keeps_the_same_parameters():
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    model, other = LLAVA.build(), LLAVA.build()
    before = {n: p for n, p in model.named_parameters()}
    apply_regap(model)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)  # same tensors
    assert type(other.model.multi_modal_projector) is LlavaMultiModalProjector
    assert "forward" not in other.__dict__ and regap_state(other) is None


@pytest.mark.parametrize("family", [pytest.param(LLAVA, id="fast"), pytest.param(QWEN2, id="generic")])
def test_a_deep_copy_of_a_patched_model_is_patched_on_its_own(family):
    """copy.deepcopy after a training forward (EMA weights, an evaluation copy): its own state, same loss."""
    model = apply_regap(family.build(), regap_weight=0.5)
    batch, _, _ = make_batch(family)
    out = model(**batch)
    clone = copy.deepcopy(model)
    assert regap_state(clone) is not regap_state(model) and regap_state(clone).last_regap_term is None
    torch.testing.assert_close(clone(**batch).loss, out.loss, rtol=0, atol=0)
    apply_regap(clone, regap_weight=0.0)
    assert regap_state(model).weight == 0.5 and "regap_gap" in model(**batch)


def test_save_pretrained_writes_the_vanilla_checkpoint(tmp_path):
    from safetensors.torch import load_file

    model = LLAVA.build()
    vanilla = copy.deepcopy(model)
    apply_regap(model, regap_weight=0.2)
    with torch.no_grad():  # a trained projector: the saved weights must be the patched model's
        model.model.multi_modal_projector.linear_2.weight.add_(0.5)
        vanilla.model.multi_modal_projector.linear_2.weight.add_(0.5)
    model.save_pretrained(tmp_path / "patched")
    vanilla.save_pretrained(tmp_path / "vanilla")
    ours, theirs = (load_file(tmp_path / d / "model.safetensors") for d in ("patched", "vanilla"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (tmp_path / "patched/config.json").read_text() == (tmp_path / "vanilla/config.json").read_text()


@pytest.mark.parametrize("family", [pytest.param(LLAVA, id="fast"), pytest.param(QWEN2, id="generic")])
def test_remove_regap_restores_the_vanilla_model(family):
    model = family.build()
    vanilla = copy.deepcopy(model)
    kind = type(model.get_submodule(family.connector))
    apply_regap(model)
    remove_regap(model)
    assert type(model.get_submodule(family.connector)) is kind and "forward" not in model.__dict__
    batch, _, _ = make_batch(family)
    assert torch.equal(model(**batch).loss, vanilla(**batch).loss)
    with pytest.raises(RegapError, match="was not patched"):
        remove_regap(model)


@pytest.mark.parametrize("family", [pytest.param(LLAVA, id="fast"), pytest.param(QWEN2, id="generic")])
def test_applied_again_on_top_of_another_patch_counts_the_gap_once(family):
    """Someone patches the forward after us (as TRL and Liger do); applying again wraps theirs, gap added once."""
    model = family.build()
    vanilla = copy.deepcopy(model)
    apply_regap(model, regap_weight=0.5)
    below = model.forward
    model.forward = types.MethodType(lambda self, **kw: below(**kw), model)
    apply_regap(model, regap_weight=0.5)
    batch, image_pos, caption = make_batch(family)
    _, _, loss = expected(vanilla, family, batch, image_pos, caption, 0.5)
    torch.testing.assert_close(model(**batch).loss.double(), loss, rtol=1e-5, atol=1e-6)


def test_a_weighed_step_makes_each_forward_its_share_of_the_steps_mean_gap():
    """weigh_step over three micro-batches like this one: each forward adds lambda * its gap sum / 9 samples."""
    from regap_fast.integrations.transformers import end_weighing, weigh_step

    model, vanilla = patched(QWEN2, regap_weight=0.4)
    model.train(), vanilla.train()
    batch, image_pos, caption = make_batch(QWEN2)
    _, gap, _ = expected(vanilla, QWEN2, batch, image_pos, caption, 0.4)
    assert weigh_step(model, [batch] * 3, loss_scale=2.0) == 9
    out = model(**batch)
    torch.testing.assert_close((out.loss - out.lm_loss).double(), 2.0 * 0.4 * 3 * gap / 9, rtol=1e-5, atol=1e-7)
    end_weighing(model)
    out = model(**batch)
    torch.testing.assert_close((out.loss - out.lm_loss).double(), 0.4 * gap, rtol=1e-5, atol=1e-7)


def test_num_items_in_batch_without_the_step_weighing_is_an_error_that_says_what_to_call():
    """The Trainer's num_items_in_batch means micro-batch losses are summed: REGAP needs the step's sample count."""
    model, _ = patched(LLAVA, regap_weight=0.4)
    batch, _, _ = make_batch(LLAVA)
    with pytest.raises(RegapError, match=r"RegapCallback.attach\(trainer\)"):
        model.train()(**batch, num_items_in_batch=30)
    assert model.eval()(**batch, num_items_in_batch=30).regap_gap > 0  # eval: the batch's own mean


@pytest.mark.parametrize("family", [pytest.param(LLAVA, id="fast"), pytest.param(QWEN2, id="generic")])
def test_bf16_autocast(family):
    model, vanilla = patched(family, regap_weight=0.5)
    batch, image_pos, caption = make_batch(family)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
        ref, embeds = received_embeds(vanilla, family, batch)
    gaps, valid = gaps_float64(embeds, embeds, image_pos, caption)
    assert out.regap_gap.dtype == torch.float32
    torch.testing.assert_close(out.regap_gap.double(), gaps.sum() / valid.sum(), rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(out.lm_loss, ref.loss, rtol=0, atol=0)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.get_submodule(family.connector).parameters())


def test_bf16_weights():
    model = LLAVA.build().to(torch.bfloat16)
    vanilla = copy.deepcopy(model)
    apply_regap(model, regap_weight=0.5)
    batch, image_pos, caption = make_batch(LLAVA)
    batch["pixel_values"] = batch["pixel_values"].bfloat16()
    _, gap, loss = expected(vanilla, LLAVA, batch, image_pos, caption, 0.5)
    out = model(**batch)
    torch.testing.assert_close(out.regap_gap.double(), gap, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(out.loss.double(), loss, rtol=1e-2, atol=1e-3)
    out.loss.backward()
    grad = model.model.multi_modal_projector.linear_1.weight.grad
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all()


@pytest.mark.slow
@pytest.mark.parametrize("family", [pytest.param(LLAVA, id="fast"), pytest.param(QWEN2, id="generic")])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(family):
    model = family.build().train()
    checkpointed = copy.deepcopy(model)
    checkpointed.gradient_checkpointing_enable({"use_reentrant": False})
    assert checkpointed.is_gradient_checkpointing
    for m in (model, checkpointed):
        apply_regap(m, regap_weight=0.5)
    batch, _, _ = make_batch(family)
    a, b = model(**batch), checkpointed(**batch)
    a.loss.backward(), b.loss.backward()
    torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=0)
    theirs = grads(checkpointed)
    assert grads(model).keys() == theirs.keys()
    for name, g in grads(model).items():
        torch.testing.assert_close(theirs[name], g, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("fuse", [pytest.param(None, id="fast"), pytest.param(False, id="generic")])
def test_torch_compile_matches_eager(fuse):
    """torch.compile with the aot_eager backend (dynamo + AOTAutograd, no inductor codegen: fast on a CPU)."""
    torch._dynamo.reset()  # no frames compiled by other tests (see the next test)
    model = apply_regap(LLAVA.build().train(), regap_weight=0.5, fuse_projector=fuse)
    batch, _, _ = make_batch(LLAVA)
    eager = model(**batch)
    eager.loss.backward()
    grad = model.model.multi_modal_projector.linear_1.weight.grad.clone()
    model.zero_grad()
    out = torch.compile(model, backend="aot_eager")(**batch)
    out.loss.backward()
    torch.testing.assert_close(out.loss, eager.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.regap_gap, eager.regap_gap, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.model.multi_modal_projector.linear_1.weight.grad, grad, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_a_class_compiled_before_the_patch_is_an_error_that_says_what_to_do():
    """Dynamo does not re-check module hooks: a frame compiled for a vanilla model would skip the generic hook."""
    torch._dynamo.reset()
    batch, _, _ = make_batch(LLAVA)
    torch.compile(LLAVA.build(), backend="aot_eager")(**batch)
    patched = torch.compile(apply_regap(LLAVA.build(), fuse_projector=False), backend="aot_eager")
    with pytest.raises(RegapError, match=r"call torch._dynamo.reset\(\)"):
        patched(**batch)
    torch._dynamo.reset()  # (test_torch_compile_matches_eager[generic]: after a reset it works)


# --------------------------------------------------------------------------------------------------
# errors: one clear line
# --------------------------------------------------------------------------------------------------


def test_models_that_are_not_supported_say_why():
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration, LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=64))
    with pytest.raises(RegapError, match="needs a transformers vision-language model .* got LlamaForCausalLM"):
        apply_regap(lm)
    with torch.device("meta"):  # the structure is enough to refuse
        chameleon = ChameleonForConditionalGeneration(ChameleonConfig(
            hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
            vocabulary_map={"<image>": IMAGE},
            vq_config=dict(embed_dim=32, num_embeddings=8, base_channels=32, channel_multiplier=[1],
                           latent_channels=32)))
    with pytest.raises(RegapError, match="discrete VQ token ids"):
        apply_regap(chameleon)
    t5_blip = transformers.Blip2Config(text_config=transformers.T5Config(d_model=16, d_ff=16, num_layers=1,
                                                                        num_heads=2, vocab_size=64).to_dict())
    with torch.device("meta"):
        model = transformers.Blip2ForConditionalGeneration(t5_blip)
    with pytest.raises(RegapError, match="encoder-decoder language model"):
        apply_regap(model)
    no_placeholder = LLAVA.build()
    no_placeholder.config.image_token_id = None
    with pytest.raises(RegapError, match="no image_token_id"):
        apply_regap(no_placeholder)


def test_unrecognised_projectors_take_the_generic_path_unless_fusing_is_required():
    model = BY_NAME["LLaVA-1.5"].build()
    model.config.projector_hidden_act = "gelu_pytorch_tanh"  # not the exact GELU the fused kernel computes
    assert regap_state(apply_regap(copy.deepcopy(model))).fused is None
    with pytest.raises(RegapError, match="unrecognised projector.*gelu_pytorch_tanh"):
        apply_regap(model, fuse_projector=True)
    custom = LLAVA.build()
    custom.model.multi_modal_projector = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32))
    with pytest.raises(RegapError, match="unrecognised projector Sequential"):
        apply_regap(custom, fuse_projector=True)
    blip = BY_NAME["BLIP-2"].build()
    blip.language_projection = nn.Sequential(nn.Linear(16, 32))
    with pytest.raises(RegapError, match="language_projection to be one nn.Linear"):
        apply_regap(blip, fuse_projector=True)
    with pytest.raises(RegapError, match="the fused projector exists for"):
        apply_regap(QWEN2.build(), fuse_projector=True)
    with pytest.raises(RegapError, match="plain nn.Embedding"):
        apply_regap(llava_with_gemma3_text(), fuse_projector=True)


def llava_with_gemma3_text():
    """LLaVA-1.5 around a Gemma 3 LLM, whose embedding module scales the rows by sqrt(D)."""
    cfg = LLAVA.config()
    cfg.text_config = transformers.Gemma3TextConfig(**dict(TEXT, head_dim=16))
    torch.manual_seed(0)
    return transformers.LlavaForConditionalGeneration(cfg).eval()


def test_scaled_input_embeddings_take_the_generic_path_and_count_as_the_llm_sees_them():
    model = llava_with_gemma3_text()
    vanilla = copy.deepcopy(model)
    assert regap_state(apply_regap(model, regap_weight=1.0)).fused is None  # the ids' table rows are not the input
    batch, image_pos, caption = make_batch(LLAVA)
    _, gap, loss = expected(vanilla, LLAVA, batch, image_pos, caption, 1.0)
    torch.testing.assert_close(model(**batch).loss.double(), loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", [pytest.param(LLAVA, id="fast"), pytest.param(QWEN2, id="generic")])
def test_batch_errors(family):
    model = apply_regap(family.build())
    batch, image_pos, caption = make_batch(family)
    with pytest.raises(RegapError, match="must align with input_ids"):
        model(**dict(batch, labels=batch["labels"][:, :-1]))
    with pytest.raises(RegapError, match="image_mask must be a bool tensor"):
        model(**batch, image_mask=image_pos.long())
    with pytest.raises(RegapError, match="regap_weight must be"):
        apply_regap(family.build(), regap_weight=-1)
    with pytest.raises(RegapError, match="unknown backend"):
        apply_regap(family.build(), backend="nope")


def test_images_without_placeholders_are_an_error_not_a_zero_gap():
    """BLIP-2 writes its query outputs wherever the placeholders are: none found must not give a silent 0."""
    family = BY_NAME["BLIP-2"]
    for fuse in (None, False):
        model = apply_regap(family.build(), fuse_projector=fuse)
        batch, image_pos, _ = make_batch(family)
        batch["input_ids"] = torch.where(image_pos, FIRST_WORD, batch["input_ids"])
        with pytest.raises(RegapError, match="hold no image placeholder"):
            model(**batch)


# --------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------


def two_layer_llava(seed=1):
    """The tiny LLaVA-1.5 with two vision and two LM layers: enough to show the gap move in 36 steps."""
    cfg = LLAVA.config()
    cfg.vision_config.num_hidden_layers = cfg.text_config.num_hidden_layers = 2
    torch.manual_seed(seed)
    return transformers.LlavaForConditionalGeneration(cfg)


def _train(tmp_path, regap_weight, steps=36):
    from transformers import Trainer, TrainingArguments

    model = two_layer_llava().train()
    if regap_weight:
        apply_regap(model, regap_weight=regap_weight)
    args = TrainingArguments(output_dir=str(tmp_path / f"run{regap_weight}"), max_steps=steps,
                             per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=6, report_to=[],
                             save_strategy="no", use_cpu=True, seed=0, data_seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=caption_items(LLAVA), data_collator=collate)
    if regap_weight:
        RegapCallback.attach(trainer)
    trainer.train()
    return model, [h for h in trainer.state.log_history if "loss" in h]


def _gap_and_lm(model):
    batch = collate(caption_items(LLAVA)[:8])
    probe = apply_regap(copy.deepcopy(model).eval(), regap_weight=1.0) if regap_state(model) is None else model.eval()
    with torch.no_grad():
        out = probe(**batch)
    return float(out.regap_gap), float(out.lm_loss)


@pytest.mark.slow
def test_trainer_logs_the_gap_which_falls_while_the_caption_loss_holds(tmp_path):
    gap0, _ = _gap_and_lm(two_layer_llava())
    regap_model, logs = _train(tmp_path, regap_weight=2.0)
    plain_model, _ = _train(tmp_path, regap_weight=0)
    assert all("regap_gap" in h for h in logs) and len(logs) == 6
    gap_regap, lm_regap = _gap_and_lm(regap_model)
    gap_plain, lm_plain = _gap_and_lm(plain_model)
    assert logs[-1]["regap_gap"] < logs[0]["regap_gap"]
    assert gap_regap < 0.8 * gap0 and gap_regap < 0.5 * gap_plain, (gap0, gap_plain, gap_regap)
    assert abs(lm_regap - lm_plain) < 0.05 * lm_plain, (lm_regap, lm_plain)
