"""VisionLanguageModel: the LLaVA splice, labels and masks, REGAP in the forward, save/load, generation."""

import dataclasses
import json

import pytest
import torch
from PIL import Image

import regap_fast.model as model_mod
from regap_fast import gap_loss_reference
from regap_fast.data import IGNORE_INDEX, Collator
from regap_fast.model import ModelConfig, VisionLanguageModel, load_model

TINY_VISION = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, image_size=32, patch_size=16, projection_dim=32)  # 4 image tokens
TINY_TEXT = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    m = VisionLanguageModel.from_config(ModelConfig(vision_config=TINY_VISION, text_config=TINY_TEXT))
    return m.eval()


def images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(n)]


def batch_of(vlm, convs, fmt="plain", with_image=True):
    enc = vlm.encoder(fmt)
    exs = []
    for i, conv in enumerate(convs):
        ex = enc.encode(conv, has_image=with_image)
        ex["pixel_values"] = vlm.image_transform(images(1, seed=i)[0]) if with_image else None
        exs.append(ex)
    return Collator(vlm.tokenizer.pad_token_id)(exs)


def caption(text):
    return [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": text}]


def test_plain_splice_labels_and_masks_hand_checked(vlm):
    tok = vlm.tokenizer
    assert vlm.num_image_tokens == 4
    ex = vlm.encoder("plain").encode(caption("a red circle"), has_image=True)
    a, red, circle, newline = tok.convert_tokens_to_ids(["a", "Ġred", "Ġcircle", "Ċ"])
    bos, pad = tok.bos_token_id, tok.pad_token_id
    #                     bos   4 image slots    caption            LLaVA's plain separator "\n" (no eos)
    assert ex["input_ids"] == [bos, pad, pad, pad, pad, a, red, circle, newline]
    assert ex["labels"] == [IGNORE_INDEX] * 5 + [a, red, circle, newline]
    assert ex["image_mask"] == [False, True, True, True, True, False, False, False, False]
    assert ex["caption_mask"] == [False] * 5 + [True, True, True, False]  # no separator, prompt or image


def test_chat_labels_cover_answers_only(vlm):
    tok = vlm.tokenizer
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a red circle"},
            {"from": "human", "value": "Where?"}, {"from": "gpt", "value": "at the top"}]
    ex = vlm.encoder("chat").encode(conv, has_image=True)
    ids = ex["input_ids"]
    labelled = [i for i, lab in zip(ids, ex["labels"]) if lab != IGNORE_INDEX]
    assert tok.decode(labelled) == " a red circle</s> at the top</s>"
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, ex["labels"]))
    cap = [i for i, c in zip(ids, ex["caption_mask"]) if c]
    assert tok.decode(cap) == " a red circle at the top"
    assert sum(ex["image_mask"]) == 4
    first_image = ex["image_mask"].index(True)
    assert tok.decode(ids[:first_image]).endswith("USER: ")  # the image where the placeholder was
    assert not any(c for c, p in zip(ex["caption_mask"], ex["image_mask"]) if p)


def test_forward_splices_image_tokens_into_their_slots(vlm):
    b = batch_of(vlm, [caption("a red circle"), caption("a large blue star on the left")])
    with torch.no_grad():
        out = vlm(b["input_ids"], b["pixel_values"], b["image_mask"], b["labels"], output_hidden_states=True)
        image_embeds = vlm.projector(vlm.encode_images(b["pixel_values"]))
        text = vlm.language_model.get_input_embeddings()(b["input_ids"])
    x0 = out["hidden_states"][0]  # the LM's input embeddings
    pos = b["image_mask"]
    torch.testing.assert_close(x0[pos], image_embeds.reshape(-1, image_embeds.shape[-1]))
    torch.testing.assert_close(x0[~pos], text[~pos])
    bad = b["image_mask"].clone()
    bad[0, 1] = False
    with pytest.raises(ValueError, match="image_mask"):
        vlm(b["input_ids"], b["pixel_values"], bad, b["labels"])


