"""regap_fast.apply_regap on transformers' LLaVA / BLIP-2 / InstructBLIP (tiny random models from configs).

Every expectation comes from an unpatched copy of the model: its LM loss, its projector's outputs
(caught with a forward hook) and its input embeddings, put through ``gap_loss_reference`` with the
caption positions the test itself wrote down when it built the batch.
"""

import copy
import types

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from regap_fast import gap_loss_reference  # noqa: E402
from regap_fast.integrations.transformers import (RegapCallback, RegapError, apply_regap,  # noqa: E402
                                                  regap_state, remove_regap)

BOS, EOS, PAD, IMAGE = 1, 2, 0, 39
VOCAB = 40
TOKENS_PER_IMAGE = 4  # 16 px images, 8 px patches, CLS dropped


def tiny_llava(seed=0, **overrides):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=16, patch_size=8),
        text_config=LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=1, vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS,
                                pad_token_id=PAD, max_position_embeddings=64),
        image_token_index=IMAGE, image_seq_length=TOKENS_PER_IMAGE, vision_feature_layer=-1,
        **overrides)
    return LlavaForConditionalGeneration(cfg).eval()


def tiny_blip2(instruct=False, seed=0):
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, InstructBlipConfig,
                              InstructBlipForConditionalGeneration, LlamaConfig)

    torch.manual_seed(seed)
    config_cls, model_cls = ((InstructBlipConfig, InstructBlipForConditionalGeneration) if instruct
                             else (Blip2Config, Blip2ForConditionalGeneration))
    cfg = config_cls(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        qformer_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            cross_attention_frequency=1, encoder_hidden_size=16, vocab_size=VOCAB),
        text_config=LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=1, vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS,
                                pad_token_id=PAD).to_dict(),
        num_query_tokens=TOKENS_PER_IMAGE, image_token_index=IMAGE)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # transformers zeroes the query tokens at init: make the images tell apart
        model.query_tokens.normal_(std=0.5)
    return model


def make_batch(images_per_sample=(1, 1, 1), seed=0, caption_lengths=(5, 3, 6), prompt_lengths=(0, 2, 1)):
    """``<bos> [image tokens] prompt caption <eos> <pad>...``: labels on caption + eos, as LLaVA stage 1.

    Returns the model inputs and the caption mask the test expects (caption tokens only: no eos).
    """
    g = torch.Generator().manual_seed(seed)
    rows, labels, captions = [], [], []
    for n_img, n_cap, n_prompt in zip(images_per_sample, caption_lengths, prompt_lengths):
        prompt = torch.randint(3, IMAGE, (n_prompt,), generator=g).tolist()
        cap = torch.randint(3, IMAGE, (n_cap,), generator=g).tolist()
        ids = [BOS] + [IMAGE] * (TOKENS_PER_IMAGE * n_img) + prompt + cap + [EOS]
        lab = [-100] * (1 + TOKENS_PER_IMAGE * n_img + n_prompt) + cap + [EOS]
        is_cap = [False] * (1 + TOKENS_PER_IMAGE * n_img + n_prompt) + [True] * n_cap + [False]
        rows.append(ids), labels.append(lab), captions.append(is_cap)
    width = max(map(len, rows))
    pad = [width - len(r) for r in rows]
    batch = {
        "input_ids": torch.tensor([r + [PAD] * p for r, p in zip(rows, pad)]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * p for r, p in zip(rows, pad)]),
        "labels": torch.tensor([lab + [-100] * p for lab, p in zip(labels, pad)]),
        "pixel_values": torch.randn(sum(images_per_sample), 3, 16, 16, generator=g),
    }
    return batch, torch.tensor([c + [False] * p for c, p in zip(captions, pad)])


def projector_of(model):
    return model.language_projection if hasattr(model, "language_projection") else model.model.multi_modal_projector


