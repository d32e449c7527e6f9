"""apply_regap(layer=k) and scale="text-norm": the gap after decoder layer k and its warm-up-frozen alpha,
against a hand computation in float64 from the hidden states the unpatched model returns
(``output_hidden_states``: entry k is the output of decoder layer k for k < the number of layers)."""

import copy
import json
import types

import pytest
import torch
from helpers import gaps_float64

transformers = pytest.importorskip("transformers")

from regap_fast.core import RegapError  # noqa: E402
from regap_fast.integrations.transformers import RegapCallback, apply_regap, regap_state  # noqa: E402
from vlm_families import BY_NAME, make_batch  # noqa: E402

FAMILIES = [pytest.param(BY_NAME[n], id=n) for n in ("LLaVA-1.5", "Gemma 3", "Idefics3")]


def two_layer(family):
    """The family's tiny model with 2 decoder layers (so layer 1 is not the last, normed, hidden state)."""
    config = family.config()
    text = config.text_config
    text.num_hidden_layers = 2
    if getattr(text, "layer_types", None):
        text.layer_types = (list(text.layer_types) * 2)[:2]
    torch.manual_seed(0)
    model = getattr(transformers, family.cls)(config)
    if family.post is not None:
        with torch.no_grad():
            family.post(model)
    return model.eval()


def hidden_by_hand(vanilla, batch, layer):
    with torch.no_grad():
        out = vanilla(**batch, output_hidden_states=True)
    hidden = getattr(out, "hidden_states", None)
    return out, hidden[layer]


def gap_by_hand(h, image_pos, caption):
    gaps, valid = gaps_float64(h, h, image_pos, caption)
    return gaps.sum() / valid.sum()


def caption_norms(h, caption):
    rows = h.double()[caption]
    return float(torch.linalg.vector_norm(rows, dim=-1).sum()), rows.shape[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_k_is_the_gap_after_decoder_layer_k(family):
    model = two_layer(family)
    vanilla = copy.deepcopy(model)
    apply_regap(model, regap_weight=0.5, layer=1)
    assert regap_state(model).layer == 1
    batch, image_pos, caption = make_batch(family)
    out = model(**batch)
    ref, h = hidden_by_hand(vanilla, batch, 1)
    gap = gap_by_hand(h, image_pos, caption)
    torch.testing.assert_close(out.regap_gap.double(), gap, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), ref.loss.double() + 0.5 * gap, rtol=1e-5, atol=1e-6)
    # and it is not the input gap (layer 0), which the default still takes
    apply_regap(model, regap_weight=0.5)
    assert not torch.allclose(model(**batch).regap_gap.double(), gap, rtol=1e-3)


def test_layer_k_leaves_the_fast_path_and_checks_its_range():
    family = BY_NAME["LLaVA-1.5"]
    model = two_layer(family)
    apply_regap(model, layer=2)
    assert regap_state(model).fused is not None  # installed for layer 0, stepped aside here
    batch, _, _ = make_batch(family)
    model(**batch).loss.backward()
    assert model.get_submodule(family.connector).linear_1.weight.grad is not None
    with pytest.raises(RegapError, match="REGAP layer 3 does not exist: the language model has 2 decoder layers"):
        apply_regap(model, layer=3)
    with pytest.raises(RegapError, match="int >= 0"):
        apply_regap(model, layer=-1)
    with pytest.raises(RegapError, match="needs scale_warmup_steps"):
        apply_regap(model, scale="text-norm")
    with pytest.raises(RegapError, match="unknown REGAP scale"):
        apply_regap(model, scale="mir")