def test_loss_on_labels_only_and_logits_kept_where_needed(vlm):
    b = batch_of(vlm, [caption("a red circle"), caption("a large blue star on the left")])
    with torch.no_grad():
        out = vlm(b["input_ids"], b["pixel_values"], b["image_mask"], b["labels"])
        full = vlm(b["input_ids"], b["pixel_values"], b["image_mask"], b["labels"], full_logits=True)
    manual = torch.nn.functional.cross_entropy(full["logits"][:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(),
                                               ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out["lm_loss"], manual)
    torch.testing.assert_close(full["lm_loss"], manual)
    assert out["logits"].shape[1] < full["logits"].shape[1]  # no LM head over the image slots
    assert int(out["num_tokens"]) == int((b["labels"] != IGNORE_INDEX).sum())


def test_gap_in_forward_matches_the_reference_and_its_gradient(vlm):
    convs = [caption("a red circle"), caption("a large blue star on the left"), caption("a small cyan square")]
    b = batch_of(vlm, convs)
    pe = vlm.pair_embeddings([images(1, seed=i)[0] for i in range(3)], [c[1]["value"] for c in convs])
    ref = gap_loss_reference(pe["image_embeds"], pe["text_embeds"], None, pe["text_mask"])
    vlm.requires_grad_(False)
    vlm.projector.requires_grad_(True)
    try:
        lam = 0.7
        out = vlm(b["input_ids"], b["pixel_values"], b["image_mask"], b["labels"], b["caption_mask"],
                  regap_weight=lam)
        torch.testing.assert_close(out["gap"], ref)
        assert out["gap"] > 0
        grads = torch.autograd.grad(out["loss"], list(vlm.projector.parameters()))
        # the same loss computed the unfused way: materialised embeddings, the reference gap
        feats = vlm.encode_images(b["pixel_values"])
        img = vlm.projector(feats)
        emb = vlm.language_model.get_input_embeddings()(b["input_ids"])
        spliced = emb.masked_scatter(b["image_mask"].unsqueeze(-1), img)
        logits = vlm.language_model(inputs_embeds=spliced).logits
        lm = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(),
                                               ignore_index=IGNORE_INDEX)
        gap = gap_loss_reference(img, emb, None, b["caption_mask"])
        expect = torch.autograd.grad(lm + lam * gap, list(vlm.projector.parameters()))
        for g, e in zip(grads, expect):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    finally:
        vlm.requires_grad_(True)


