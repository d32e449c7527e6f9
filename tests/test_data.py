"""The LLaVA data pipeline and the embedded synthetic default."""

import json
import re

import pytest
import torch
from PIL import Image

from regap_fast.data import (IGNORE_INDEX, BadRecord, Collator, Encoder, ImageTransform, LlavaDataset, StepSampler,
                             load_records, synthetic)

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
    assert not left["caption_positions"][1, : n - len(b["input_ids"])].any()


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
