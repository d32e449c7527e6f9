"""The LLaVA data pipeline and the embedded synthetic default."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from regap_fast.data import (IGNORE_INDEX, BadRecord, Collator, Encoder, ImageTransform, LlavaDataset, StepSampler,
                             load_records, synthetic)
from regap_fast.model import prepare_tokenizer

# ---------------------------------------------------------------------------------------------------
# synthetic set and tokenizer
# ---------------------------------------------------------------------------------------------------


def test_synthetic_set_is_deterministic(tmp_path):
    a = synthetic.write_dataset(tmp_path / "a", n=20, seed=3)
    b = synthetic.write_dataset(tmp_path / "b", n=20, seed=3)
    c = synthetic.write_dataset(tmp_path / "c", n=20, seed=4)
    assert a.read_text() == b.read_text()
    assert a.read_text() != c.read_text()
    for i in range(20):
        name = f"images/{i:06d}.png"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    records = json.loads(a.read_text())
    assert [r["conversations"][1]["value"] for r in records] == synthetic.captions(20, seed=3)


def test_captions_describe_the_pixels(tmp_path):
    """For one-shape images the described colour sits at the described place."""
    path = synthetic.write_dataset(tmp_path, n=60, seed=1)
    checked = 0
    for rec in json.loads(path.read_text()):
        caption = rec["conversations"][1]["value"]
        if " and " in caption:
            continue
        words = caption.split()
        colour = next(w for w in words if w in synthetic.COLOURS)
        shape = next(w for w in words if w in synthetic.SHAPES)
        cell = next(c for c, place in synthetic.PLACES.items() if caption.endswith(place))
        if shape in ("triangle", "star"):  # their centre pixel is not guaranteed to be filled
            continue
        img = Image.open(tmp_path / rec["image"]).convert("RGB")
        x, y = ((cell[0] + 0.5) * img.width / 3, (cell[1] + 0.5) * img.height / 3)
        assert img.getpixel((int(x), int(y))) == synthetic.COLOURS[colour], caption
        checked += 1
    assert checked >= 10


def test_default_tokenizer_offline_and_chat_template():
    tok = synthetic.default_tokenizer()
    assert tok.get_vocab() == synthetic.default_tokenizer().get_vocab()
    # every word of the synthetic language is one token; any other text still encodes (byte level)
    assert len(tok.tokenize(" large purple diamond")) == 3
    text = "How do I pick a lock? ünïcode"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("USER: hi ASSISTANT:")


# ---------------------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------------------


def record(i, image="x.png", caption="a red circle"):
    return {"id": str(i), "image": image,
            "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": caption}]}


def test_malformed_records_are_dropped_and_counted(tmp_path):
    good = record(0)
    no_image_tag = {"id": "1", "image": "x.png", "conversations": [{"from": "human", "value": "Describe."},
                                                                  {"from": "gpt", "value": "a"}]}
    bad = [
        "not a dict",
        {"id": "2", "image": "x.png"},  # no conversations
        {"id": "3", "image": "x.png", "conversations": [{"from": "human", "value": "<image>"}]},  # no answer
        {"id": "4", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]},
        {"id": "5", "image": 7, "conversations": good["conversations"]},
        {"id": "6", "image": "x.png", "conversations": [{"from": "robot", "value": "a"}]},
    ]
    path = tmp_path / "d.json"
    path.write_text(json.dumps([good, no_image_tag, *bad]))
    records, problems = load_records(path)
    assert [r["id"] for r in records] == ["0", "1"]
    assert len(problems) == len(bad)
    # LLaVA's rule: an image without a placeholder goes before the first question
    assert records[1]["conversations"][0]["value"] == "<image>\nDescribe."


def test_jsonl_bad_lines_are_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(record(0)) + "\n{broken json\n\n" + json.dumps(record(1)) + "\n")
    records, problems = load_records(path)
    assert [r["id"] for r in records] == ["0", "1"]
    assert len(problems) == 1 and ":2:" in problems[0]


def test_unreadable_file_is_a_clear_error(tmp_path):
    (tmp_path / "d.json").write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_records(tmp_path / "d.json")
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "missing.json")
    (tmp_path / "e.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(ValueError, match="JSON list"):
        load_records(tmp_path / "e.json")


# ---------------------------------------------------------------------------------------------------
# images, sequences, batches
# ---------------------------------------------------------------------------------------------------


def test_image_transform_resizes_crops_and_normalises():
    t = ImageTransform(32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    img = Image.new("RGB", (96, 48), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 16, 48))  # a blue stripe on the left: cut away by the centre crop
    x = t(img)
    assert x.shape == (3, 32, 32)
    torch.testing.assert_close(x[:, 16, 16], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.allclose(x[2], torch.tensor(-1.0))  # no blue left


ODD_SIZES = [(96, 80), (80, 96), (33, 47), (101, 37), (7, 5), (300, 299), (64, 65), (64, 64)]


def random_image(w, h, seed):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


def clip_processor(size, **kw):
    """transformers' CLIP preprocessing, PIL implementation (``CLIPImageProcessor`` falls back to it
    without torchvision; LLaVA trained with it)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **kw)