def reference_loss(vanilla, batch, caption, weight, images_per_sample):
    """The unpatched model's LM loss + weight * gap_loss_reference(its projector outputs, its caption embeddings)."""
    seen = []
    handle = projector_of(vanilla).register_forward_hook(lambda m, i, out: seen.append(out))
    out = vanilla(**batch)
    handle.remove()
    per_image = seen[0]  # [num_images, tokens, D]
    # each sample's image tokens, images in order, padded to the most images of any sample
    most = max(images_per_sample)
    D = per_image.shape[-1]
    image_embeds = per_image.new_zeros(len(images_per_sample), most * TOKENS_PER_IMAGE, D)
    image_mask = torch.zeros(len(images_per_sample), most * TOKENS_PER_IMAGE, dtype=torch.bool)
    start = 0
    for b, k in enumerate(images_per_sample):
        if k:
            image_embeds[b, :k * TOKENS_PER_IMAGE] = per_image[start:start + k].reshape(-1, D)
            image_mask[b, :k * TOKENS_PER_IMAGE] = True
        start += k
    text_embeds = vanilla.get_input_embeddings()(batch["input_ids"])
    gap = gap_loss_reference(image_embeds, text_embeds, image_mask, caption)
    return out.loss, gap, out.loss + weight * gap


MODELS = {"llava": tiny_llava, "blip2": tiny_blip2, "instructblip": lambda: tiny_blip2(instruct=True)}


def inputs_for(name, batch):
    if name == "instructblip":  # InstructBLIP's Q-Former reads the instruction too
        batch = dict(batch, qformer_input_ids=batch["input_ids"][:, -3:].clamp(max=VOCAB - 1))
    return batch


@pytest.mark.parametrize("name", list(MODELS))
def test_loss_is_lm_loss_plus_weight_times_reference_gap(name):
    model = MODELS[name]()
    vanilla = copy.deepcopy(model)
    apply_regap(model, regap_weight=0.3)
    batch, caption = make_batch()
    batch = inputs_for(name, batch)
    lm, gap, expected = reference_loss(vanilla, batch, caption, 0.3, (1, 1, 1))
    out = model(**batch)
    assert gap > 1e-2  # a real gap, not a trivially zero one
    torch.testing.assert_close(out.lm_loss, lm, rtol=0, atol=0)
    torch.testing.assert_close(out.regap_gap, gap, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,squared", [("llava", False), ("llava", True), ("blip2", False)])
def test_gradients_match_unfused_reference(name, squared):
    model = MODELS[name]()  # eval mode: the Q-Former's dropout would make two runs differ
    vanilla = copy.deepcopy(model)
    apply_regap(model, regap_weight=0.5, squared=squared)
    batch, caption = make_batch()
    model(**batch).loss.backward()
    seen = []
    projector_of(vanilla).register_forward_hook(lambda m, i, out: seen.append(out))
    out = vanilla(**batch)
    text = vanilla.get_input_embeddings()(batch["input_ids"])
    (out.loss + 0.5 * gap_loss_reference(seen[0], text, None, caption, squared=squared)).backward()
    theirs = dict(vanilla.named_parameters())
    assert all(p.grad.abs().sum() > 0 for p in projector_of(model).parameters())
    for name, p in model.named_parameters():
        if theirs[name].grad is None:  # e.g. the vision tower's post_layernorm: unused by LLaVA
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_several_images_per_sample_and_a_text_only_sample():
    """Images map to samples through the image tokens; a sample without an image is left out of the mean."""
    model = tiny_llava()
    vanilla = copy.deepcopy(model)
    apply_regap(model, regap_weight=1.0)
    per_sample = (2, 0, 1)
    batch, caption = make_batch(images_per_sample=per_sample)
    _, gap, expected = reference_loss(vanilla, batch, caption, 1.0, per_sample)
    out = model(**batch)
    torch.testing.assert_close(out.regap_gap, gap, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(MODELS))
def test_without_labels_or_with_weight_zero_outputs_are_bitwise_vanilla(name):
    model = MODELS[name]()
    vanilla = copy.deepcopy(model)
    batch, _ = make_batch()
    batch = inputs_for(name, batch)
    unlabeled = {k: v for k, v in batch.items() if k != "labels"}
    apply_regap(model, regap_weight=0.5)
    assert torch.equal(model(**unlabeled).logits, vanilla(**unlabeled).logits)
    apply_regap(model, regap_weight=0.0)  # re-applying updates the weight
    out, ref = model(**batch), vanilla(**batch)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)
    assert "regap_gap" not in out


