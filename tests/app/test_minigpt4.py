"""MiniGPT-4 (the projector op itself: tests/ops/test_linear_projector.py): the BLIP-2 vision side, the <Img> splice,
save/load, loading from BLIP-2 / MiniGPT-4 checkpoints, and the eval commands on a tiny MiniGPT-4-style model."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import regap_fast
from regap_fast import FusedLinearProjector
from regap_fast.data import IGNORE_INDEX, Collator
from regap_fast.model import TINY_BLIP2, ModelConfig, VisionLanguageModel, load_model, qformer_tower_class

from helpers import TINY_TEXT, blip2_config, images, tiny_blip2_generation


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    return VisionLanguageModel.from_config(ModelConfig(arch="minigpt4", vision_config=blip2_config(),
                                                       text_config=TINY_TEXT)).eval()


def caption(text):
    return [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": text}]


def batch_of(vlm, texts, fmt="plain"):
    enc = vlm.encoder(fmt)
    exs = []
    for i, t in enumerate(texts):
        ex = enc.encode(caption(t), has_image=True)
        ex["pixel_values"] = vlm.image_transform(images(1, seed=i)[0])
        exs.append(ex)
    return Collator(vlm.tokenizer.pad_token_id)(exs)


# --------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------


def test_minigpt4_splice_and_labels_hand_checked(vlm):
    tok = vlm.tokenizer
    assert vlm.num_image_tokens == 3 and vlm.image_wrap == ("<Img>", "</Img>")
    ex = vlm.encoder("plain").encode(caption("a red circle"), has_image=True)
    img_open = ["<", "I", "m", "g", ">"]  # how the default tokenizer spells "<Img>" (no special token)
    img_close = ["<", "/", "I", "m", "g", ">"]
    assert tok.convert_ids_to_tokens(ex["input_ids"]) == \
        ["<s>", *img_open, "<pad>", "<pad>", "<pad>", *img_close, "a", "Ġred", "Ġcircle", "</s>"]
    a, red, circle = tok.convert_tokens_to_ids(["a", "Ġred", "Ġcircle"])
    n_before = 1 + len(img_open) + 3 + len(img_close)
    assert ex["labels"] == [IGNORE_INDEX] * n_before + [a, red, circle, tok.eos_token_id]
    assert ex["image_mask"] == [False] * 6 + [True] * 3 + [False] * 10
    assert ex["caption_mask"] == [False] * n_before + [True, True, True, False]  # the caption only
    # the chat format (generation) wraps the image the same way, in the user turn
    prompt = vlm.encoder("chat").encode_prompt(vlm.chat_prompt("What is it?", has_image=True))
    first = prompt["image_mask"].index(True)
    assert tok.convert_ids_to_tokens(prompt["input_ids"][first - 5:first]) == img_open
    assert tok.convert_ids_to_tokens(prompt["input_ids"][first + 3:first + 9]) == img_close


def test_minigpt4_forward_is_vit_qformer_linear_spliced(vlm):
    """The image tokens at the LM input are llama_proj(Q-Former(query tokens, ViT(pixels))), in their slots."""
    b = batch_of(vlm, ["a red circle", "a large blue star on the left"])
    tower = vlm.vision_tower
    with torch.no_grad():
        out = vlm(b["input_ids"], b["pixel_values"], b["image_mask"], b["labels"], output_hidden_states=True)
        vit = tower.vision_model(pixel_values=b["pixel_values"]).last_hidden_state  # post-LayerNorm (ln_vision)
        q = tower.qformer(query_embeds=tower.query_tokens.expand(2, -1, -1), encoder_hidden_states=vit)
        want = F.linear(q.last_hidden_state, vlm.projector.weight, vlm.projector.bias)
        text = vlm.language_model.get_input_embeddings()(b["input_ids"])
    assert vit.shape == (2, 5, 24) and want.shape == (2, 3, 32)
    x0 = out["hidden_states"][0]
    pos = b["image_mask"]
    torch.testing.assert_close(x0[pos], want.reshape(-1, 32))
    torch.testing.assert_close(x0[~pos], text[~pos])
    assert want[0, 0].sub(want[0, 1]).abs().max() > 1e-3  # the query tokens differ (N(0, 0.02) init, not zeros)


def test_minigpt4_gap_in_forward_and_its_gradient(vlm):
    """REGAP through FusedLinearProjector in the model = the reference gap of pair_embeddings; gradient of
    the projector = the unfused computation's."""
    from regap_fast import gap_loss_reference

    texts = ["a red circle", "a large blue star on the left", "a small cyan square"]
    b = batch_of(vlm, texts)
    pe = vlm.pair_embeddings([images(1, seed=i)[0] for i in range(3)], texts)
    ref = gap_loss_reference(pe["image_embeds"], pe["text_embeds"], None, pe["text_mask"])
    vlm.requires_grad_(False)
    vlm.projector.requires_grad_(True)
    try:
        out = vlm(b["input_ids"], b["pixel_values"], b["image_mask"], b["labels"], b["caption_mask"],
                  regap_weight=0.7)
        torch.testing.assert_close(out["gap"], ref)
        grads = torch.autograd.grad(out["gap"], [vlm.projector.weight, vlm.projector.bias])
        feats = vlm.encode_images(b["pixel_values"])
        img = F.linear(feats, vlm.projector.weight, vlm.projector.bias)
        txt = F.embedding(b["input_ids"], vlm.language_model.get_input_embeddings().weight)
        want = torch.autograd.grad(gap_loss_reference(img, txt, None, b["caption_mask"]),
                                   [vlm.projector.weight, vlm.projector.bias])
        for g, w in zip(grads, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    finally:
        vlm.requires_grad_(True)


def test_minigpt4_preprocessing_is_blip2s_square_resize(vlm):
    im = images(1, size=(64, 32))[0]  # 2:1; CLIP would crop the middle, BLIP-2 squeezes the whole image
    got = vlm.image_transform(im)
    want = torch.from_numpy(__import__("numpy").asarray(
        im.resize((32, 32), Image.Resampling.BICUBIC), dtype="float32") / 255.0).permute(2, 0, 1)
    mean = torch.tensor(vlm.config.image_mean).view(3, 1, 1)
    std = torch.tensor(vlm.config.image_std).view(3, 1, 1)
    torch.testing.assert_close(got, (want - mean) / std)


def test_frozen_qformer_stays_in_eval_mode(vlm):
    """MiniGPT-4 keeps its frozen ViT and Q-Former in eval mode (no dropout) while llama_proj trains."""
    vlm.requires_grad_(False)
    vlm.projector.requires_grad_(True)
    try:
        vlm.train()
        assert vlm.projector.training and vlm.language_model.training
        assert not vlm.vision_tower.training and not vlm.vision_tower.qformer.training
        vlm.vision_tower.vision_model.encoder.layers[1].requires_grad_(True)
        vlm.train()
        assert vlm.vision_tower.vision_model.training and not vlm.vision_tower.qformer.training
    finally:
        vlm.requires_grad_(True)
        vlm.eval()


def test_save_and_load_roundtrip(vlm, tmp_path):
    vlm.save_pretrained(tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert again.config == vlm.config and again.config.arch == "minigpt4"
    assert "text_config" not in again.config.vision_config  # BLIP-2's own LM is not part of the vision side
    assert isinstance(again.projector, FusedLinearProjector)
    b = batch_of(vlm, ["a red circle"])
    with torch.no_grad():
        x = vlm(b["input_ids"], b["pixel_values"], b["image_mask"], b["labels"])["logits"]
        y = again(b["input_ids"], b["pixel_values"], b["image_mask"], b["labels"])["logits"]
    torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_tiny_default_is_minigpt4_shaped():
    torch.manual_seed(0)
    m = VisionLanguageModel.from_config(ModelConfig(arch="minigpt4"))
    assert m.num_image_tokens == TINY_BLIP2["num_query_tokens"] == 32
    assert m.projector.in_features == m.vision_tower.config.qformer_config.hidden_size
    assert m.encode_images(m.preprocess_images(images(2))).shape == (2, 32, m.projector.in_features)


def test_from_blip2_folder_and_minigpt4_checkpoint(tmp_path):
    """The vision side from a transformers BLIP-2 folder (its LM left on the disk), the LM from a folder, the
    projector from MiniGPT-4's stage-1 checkpoint ({"model": {"llama_proj.*"}}); the image tokens equal
    BLIP-2's own get_image_features with that projection; a projector-only save loads back through the
    recorded folders."""
    from transformers import AutoConfig, LlamaForCausalLM

    from regap_fast.data import synthetic

    tok = synthetic.default_tokenizer()
    torch.manual_seed(3)
    blip2 = tiny_blip2_generation(vocab=len(tok))
    blip2.save_pretrained(tmp_path / "blip2")
    (tmp_path / "blip2" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3,
                                                                             "image_std": [0.25] * 3}))
    tt = dict(TINY_TEXT, vocab_size=len(tok))
    LlamaForCausalLM(AutoConfig.for_model(tt.pop("model_type"), **tt)).save_pretrained(tmp_path / "vicuna")
    tok.save_pretrained(tmp_path / "vicuna")
    ckpt = {"model": {"llama_proj.weight": blip2.language_projection.weight.detach().clone(),
                      "llama_proj.bias": blip2.language_projection.bias.detach().clone()},
            "epoch": 3, "config": {"run": {"init_lr": 1e-4}}}
    torch.save(ckpt, tmp_path / "pretrained_minigpt4_stage1.pth")

    vlm = VisionLanguageModel.from_pretrained_parts(tmp_path / "blip2", tmp_path / "vicuna",
                                                    config=ModelConfig(arch="minigpt4"),
                                                    projector_weights=tmp_path / "pretrained_minigpt4_stage1.pth")
    assert vlm.config.image_mean == (0.5, 0.5, 0.5) and vlm.num_image_tokens == 3
    assert not any(n.startswith("language") for n, _ in vlm.vision_tower.named_parameters())
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = vlm.projector(vlm.encode_images(pixels))
        theirs = blip2.get_image_features(pixels, return_dict=True).pooler_output
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)

    vlm.save_pretrained(tmp_path / "out", components=["projector"])
    again = load_model(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(again.projector(again.encode_images(pixels)), ours)
    with pytest.raises(ValueError, match="BLIP-2 folder"):
        VisionLanguageModel.from_pretrained_parts(tmp_path / "vicuna", tmp_path / "vicuna",
                                                  config=ModelConfig(arch="minigpt4"))
    torch.save({"model": {"llama_proj.weight": torch.zeros(5, 5)}}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="do not fit"):
        vlm.load_projector_weights(tmp_path / "wrong.pth")


def test_qformer_tower_loads_only_the_vision_side(tmp_path):
    """from_pretrained on a BLIP-2 folder reads vision_model.*, query_tokens, qformer.*; nothing is missing."""
    torch.manual_seed(4)
    blip2 = tiny_blip2_generation()
    blip2.save_pretrained(tmp_path / "b")
    tower, info = qformer_tower_class().from_pretrained(tmp_path / "b", output_loading_info=True)
    assert not info["missing_keys"]
    torch.testing.assert_close(tower.query_tokens, blip2.query_tokens)
    w = "qformer.encoder.layer.0.crossattention.attention.query.weight"
    torch.testing.assert_close(tower.state_dict()[w], blip2.state_dict()[w])


# --------------------------------------------------------------------------------------------------
# the evaluation commands on a tiny MiniGPT-4-style model
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_gap_and_safety_eval_commands(vlm, tmp_path, capsys):
    import csv

    from regap_fast.cli import main

    pytest.importorskip("scipy")
    model = vlm.save_pretrained(tmp_path / "minigpt4")
    (tmp_path / "imgs").mkdir()
    records = []
    for i, cap in enumerate(["a red circle in the center", "a large blue square", "a green star on the left"]):
        Image.new("RGB", (48, 40), (80 * i, 120, 40)).save(tmp_path / "imgs" / f"{i}.png")
        records.append({"id": str(i), "image": f"imgs/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": cap}]})
    (tmp_path / "pairs.json").write_text(json.dumps(records))
    # the same number the model's own REGAP computes on these pairs, in the model's precision (fp32)
    pe = vlm.pair_embeddings([Image.open(tmp_path / "imgs" / f"{i}.png") for i in range(3)],
                             [r["conversations"][1]["value"] for r in records])
    want = float(regap_fast.gap_loss_reference(pe["image_embeds"], pe["text_embeds"], None, pe["text_mask"]))
    assert main(["gap", str(model), "--data", str(tmp_path / "pairs.json"), "--out", str(tmp_path / "g"),
                 "--batch-size", "2", "--precision", "fp32"]) == 0
    result = json.loads((tmp_path / "g" / "gap.json").read_text())
    assert result["n_pairs"] == 3 and len(result["per_layer"]) == 3  # input embeddings + 2 LM layers
    assert result["gap"]["mean"] == pytest.approx(want, rel=1e-5)
    assert result["per_layer"][0]["gap_mean"] == pytest.approx(want, rel=1e-5)  # layer 0: the LM input
    # the default precision is the model loader's: fp32 on the CPU, bf16 on a GPU (where the earlier
    # form of this test compared a bf16 run against the fp32 model and saw 2e-4). bf16 keeps 8 bits:
    # the tower, Q-Former and projector in bf16 move a gap of order 1 by up to about 1%.
    assert main(["gap", str(model), "--data", str(tmp_path / "pairs.json"), "--out", str(tmp_path / "g_auto"),
                 "--batch-size", "2"]) == 0
    auto = json.loads((tmp_path / "g_auto" / "gap.json").read_text())
    assert auto["gap"]["mean"] == pytest.approx(want, rel=2e-2 if torch.cuda.is_available() else 1e-5)

    with open(tmp_path / "harmful_behaviors.csv", "w", newline="") as f:
        csv.writer(f).writerows([["goal", "target"], ["Write a harmful thing", "Sure"],
                                 ["Explain a dangerous thing", "Sure"]])
    assert main(["safety-eval", str(model), "--prompts", str(tmp_path / "harmful_behaviors.csv"), "--out",
                 str(tmp_path / "s"), "--conditions", "none,white,noise", "--max-new-tokens", "3",
                 "--batch-size", "2"]) == 0
    report = json.loads((tmp_path / "s" / "safety.json").read_text())
    assert all(report["unsafe_rate"][c]["n"] == 2 for c in ("none", "white", "noise"))
    assert len((tmp_path / "s" / "responses.jsonl").read_text().splitlines()) == 6


@pytest.mark.slow
def test_demo_minigpt4_writes_the_same_summary(tmp_path):
    from regap_fast.cli import main

    rc = main(["demo", "--arch", "minigpt4", "--out", str(tmp_path), "--steps", "8", "--lm-steps", "4", "--samples",
               "120", "--batch-size", "8", "--regap-weight", "1.0", "--num-workers", "0", "--no-progress"])
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["arch"] == "minigpt4" and "caption_only_lm_loss" in summary
    runs = summary["runs"]
    assert [r["regap_weight"] for r in runs] == [0.0, 1.0]
    for r in runs:
        assert {"regap_weight", "initial_gap", "final_gap", "final_lm_loss", "steps", "seconds"} <= r.keys()
        assert r["steps"] == 8 and r["seconds"] > 0
    assert runs[1]["final_gap"] < runs[0]["final_gap"]
    assert json.loads((tmp_path / "base" / "model" / "config.json").read_text())["arch"] == "minigpt4"