def test_lambda_zero_never_computes_the_gap(vlm, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the gap was computed with lambda = 0")

    monkeypatch.setattr(model_mod.vlm, "modality_gap", boom)  # where the forward looks it up
    b = batch_of(vlm, [caption("a red circle")])
    out = vlm(b["input_ids"], b["pixel_values"], b["image_mask"], b["labels"], b["caption_mask"],
              regap_weight=0.0)
    assert out["gap"] is None and out["gap_sum"] is None
    with pytest.raises(AssertionError, match="lambda = 0"):
        vlm(b["input_ids"], b["pixel_values"], b["image_mask"], b["labels"], b["caption_mask"],
            regap_weight=0.1)


def test_text_only_batch_keeps_the_projector_in_the_graph(vlm):
    b = batch_of(vlm, [[{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a red circle"}]], fmt="chat",
                 with_image=False)
    assert b["pixel_values"] is None
    vlm.zero_grad(set_to_none=True)
    vlm(b["input_ids"], labels=b["labels"])["loss"].backward()
    for p in vlm.projector.parameters():  # what DDP needs: a gradient, even if zero
        assert p.grad is not None and not p.grad.any()
    vlm.zero_grad(set_to_none=True)


def test_pair_embeddings(vlm):
    caps = ["a red circle", "there is a large green star at the bottom"]
    out = vlm.pair_embeddings(images(2), caps, output_hidden_states=True)
    D = vlm.language_model.config.hidden_size
    assert out["image_embeds"].shape == (2, 4, D) and out["image_mask"].sum(1).tolist() == [4, 4]
    emb = vlm.language_model.get_input_embeddings().weight
    for b, cap in enumerate(caps):
        ids = vlm.tokenizer.encode(cap, add_special_tokens=False)
        assert int(out["text_mask"][b].sum()) == len(ids)
        torch.testing.assert_close(out["text_embeds"][b, :len(ids)], emb[ids])
        assert int(out["caption_mask"][b].sum()) == len(ids)
    assert len(out["hidden_states"]) == vlm.language_model.config.num_hidden_layers + 1
    torch.testing.assert_close(out["hidden_states"][0][out["image_mask"]],
                               out["image_embeds"].reshape(-1, D))


def test_generate_batched_equals_one_by_one(vlm):
    prompts = ["hello", "what is in the picture, in a few words?", "a"]
    ims = [None, images(1)[0], images(1, seed=5)[0]]
    together = vlm.generate(prompts, ims, max_new_tokens=6, batch_size=3)
    alone = [vlm.generate([p], [im], max_new_tokens=6)[0] for p, im in zip(prompts, ims)]
    assert together == alone
    assert all(isinstance(a, str) for a in together)
    assert "<image>" in vlm.chat_prompt("hi", has_image=True)
    assert "<image>" not in vlm.chat_prompt("hi", has_image=False)


def test_generate_transforms_a_shared_image_once_and_keeps_each_its_own(vlm, monkeypatch):
    """Requests that share an image object are transformed once; each request still gets its own image's
    pixels (with the memo on, the chat prompts come from it, the same text)."""
    from regap_fast.data import memo

    a, b = images(1)[0], images(1, seed=5)[0]
    seen = []
    monkeypatch.setattr(type(vlm), "_batch", lambda self, ex, padding_side="right", _f=type(vlm)._batch:
                        seen.append(_f(self, ex, padding_side)) or seen[-1])
    calls = []
    transform = vlm.image_transform
    counted = property(lambda self: lambda im: calls.append(1) or transform(im))
    monkeypatch.setattr(type(vlm), "image_transform", counted)
    with memo.memoizing():
        vlm.generate(["x", "y", "z", "w"], [a, b, a, None], max_new_tokens=1, batch_size=2)
        assert vlm.chat_prompt("hi", True) == vlm.chat_prompt("hi", True) != vlm.chat_prompt("hi", False)
    assert len(calls) == 2
    pixels = torch.cat([s["pixel_values"] for s in seen])
    assert torch.equal(pixels, torch.stack([transform(a), transform(b), transform(a)]))


def test_save_and_load_roundtrip(vlm, tmp_path):
    vlm.save_pretrained(tmp_path / "m")
    # every file readable like the others (safetensors alone would leave the weights 0600)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "m").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes
    again = load_model(tmp_path / "m")
    vlm.save_pretrained(tmp_path / "run" / "model")  # a training run's folder loads its exported model
    assert load_model(tmp_path / "run").config == vlm.config
    assert again.config == vlm.config
    assert again.tokenizer.get_vocab() == vlm.tokenizer.get_vocab()
    assert again.tokenizer.chat_template == vlm.tokenizer.chat_template
    b = batch_of(vlm, [caption("a red circle")])
    with torch.no_grad():
        x = vlm(b["input_ids"], b["pixel_values"], b["image_mask"], b["labels"])["logits"]
        y = again(b["input_ids"], b["pixel_values"], b["image_mask"], b["labels"])["logits"]
    torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_parts_from_folders_and_projector_only_save(tmp_path):
    from transformers import AutoConfig, CLIPVisionModel, LlamaForCausalLM

    from regap_fast.data import synthetic

    torch.manual_seed(1)
    tok = synthetic.default_tokenizer()
    tv = dict(TINY_VISION)
    CLIPVisionModel(AutoConfig.for_model(tv.pop("model_type"), **tv)).save_pretrained(tmp_path / "clip")
    (tmp_path / "clip" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3,
                                                                            "image_std": [0.25] * 3}))
    tt = dict(TINY_TEXT, vocab_size=len(tok))
    LlamaForCausalLM(AutoConfig.for_model(tt.pop("model_type"), **tt)).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    vlm = VisionLanguageModel.from_pretrained_parts(tmp_path / "clip", tmp_path / "lm")
    assert vlm.config.image_mean == (0.5, 0.5, 0.5)
    vlm.save_pretrained(tmp_path / "out", components=["projector"])
    from safetensors.torch import load_file

    assert all(k.startswith("projector.") for k in load_file(str(tmp_path / "out" / "model.safetensors")))
    again = load_model(tmp_path / "out")
    b = batch_of(vlm, [caption("a red circle")])
    inputs = {k: b[k] for k in ("input_ids", "pixel_values", "image_mask")}
    with torch.no_grad():
        torch.testing.assert_close(vlm(**inputs)["logits"], again(**inputs)["logits"])
    with pytest.raises(ValueError, match="built from a config"):
        VisionLanguageModel.from_config(ModelConfig(vision_config=TINY_VISION, text_config=TINY_TEXT),
                                        tokenizer=tok).save_pretrained(tmp_path / "x", components=["projector"])


def test_pad_mode_is_a_model_setting_that_is_saved(vlm, tmp_path):
    """config.image_aspect_ratio="pad" (LLaVA-1.5): the image goes onto a square of the mean colour
    before CLIP's preprocessing, in training and at inference alike, and the saved model keeps it."""
    import numpy as np

    from regap_fast.data import ImageTransform

    img = images(1)[0]  # 48 x 40
    fill = [int(m * 255) for m in vlm.config.image_mean]
    canvas = np.empty((48, 48, 3), dtype=np.uint8)
    canvas[:] = fill
    canvas[4:44] = np.asarray(img)  # 8 rows of margin, half above
    expect = ImageTransform(vlm.image_size, vlm.config.image_mean, vlm.config.image_std)(Image.fromarray(canvas))
    assert not torch.equal(vlm.image_transform(img), expect)  # the default keeps the aspect and crops
    cfg = ModelConfig(vision_config=TINY_VISION, text_config=TINY_TEXT, image_aspect_ratio="pad")
    padded = VisionLanguageModel.from_config(cfg)
    assert torch.equal(padded.image_transform(img), expect)
    assert torch.equal(padded.preprocess_images([img])[0], expect)
    padded.save_pretrained(tmp_path / "m")
    assert load_model(tmp_path / "m").config.image_aspect_ratio == "pad"
    with pytest.raises(ValueError, match="aspect"):
        VisionLanguageModel.from_config(dataclasses.replace(cfg, image_aspect_ratio="letterbox"))


def test_transformers_llava_folder_gives_the_same_logits(vlm, tmp_path):
    from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = vlm.tokenizer
    image_token = tok.convert_tokens_to_ids("Ġpolite")  # any id not in the text: LLaVA finds the slots by it
    tv, tt = dict(TINY_VISION), dict(TINY_TEXT, vocab_size=len(tok))
    cfg = LlavaConfig(vision_config=AutoConfig.for_model(tv.pop("model_type"), **tv),
                      text_config=AutoConfig.for_model(tt.pop("model_type"), **tt),
                      image_token_index=image_token, image_seq_length=4)
    torch.manual_seed(2)
    llava = LlavaForConditionalGeneration(cfg).eval()
    llava.save_pretrained(tmp_path / "llava")
    tok.save_pretrained(tmp_path / "llava")
    # transformers' LLaVA processor with do_pad: LLaVA-1.5's padding to a square
    (tmp_path / "llava" / "preprocessor_config.json").write_text(json.dumps({"do_pad": True}))
    ours = load_model(tmp_path / "llava")
    assert ours.num_image_tokens == 4 and ours.config.image_aspect_ratio == "pad"
    b = batch_of(ours, [caption("a green diamond"), caption("a small red star in the center")])
    ids = b["input_ids"].masked_fill(b["image_mask"], image_token)
    with torch.no_grad():
        want = llava(input_ids=ids, pixel_values=b["pixel_values"]).logits
        got = ours(b["input_ids"], b["pixel_values"], b["image_mask"], full_logits=True)["logits"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_every_public_name_imports_from_the_model_package():
    """regap_fast.model is a package (config, archs, vlm, inference, build, checkpoints, loading); each of its
    public names imports from the package itself, and is defined in it (not re-exported from elsewhere)."""
    names = ["ARCHS", "COMPONENTS", "FORMAT", "TINY_BLIP2", "TINY_CLIP", "TINY_LLAMA", "LlavaArch", "MiniGPT4Arch",
             "ModelConfig", "VisionLanguageModel", "load_model", "prepare_tokenizer", "qformer_tower_class",
             "resolve_attn_implementation", "build_from_config", "build_from_parts", "get_arch",
             "read_projector_weights", "save_model"]
    assert sorted(model_mod.__all__) == sorted(names)
    assert [n for n in names if not hasattr(model_mod, n)] == []
    assert model_mod.VisionLanguageModel.__module__ == "regap_fast.model.vlm"
    homes = {n: getattr(model_mod, n).__module__ for n in names if callable(getattr(model_mod, n))}
    assert len(homes) == 13 and {n: m for n, m in homes.items() if not m.startswith("regap_fast.model.")} == {}


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "checkpoints" / "step-00000005").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="the run's model/ folder"):
        load_model(tmp_path / "checkpoints" / "step-00000005")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="holds a transformers 'bert' model: this command reads regap_fast models"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="unknown arch"):
        VisionLanguageModel.from_config(ModelConfig(arch="nope"))