def test_patch_is_per_instance_and_keeps_the_same_parameters():
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    model, other = tiny_llava(), tiny_llava()
    before = {n: p for n, p in model.named_parameters()}
    apply_regap(model)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)  # same tensors
    assert type(other.model.multi_modal_projector) is LlavaMultiModalProjector
    assert "forward" not in other.__dict__ and regap_state(other) is None


def test_save_pretrained_loads_in_vanilla_transformers_with_identical_logits(tmp_path):
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    model = tiny_llava()
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
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "patched").eval()
    batch, _ = make_batch()
    assert torch.equal(loaded(**batch).logits, vanilla(**batch).logits)


def test_remove_regap_restores_the_vanilla_model():
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    model = tiny_llava()
    vanilla = copy.deepcopy(model)
    apply_regap(model)
    remove_regap(model)
    assert type(model.model.multi_modal_projector) is LlavaMultiModalProjector and "forward" not in model.__dict__
    batch, _ = make_batch()
    assert torch.equal(model(**batch).loss, vanilla(**batch).loss)


def test_applied_again_on_top_of_another_patch_counts_the_gap_once():
    """Someone patches the forward after us (as TRL and Liger do); applying again wraps theirs, gap added once."""
    model = tiny_llava()
    vanilla = copy.deepcopy(model)
    apply_regap(model, regap_weight=0.5)
    below = model.forward
    model.forward = types.MethodType(lambda self, **kw: below(**kw), model)
    apply_regap(model, regap_weight=0.5)
    batch, caption = make_batch()
    _, _, expected = reference_loss(vanilla, batch, caption, 0.5, (1, 1, 1))
    torch.testing.assert_close(model(**batch).loss, expected, rtol=1e-5, atol=1e-6)


def test_num_items_in_batch_weights_the_gap_by_the_micro_batch_share():
    """Under gradient accumulation the Trainer passes num_items_in_batch and sums the micro-batch losses."""
    model = tiny_llava()
    vanilla = copy.deepcopy(model)
    apply_regap(model, regap_weight=0.4)
    batch, caption = make_batch()
    total = 3 * int((batch["labels"][:, 1:] != -100).sum())  # as if three micro-batches like this one
    lm, gap, _ = reference_loss(vanilla, dict(batch, num_items_in_batch=total), caption, 0.4, (1, 1, 1))
    out = model(**batch, num_items_in_batch=total)
    torch.testing.assert_close(out.loss, lm + 0.4 * gap / 3, rtol=1e-5, atol=1e-6)