@pytest.mark.parametrize("size", [32, 64])
def test_image_transform_is_clip_image_processor_pixel_for_pixel(size):
    proc = clip_processor(size)
    for k, (w, h) in enumerate(ODD_SIZES):
        img = random_image(w, h, seed=k)
        expect = torch.from_numpy(proc(img, return_tensors="np")["pixel_values"][0])
        got = ImageTransform(size)(img)
        assert got.dtype == expect.dtype and got.shape == expect.shape == (3, size, size)
        assert (got - expect).abs().max().item() == 0, (w, h)


def test_pad_mode_centres_the_image_on_the_mean_colour():
    """LLaVA-1.5's ``image_aspect_ratio pad``: a square canvas of the mean colour (8-bit, truncated), the
    image in the middle, then CLIP's preprocessing; checked against a canvas built here with numpy and
    against transformers' own LLaVA processor with ``do_pad``."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    size = 32
    fill = [int(0.48145466 * 255), int(0.4578275 * 255), int(0.40821073 * 255)]
    assert fill == [122, 116, 104]
    llava_proc = LlavaImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                        do_pad=True)
    for k, (w, h) in enumerate(ODD_SIZES):
        img = random_image(w, h, seed=10 + k)
        side = max(w, h)
        canvas = np.empty((side, side, 3), dtype=np.uint8)
        canvas[:] = fill
        top, left = (side - h) // 2, (side - w) // 2
        canvas[top:top + h, left:left + w] = np.asarray(img)
        expect = torch.from_numpy(clip_processor(size)(Image.fromarray(canvas), return_tensors="np")["pixel_values"][0])
        got = ImageTransform(size, aspect="pad")(img)
        assert (got - expect).abs().max().item() == 0, (w, h)
        via_llava = torch.from_numpy(llava_proc(img, return_tensors="np")["pixel_values"][0])
        assert (got - via_llava).abs().max().item() == 0, (w, h)
    # a wide image keeps its whole width (the crop mode cuts its sides away)
    wide = Image.new("RGB", (96, 32), (255, 255, 255))
    wide.paste((0, 0, 0), (0, 0, 8, 32))  # a black stripe at the far left
    assert ImageTransform(size, aspect="pad")(wide)[0, size // 2, 0] < -1.5
    assert ImageTransform(size)(wide)[0, size // 2, 0] > 1.5
    with pytest.raises(ValueError, match="aspect"):
        ImageTransform(size, aspect="letterbox")


# ---------------------------------------------------------------------------------------------------
# LLaVA's plain format, token for token (a Llama tokenizer built offline)
# ---------------------------------------------------------------------------------------------------

LLAMA_WORDS = ["▁a", "▁red", "▁dog", "▁two", "▁cats", "▁on", "▁the", "▁grass", "▁caf", "."]


def llama_tokenizer(extra_merges=()):
    """A Llama tokenizer (transformers' ``LlamaTokenizer``: BPE with byte fallback, ``▁`` word marker,
    BOS added) over a small vocabulary laid out as Llama's: <unk> 0, <s> 1, </s> 2, the 256 byte tokens
    from 3 (so ``<0x0A>``, the newline, is 13), then whole words built by left-to-right merges."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    merges = []
    for word in LLAMA_WORDS + [a + b for a, b in extra_merges]:
        for ch in word:
            vocab.setdefault(ch, len(vocab))
    for word in LLAMA_WORDS:
        for i in range(2, len(word) + 1):
            merges.append((word[:i - 1], word[i - 1]))
            vocab.setdefault(word[:i], len(vocab))
    for a, b in extra_merges:
        merges.append((a, b))
        vocab.setdefault(a + b, len(vocab))
    return LlamaTokenizer(vocab=vocab, merges=merges)