@pytest.mark.parametrize("layer", [0, 1])
def test_text_norm_alpha_is_estimated_over_the_warm_up_then_frozen(layer):
    family = BY_NAME["Gemma 3"]  # its embeddings are scaled by sqrt(hidden size)
    model = two_layer(family)
    vanilla = copy.deepcopy(model)
    apply_regap(model, regap_weight=1.0, layer=layer, scale="text-norm", scale_warmup_steps=2)
    model.train()  # the tiny models have no dropout: training forwards are the eval forwards
    scale = regap_state(model).scale
    norm_sum, tokens = 0.0, 0
    for seed in range(4):
        batch, image_pos, caption = make_batch(family, seed=seed)
        if layer == 0:
            seen = []
            hook = vanilla.get_submodule(family.lm).register_forward_pre_hook(
                lambda m, a, kw: seen.append(kw["inputs_embeds"]), with_kwargs=True)
            with torch.no_grad():
                vanilla(**batch)
            hook.remove()
            h = seen[0]
        else:
            _, h = hidden_by_hand(vanilla, batch, layer)
        if seed < 2:  # warm-up: this batch's caption tokens join the estimate before it is used
            s, n = caption_norms(h, caption)
            norm_sum, tokens = norm_sum + s, tokens + n
        alpha = tokens / norm_sum
        out = model(**batch)
        torch.testing.assert_close(out.regap_gap.double(), alpha * gap_by_hand(h, image_pos, caption),
                                   rtol=1e-5, atol=1e-6)
        scale.step()  # one optimizer step
    assert scale.frozen == pytest.approx(tokens / norm_sum, rel=1e-12) and scale.steps == 2


def test_text_norm_alpha_is_saved_with_the_checkpoint_and_restored_exactly(tmp_path):
    family = BY_NAME["LLaVA-1.5"]
    model = family.build()
    apply_regap(model, layer=1, scale="text-norm", scale_warmup_steps=1)
    model.train()
    callback = RegapCallback()
    args = types.SimpleNamespace(output_dir=str(tmp_path))
    state = types.SimpleNamespace(global_step=1, is_world_process_zero=True)
    batch, _, _ = make_batch(family)
    model(**batch)
    callback.on_step_end(args, state, None, model=model)
    alpha = regap_state(model).scale.frozen
    assert alpha is not None
    callback.on_save(args, state, None, model=model)
    assert (tmp_path / "checkpoint-1" / "regap_scale.json").is_file()

    resumed = family.build()
    apply_regap(resumed, layer=1, scale="text-norm", scale_warmup_steps=1)
    callback.on_train_begin(args, state, None, model=resumed)
    assert regap_state(resumed).scale.frozen == alpha  # bit for bit
    resumed.train()
    batch2, _, _ = make_batch(family, seed=3)
    model(**batch2)
    resumed(**batch2)
    assert regap_state(resumed).scale.alpha == regap_state(model).scale.alpha == alpha

    missing = family.build()
    apply_regap(missing, layer=1, scale="text-norm", scale_warmup_steps=1)
    with pytest.raises(RegapError, match="regap_scale.json is missing"):
        callback.on_train_begin(args, types.SimpleNamespace(global_step=7), None, model=missing)


@pytest.mark.slow
def test_a_trainer_run_freezes_alpha_saves_it_and_resumes_it(tmp_path):
    """The real Trainer: RegapCallback counts the optimizer steps, writes alpha into each checkpoint, and a run
    resumed from one restores it exactly."""
    from transformers import Trainer, TrainingArguments

    from vlm_families import caption_items, collate

    family = BY_NAME["LLaVA-1.5"]

    def run(out, steps, resume=None):
        model = family.build()
        apply_regap(model, regap_weight=0.5, layer=1, scale="text-norm", scale_warmup_steps=2)
        args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=2,
                                 learning_rate=1e-3, report_to=[], save_strategy="steps", save_steps=1, use_cpu=True,
                                 seed=0, data_seed=0, disable_tqdm=True, logging_steps=1)
        trainer = Trainer(model=model, args=args, train_dataset=caption_items(family), data_collator=collate)
        RegapCallback.attach(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return regap_state(model).scale

    straight = run(tmp_path / "a", 3)
    assert straight.steps == 2 and straight.frozen is not None
    saved = [json.loads((tmp_path / "a" / f"checkpoint-{k}" / "regap_scale.json").read_text()) for k in (1, 2, 3)]
    assert saved[0]["frozen"] is None and saved[1]["frozen"] == saved[2]["frozen"] == straight.frozen
    resumed = run(tmp_path / "a", 3, resume=str(tmp_path / "a" / "checkpoint-2"))
    assert resumed.frozen == straight.frozen and resumed.steps == 2