def test_bf16_autocast():
    model = tiny_llava()
    vanilla = copy.deepcopy(model)
    apply_regap(model, regap_weight=0.5)
    batch, caption = make_batch()
    _, gap, _ = reference_loss(vanilla, batch, caption, 0.5, (1, 1, 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
        ref_lm = vanilla(**batch).loss
    assert out.regap_gap.dtype == torch.float32
    torch.testing.assert_close(out.regap_gap, gap, rtol=2e-2, atol=1e-3)  # bf16 projector GEMMs
    torch.testing.assert_close(out.lm_loss, ref_lm, rtol=0, atol=0)
    out.loss.backward()
    assert torch.isfinite(model.model.multi_modal_projector.linear_1.weight.grad).all()


def test_bf16_weights():
    model = tiny_llava().to(torch.bfloat16)
    vanilla = copy.deepcopy(model)
    apply_regap(model, regap_weight=0.5)
    batch, caption = make_batch()
    batch["pixel_values"] = batch["pixel_values"].bfloat16()
    _, gap, expected = reference_loss(vanilla, batch, caption, 0.5, (1, 1, 1))
    out = model(**batch)
    torch.testing.assert_close(out.regap_gap, gap, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(out.loss, expected, rtol=1e-2, atol=1e-3)
    out.loss.backward()
    grad = model.model.multi_modal_projector.linear_1.weight.grad
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all()


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = tiny_llava().train()
    checkpointed = copy.deepcopy(model)
    if hasattr(checkpointed, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        checkpointed.activation_checkpointing_enable({"use_reentrant": False})
    else:
        checkpointed.gradient_checkpointing_enable({"use_reentrant": False})
    assert getattr(checkpointed, "is_activation_checkpointing", None) or checkpointed.is_gradient_checkpointing
    for m in (model, checkpointed):
        apply_regap(m, regap_weight=0.5)
    batch, _ = make_batch()
    a, b = model(**batch), checkpointed(**batch)
    a.loss.backward(), b.loss.backward()
    torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=0)
    grads = dict(checkpointed.named_parameters())
    for name, p in model.named_parameters():
        if p.grad is None:
            assert grads[name].grad is None, name
        else:
            torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    """torch.compile with the aot_eager backend (dynamo + AOTAutograd, no inductor codegen: fast on a CPU)."""
    model = tiny_llava().train()
    apply_regap(model, regap_weight=0.5)
    batch, _ = make_batch()
    eager = model(**batch)
    eager.loss.backward()
    grad = model.model.multi_modal_projector.linear_1.weight.grad.clone()
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(**batch)
    out.loss.backward()
    torch.testing.assert_close(out.loss, eager.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.regap_gap, eager.regap_gap, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.model.multi_modal_projector.linear_1.weight.grad, grad, rtol=1e-4, atol=1e-6)


def test_inside_ddp_one_process_gloo(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = tiny_llava().train()
    apply_regap(model, regap_weight=0.5)
    plain = copy.deepcopy(model)
    batch, _ = make_batch()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        out = ddp(**batch)
        out.loss.backward()
    finally:
        dist.destroy_process_group()
    ref = plain(**batch)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    theirs = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        if p.grad is not None or theirs[name].grad is not None:
            torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-6, atol=1e-8, msg=name)


@pytest.mark.slow
def test_inside_fsdp2_one_process_gloo(tmp_path):
    """fully_shard on each decoder layer and the root (FSDP2); the gradients arrive as DTensors."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    model = tiny_llava().train()
    vanilla = copy.deepcopy(model)
    apply_regap(model, regap_weight=0.5)
    batch, caption = make_batch()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        for layer in model.model.language_model.layers:
            fully_shard(layer)
        fully_shard(model)
        out = model(**batch)
        out.loss.backward()
        grad = model.model.multi_modal_projector.linear_1.weight.grad.full_tensor()
    finally:
        dist.destroy_process_group()
    seen = []
    projector_of(vanilla).register_forward_hook(lambda m, i, o: seen.append(o))
    ref = vanilla(**batch)
    text = vanilla.get_input_embeddings()(batch["input_ids"])
    expected = ref.loss + 0.5 * gap_loss_reference(seen[0], text, None, caption)
    expected.backward()
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, vanilla.model.multi_modal_projector.linear_1.weight.grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# errors: one clear line
# --------------------------------------------------------------------------------------------------


def test_unsupported_model_class():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=VOCAB))
    with pytest.raises(RegapError, match="supports LlavaForConditionalGeneration"):
        apply_regap(lm)
    llava_next = type("LlavaNextForConditionalGeneration", (nn.Module,), {})()
    with pytest.raises(RegapError, match="does not support LlavaNextForConditionalGeneration yet"):
        apply_regap(llava_next)


def test_unrecognised_projectors():
    with pytest.raises(RegapError, match="unrecognised projector.*gelu_pytorch_tanh"):
        apply_regap(tiny_llava(projector_hidden_act="gelu_pytorch_tanh"))
    custom = tiny_llava()
    custom.model.multi_modal_projector = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32))
    with pytest.raises(RegapError, match="unrecognised projector Sequential"):
        apply_regap(custom)
    blip = tiny_blip2()
    blip.language_projection = nn.Sequential(nn.Linear(16, 32))
    with pytest.raises(RegapError, match="language_projection to be one nn.Linear"):
        apply_regap(blip)


def test_batch_errors():
    model = apply_regap(tiny_llava())
    batch, _ = make_batch()
    embeds = model.get_input_embeddings()(batch["input_ids"])
    no_ids = dict({k: v for k, v in batch.items() if k != "input_ids"}, inputs_embeds=embeds)
    with pytest.raises(RegapError, match="needs input_ids with the labels"):
        model(**no_ids)
    with pytest.raises(RegapError, match="must align with input_ids"):
        model(**dict(batch, labels=batch["labels"][:, :-1]))
    with pytest.raises(ValueError, match="regap_weight must be"):
        apply_regap(tiny_llava(), regap_weight=-1)


def test_special_tokens_are_not_caption_tokens():
    """A caption token id declared special (e.g. a chat-template marker) leaves the caption side."""
    model = tiny_llava()
    vanilla = copy.deepcopy(model)
    batch, caption = make_batch()
    marker = int(batch["input_ids"][0][caption[0]][0])
    apply_regap(model, regap_weight=1.0, special_token_ids=[marker])
    caption = caption & (batch["input_ids"] != marker)
    _, gap, _ = reference_loss(vanilla, batch, caption, 1.0, (1, 1, 1))
    torch.testing.assert_close(model(**batch).regap_gap, gap, rtol=1e-5, atol=1e-6)


def test_a_batch_may_spell_out_its_caption_tokens():
    """caption_mask in the batch wins over the labels (e.g. labels that also cover a separator)."""
    model = tiny_llava()
    vanilla = copy.deepcopy(model)
    apply_regap(model, regap_weight=1.0)
    batch, caption = make_batch()
    caption[:, :] = caption & (torch.arange(caption.shape[1]) % 2 == 0)  # any subset, not derivable from labels
    _, gap, _ = reference_loss(vanilla, batch, caption, 1.0, (1, 1, 1))
    out = model(**batch, caption_mask=caption)
    torch.testing.assert_close(out.regap_gap, gap, rtol=1e-5, atol=1e-6)
    unlabeled = {k: v for k, v in batch.items() if k != "labels"}
    assert torch.equal(model(**unlabeled, caption_mask=caption).logits, vanilla(**unlabeled).logits)
    with pytest.raises(RegapError, match="caption_mask must be a bool tensor"):
        model(**batch, caption_mask=caption.long())


# --------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------


class _Pairs(torch.utils.data.Dataset):
    """A fixed synthetic caption set: each image's pixels and caption tokens drawn from one seed."""

    def __init__(self, n=24):
        self.items = []
        for i in range(n):
            batch, _ = make_batch(images_per_sample=(1,), seed=i, caption_lengths=(4 + i % 3,), prompt_lengths=(0,))
            self.items.append({k: v[0] for k, v in batch.items()})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _collate(items):
    width = max(len(x["input_ids"]) for x in items)
    fill = {"input_ids": PAD, "attention_mask": 0, "labels": -100}
    out = {k: torch.stack([torch.cat([x[k], torch.full((width - len(x[k]),), v)]) for x in items])
           for k, v in fill.items()}
    out["pixel_values"] = torch.stack([x["pixel_values"] for x in items])
    return out


def _train(tmp_path, regap_weight, steps=36):
    from transformers import Trainer, TrainingArguments

    model = tiny_llava(seed=1).train()
    if regap_weight:
        apply_regap(model, regap_weight=regap_weight)
    args = TrainingArguments(output_dir=str(tmp_path / f"run{regap_weight}"), max_steps=steps,
                             per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=6, report_to=[],
                             save_strategy="no", use_cpu=True, seed=0, data_seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_Pairs(), data_collator=_collate)
    if regap_weight:
        RegapCallback.attach(trainer)
    trainer.train()
    return model, [h for h in trainer.state.log_history if "loss" in h]


def _gap_and_lm(model):
    batch = _collate([_Pairs()[i] for i in range(8)])
    probe = apply_regap(copy.deepcopy(model).eval(), regap_weight=1.0) if regap_state(model) is None else model.eval()
    with torch.no_grad():
        out = probe(**batch)
    return float(out.regap_gap), float(out.lm_loss)


@pytest.mark.slow
def test_trainer_logs_the_gap_which_falls_while_the_caption_loss_holds(tmp_path):
    gap0, _ = _gap_and_lm(tiny_llava(seed=1))
    regap_model, logs = _train(tmp_path, regap_weight=1.0)
    plain_model, _ = _train(tmp_path, regap_weight=0)
    assert all("regap_gap" in h for h in logs) and len(logs) == 6
    gap_regap, lm_regap = _gap_and_lm(regap_model)
    gap_plain, lm_plain = _gap_and_lm(plain_model)
    assert logs[-1]["regap_gap"] < logs[0]["regap_gap"]
    assert gap_regap < 0.8 * gap0 and gap_regap < 0.5 * gap_plain, (gap0, gap_plain, gap_regap)
    assert abs(lm_regap - lm_plain) < 0.05 * lm_plain, (lm_regap, lm_plain)


# --------------------------------------------------------------------------------------------------
# TRL
# --------------------------------------------------------------------------------------------------


def _word_tokenizer():
    """A word-level tokenizer over the tiny vocabulary, built in memory (no download)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    special = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<image>": IMAGE}
    vocab = dict(special, **{f"t{i}": i for i in range(VOCAB) if i not in special.values()})
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
                                   pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.mark.slow
def test_trl_sft_trainer_adds_the_gap_to_its_own_loss(tmp_path):
    """TRL computes the SFT loss from its fused LM head's log-probs; RegapSFTTrainer adds lambda * gap to it."""
    pytest.importorskip("trl")
    import datasets
    from trl import SFTConfig

    from regap_fast.integrations.trl import RegapSFTTrainer

    model = tiny_llava(seed=1).train()
    vanilla = copy.deepcopy(model)
    apply_regap(model, regap_weight=0.5)
    rows = datasets.Dataset.from_list(_Pairs(8).items).with_format("torch")  # TRL takes a datasets.Dataset
    args = SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                     dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False, logging_steps=2,
                     save_strategy="no", disable_tqdm=True)
    trainer = RegapSFTTrainer(model=model, args=args, train_dataset=rows, processing_class=_word_tokenizer(),
                              data_collator=_collate)
    batch, caption = make_batch()
    _, _, expected = reference_loss(vanilla, batch, caption, 0.5, (1, 1, 1))
    torch.testing.assert_close(trainer.compute_loss(trainer.model, dict(batch)), expected, rtol=1e-5, atol=1e-6)
    RegapCallback.attach(trainer)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(h["regap_gap"] > 0 for h in logged)


def test_images_are_mapped_to_their_samples_in_order():
    """Sample 0 holds two images, sample 1 none, sample 2 one: the sample means follow by hand."""
    from regap_fast.integrations.transformers import _per_sample_image_means

    pooled = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 5.0]])  # one pooled row per image
    positions = torch.zeros(3, 10, dtype=torch.bool)
    positions[0, :4] = True  # 2 images x 2 tokens
    positions[2, 5:7] = True
    means, has_image = _per_sample_image_means(pooled, positions, tokens_per_image=2)
    torch.testing.assert_close(means, torch.tensor([[2.0, 4.0], [0.0, 0.0], [5.0, 5.0]]))
    assert has_image.tolist() == [True, False, True]
    positions[2, 7] = True  # 3 image tokens in a sample: no whole number of images
    with pytest.raises(RegapError, match="cannot tell which sample"):
        _per_sample_image_means(pooled, positions, tokens_per_image=2)