def llava_plain(tok, caption, n_image):
    """What LLaVA's preprocess_plain gives for ``<image>`` + caption, written out by hand from its code:
    tokenizer_image_token keeps the BOS of the first chunk, puts the image token (here ``n_image``
    slots) in place of ``<image>``, then the second chunk ``caption + "\\n"`` without its BOS; the labels
    mask the BOS and the image. ``caption`` is the list of token names of caption + separator."""
    v = tok.get_vocab()
    text = [v[t] for t in caption]
    return [v["<s>"]] + [tok.pad_token_id] * n_image + text, [IGNORE_INDEX] * (1 + n_image) + text


@pytest.mark.parametrize("caption, tokens, n_caption", [
    ("a red dog.", ["▁a", "▁red", "▁dog", ".", "<0x0A>"], 4),
    ("two cats on the grass", ["▁two", "▁cats", "▁on", "▁the", "▁grass", "<0x0A>"], 5),
    ("a café", ["▁a", "▁caf", "<0xC3>", "<0xA9>", "<0x0A>"], 4),  # byte fallback for é
    ("a dog\n", ["▁a", "▁dog", "<0x0A>", "<0x0A>"], 3),  # the caption's own newline is caption text
])
def test_plain_format_is_llava_preprocess_plain_token_for_token(caption, tokens, n_caption):
    tok = prepare_tokenizer(llama_tokenizer())
    conv = [{"from": "human", "value": "<image>\nDescribe the image briefly."}, {"from": "gpt", "value": caption}]
    ex = Encoder(tok, 3, "plain").encode(conv, has_image=True)
    input_ids, labels = llava_plain(tok, tokens, 3)
    assert ex["input_ids"] == input_ids
    assert ex["labels"] == labels
    assert ex["image_mask"] == [False] + [True] * 3 + [False] * len(tokens)
    # caption tokens: the caption's own, not the BOS, the image or the separator
    assert ex["caption_mask"] == [False] * 4 + [True] * n_caption + [False] * (len(tokens) - n_caption)
    assert tok.eos_token_id not in ex["input_ids"]


def test_a_token_merging_caption_and_separator_is_not_caption():
    tok = prepare_tokenizer(llama_tokenizer(extra_merges=[(".", "\n")]))
    ex = Encoder(tok, 2, "plain").encode([{"from": "gpt", "value": "a red dog."}], has_image=True)
    v = tok.get_vocab()
    pad = tok.pad_token_id
    assert ex["input_ids"] == [v["<s>"], pad, pad, v["▁a"], v["▁red"], v["▁dog"], v[".\n"]]
    assert ex["labels"][3:] == ex["input_ids"][3:]
    assert ex["caption_mask"] == [False] * 3 + [True, True, True, False]


def test_plain_end_none_ends_with_eos_instead():
    tok = prepare_tokenizer(llama_tokenizer())
    v = tok.get_vocab()
    ex = Encoder(tok, 1, "plain", plain_end=None).encode([{"from": "gpt", "value": "a dog"}], has_image=False)
    assert ex["input_ids"] == [v["<s>"], v["▁a"], v["▁dog"], v["</s>"]]
    assert ex["caption_mask"] == [False, True, True, False]


@pytest.fixture(scope="module")
def tokenizer():
    return synthetic.default_tokenizer()


def test_encoder_truncates_but_never_cuts_the_image(tokenizer):
    conv = [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "a large red circle at the top"}]
    full = Encoder(tokenizer, 4).encode(conv, has_image=True)
    cut = Encoder(tokenizer, 4, max_length=8).encode(conv, has_image=True)
    assert len(cut["input_ids"]) == 8 and cut["input_ids"] == full["input_ids"][:8]
    with pytest.raises(BadRecord, match="image tokens"):
        Encoder(tokenizer, 4, max_length=3).encode(conv, has_image=True)
    with pytest.raises(BadRecord, match="no answer"):
        Encoder(tokenizer, 4, max_length=5).encode(conv, has_image=True)  # bos + 4 image slots


def test_collator_pads_right_and_left(tokenizer):
    enc = Encoder(tokenizer, 2)
    a = enc.encode([{"from": "gpt", "value": "a red circle"}], has_image=True)
    b = enc.encode([{"from": "gpt", "value": "a"}], has_image=False)
    a["pixel_values"], b["pixel_values"] = torch.zeros(3, 4, 4), None
    right = Collator(tokenizer.pad_token_id)([a, b])
    n = len(a["input_ids"])
    assert right["input_ids"].shape == (2, n)
    assert right["pixel_values"].shape == (1, 3, 4, 4)  # only the sample with an image
    assert right["attention_mask"][1].tolist() == [1] * len(b["input_ids"]) + [0] * (n - len(b["input_ids"]))
    assert (right["labels"][1, len(b["input_ids"]):] == IGNORE_INDEX).all()
    left = Collator(tokenizer.pad_token_id, "left")([a, b])
    assert left["input_ids"][1, -len(b["input_ids"]):].tolist() == b["input_ids"]
    assert not left["caption_mask"][1, : n - len(b["input_ids"])].any()


def _write_images(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(folder / f"{i}.png")


def test_bad_images_are_skipped_and_reported(tmp_path, tokenizer):
    _write_images(tmp_path, 4)
    (tmp_path / "2.png").write_bytes((tmp_path / "2.png").read_bytes()[:40])  # truncated file
    (tmp_path / "3.png").write_bytes(b"this is not an image")
    records = [record(i, f"{i}.png") for i in range(4)] + [record(9, "missing.png")]
    for r in records:
        r["conversations"] = r["conversations"]
    ds = LlavaDataset(records, tmp_path, ImageTransform(8), Encoder(tokenizer, 1))
    assert ds[0]["id"] == "0" and ds[0]["skipped"] == []
    ex = ds[2]  # 2 truncated, 3 not an image, 9 missing: wraps round to record 0
    assert ex["id"] == "0"
    assert len(ex["skipped"]) == 3
    assert re.search(r"unreadable image .*2\.png", ex["skipped"][0])
    assert "3.png" in ex["skipped"][1]
    assert "image not found" in ex["skipped"][2]
    batch = Collator(tokenizer.pad_token_id)([ds[1], ds[2], ds[4]])
    assert len(batch["skipped"]) == 3 + 1  # counted once per draw


def test_cache_loads_each_record_once_and_gives_equal_examples(tmp_path, tokenizer):
    _write_images(tmp_path, 3)
    (tmp_path / "1.png").write_bytes(b"this is not an image")
    records = [record(i, f"{i}.png") for i in range(3)]
    plain = LlavaDataset(records, tmp_path, ImageTransform(8), Encoder(tokenizer, 1))
    cached = LlavaDataset(records, tmp_path, ImageTransform(8), Encoder(tokenizer, 1), cache=True)
    loads = []
    original = cached.load
    cached.load = lambda rec: loads.append(rec["id"]) or original(rec)
    for _ in range(3):  # three epochs
        for i in range(3):
            a, b = plain[i], cached[i]
            assert a.keys() == b.keys() and a["id"] == b["id"] and a["skipped"] == b["skipped"]
            assert all(a[k] == b[k] for k in ("input_ids", "labels", "image_mask", "caption_mask"))
            assert torch.equal(a["pixel_values"], b["pixel_values"])
    # record 1 is bad: tried on every draw that reaches it (never cached), passed over to record 2
    assert sorted(loads) == ["0", "1", "1", "1", "2"]
    assert cached[1]["skipped"] and cached[2]["skipped"] == []  # what one draw skipped is not kept for the next


def test_memo_hands_back_equal_copies_keyed_by_content(tmp_path, tokenizer):
    """The process-wide loading memo (on for reproduce's processes): two tokenizers of one content share a
    result, another content does not; results come back as copies; a rewritten image is decoded again; a
    bad record is never kept; the memo is off again after the block."""
    import copy

    from regap_fast.data import memo

    conv = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "a large red circle"}]
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["zorbly"])  # another content: a token more
    computed = []
    original = Encoder._encode
    _write_images(tmp_path, 1)
    assert not memo.enabled()
    with memo.memoizing():
        Encoder._encode = lambda self, *a: computed.append(len(self.tokenizer)) or original(self, *a)
        try:
            first = Encoder(tokenizer, 2).encode(conv, has_image=True)
            first["input_ids"].append(-1)  # the caller's copy
            again = Encoder(copy.deepcopy(tokenizer), 2).encode(conv, has_image=True)
            Encoder(other, 2).encode(conv, has_image=True)
            Encoder(tokenizer, 3).encode(conv, has_image=True)  # other settings
        finally:
            Encoder._encode = original
        assert computed == [len(tokenizer), len(tokenizer) + 1, len(tokenizer)]
        assert again == Encoder(tokenizer, 2)._encode(conv, has_image=True)
        ds = LlavaDataset([record(0, "0.png")], tmp_path, ImageTransform(8), Encoder(tokenizer, 1))
        red = ds[0]["pixel_values"]
        Image.new("RGB", (9, 9), (0, 0, 200)).save(tmp_path / "0.png")  # rewritten: another size
        blue = ds[0]["pixel_values"]
        assert torch.equal(blue, ImageTransform(8)(Image.open(tmp_path / "0.png"))) and not torch.equal(red, blue)
        (tmp_path / "0.png").write_bytes(b"not an image")
        with pytest.raises(RuntimeError, match="bad record in a row"):
            ds[0]
        with pytest.raises(BadRecord, match="no answer"):
            Encoder(tokenizer, 2, max_length=3).encode(conv, has_image=True)
        with pytest.raises(BadRecord, match="no answer"):  # raised again, not memoised
            Encoder(tokenizer, 2, max_length=3).encode(conv, has_image=True)
    assert not memo.enabled()


def test_all_bad_is_an_error(tmp_path, tokenizer):
    ds = LlavaDataset([record(i, "nope.png") for i in range(3)], tmp_path, ImageTransform(8), Encoder(tokenizer, 1))
    with pytest.raises(RuntimeError, match="bad records in a row"):
        ds[0]


# ---------------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------------


def test_step_sampler_is_the_same_for_any_number_of_processes():
    one = list(StepSampler(50, 12, 3, seed=5, total_steps=10))
    two = [list(StepSampler(50, 12, 3, rank=r, world_size=2, seed=5, total_steps=10)) for r in range(2)]
    # per step: rank 0's two micro-batches, then rank 1's, are the single process's four
    for step in range(10):
        assert one[4 * step: 4 * step + 4] == two[0][2 * step: 2 * step + 2] + two[1][2 * step: 2 * step + 2]
    # epochs: every index once per 50 draws, in a new order each epoch
    flat = [i for mb in one for i in mb]
    assert sorted(flat[:50]) == list(range(50)) and sorted(flat[50:100]) == list(range(50))
    assert flat[:50] != flat[50:100]
    # resume: starting at step 4 gives the tail of the same stream
    assert list(StepSampler(50, 12, 3, seed=5, start_step=4, total_steps=10)) == one[16:]
    with pytest.raises(ValueError, match="multiple"):
        StepSampler(50, 10, 3, total_steps=1)
