"""The gap tool: the same numbers as fused_gap_loss on the model's embeddings, per-layer numbers by
hand on the tiny 2-layer model, batch-size invariance, the LLaVA-format loader."""

import json

import pytest
import torch
from helpers import gaps_float64
from PIL import Image

from regap_fast import fused_gap_loss
from regap_fast.eval import load_pairs, measure_gap

CAPTIONS = ["a small red circle in the center", "a large blue square in the top left corner",
            "there is a green star", "an image of a yellow triangle in the bottom and a pink diamond in the left",
            "a cyan circle"]


@pytest.fixture(scope="module")
def tiny_vlm():
    from regap_fast.model import ModelConfig, VisionLanguageModel

    torch.manual_seed(0)
    vlm = VisionLanguageModel.from_config(ModelConfig()).eval()
    assert vlm.language_model.config.num_hidden_layers == 2  # the hand computation below is on 2 layers
    return vlm


def images(n, size=64):
    return [Image.new("RGB", (size, size), (40 * i % 256, 90, 200 - 30 * i)) for i in range(n)]


def write_llava(root, missing=()):
    (root / "imgs").mkdir(parents=True)
    records = []
    for i, (im, cap) in enumerate(zip(images(len(CAPTIONS)), CAPTIONS)):
        if i not in missing:
            im.save(root / "imgs" / f"{i}.png")
        records.append({"id": f"s{i}", "image": f"imgs/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image briefly."}, {"from": "gpt", "value": cap}]})
    (root / "pairs.json").write_text(json.dumps(records))
    return root / "pairs.json"


def test_gap_equals_fused_gap_loss(tiny_vlm):
    ims = images(5)
    result = measure_gap(tiny_vlm, list(zip(ims, CAPTIONS)), batch_size=5, per_layer=False, progress=False)
    out = tiny_vlm.pair_embeddings(ims, CAPTIONS)
    args = out["image_embeds"], out["text_embeds"], None, out["text_mask"]
    expected = fused_gap_loss(*args, reduction="none")
    got = torch.tensor([s["gap"] for s in result["samples"]])
    torch.testing.assert_close(got, expected.cpu(), rtol=1e-6, atol=1e-6)
    assert result["gap"]["mean"] == pytest.approx(fused_gap_loss(*args).item(), rel=1e-6)
    # and against an independent float64 computation with boolean indexing
    ref, valid = gaps_float64(*args)
    assert valid.all()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    assert result["n_pairs"] == 5 and result["per_layer"] is None
    assert [s["id"] for s in result["samples"]] == ["0", "1", "2", "3", "4"]


def _by_hand(h, where_image, where_caption):
    """Per-layer numbers for one layer, sample by sample, in float64."""
    mu_i = torch.stack([h[b][where_image[b]].double().mean(0) for b in range(h.shape[0])])
    mu_t = torch.stack([h[b][where_caption[b]].double().mean(0) for b in range(h.shape[0])])
    gaps = (mu_i - mu_t).norm(dim=-1)
    c_i, c_t = mu_i.mean(0), mu_t.mean(0)
    return {"gap_mean": gaps.mean().item(), "gap_std": gaps.std(unbiased=False).item(),
            "centroid_distance": (c_i - c_t).norm().item(),
            "centroid_cosine": (torch.dot(c_i, c_t) / (c_i.norm() * c_t.norm())).item(),
            "pair_cosine_mean": torch.nn.functional.cosine_similarity(mu_i, mu_t).mean().item()}


@pytest.mark.parametrize("replay_bytes", [None, 0], ids=["rows-kept", "pairs-streamed-again"])
def test_mir_takes_further_passes_for_the_outlier_rule(tiny_vlm, monkeypatch, replay_bytes):
    """A 0.5-sigma rule replaces rows in every layer: the CLI path takes the further passes (the first pass's
    rows kept, or the same pairs through the model again when they do not fit), and its MIR is the
    published procedure's on the hidden states after each decoder layer."""
    from helpers import published_mir

    from regap_fast.eval import gap, mir

    monkeypatch.setattr(mir, "OUTLIER_SIGMAS", 0.5)
    if replay_bytes is not None:
        monkeypatch.setattr(gap, "MIR_REPLAY_BYTES", replay_bytes)
    calls = []
    monkeypatch.setattr(tiny_vlm, "pair_embeddings",
                        lambda *a, _f=tiny_vlm.pair_embeddings, **k: calls.append(1) or _f(*a, **k))
    ims = images(5)
    result = measure_gap(tiny_vlm, list(zip(ims, CAPTIONS)), batch_size=2, progress=False, metric="mir")
    assert len(calls) == (3 if replay_bytes is None else 3 * 5)  # 3 batches, once or in each of the 5 passes
    out = tiny_vlm.pair_embeddings(ims, CAPTIONS, output_hidden_states=True)
    hidden = out["hidden_states"][1:]
    image = [h[out["image_mask"]] for h in hidden]
    caption = [h[out["caption_mask"]] for h in hidden]
    expected, per_layer = published_mir(image, caption, sigmas=0.5)
    m = result["mir"]
    assert m["passes"] == 5 and all(r["image_outliers"] > 0 and r["caption_outliers"] > 0 for r in m["per_layer"])
    assert m["value"] == pytest.approx(expected, rel=1e-5)
    assert [r["frechet"] for r in m["per_layer"]] == pytest.approx(per_layer, rel=1e-5)
    assert "gap" not in result and result["n_pairs"] == 5


def test_per_layer_by_hand(tiny_vlm):
    ims = images(5)
    result = measure_gap(tiny_vlm, list(zip(ims, CAPTIONS)), batch_size=2, per_layer=True, progress=False)
    out = tiny_vlm.pair_embeddings(ims, CAPTIONS, output_hidden_states=True)
    hidden = out["hidden_states"]
    assert len(hidden) == 3 and len(result["per_layer"]) == 3  # input embeddings + 2 layers
    for layer, h in enumerate(hidden):
        expected = _by_hand(h, out["image_mask"], out["caption_mask"])
        got = result["per_layer"][layer]
        assert got["layer"] == layer
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (layer, key)
    # layer 0 is the LLM input: its numbers are the input gap's
    for key in ("centroid_distance", "centroid_cosine", "pair_cosine_mean"):
        assert result["per_layer"][0][key] == pytest.approx(result[key], rel=1e-5)
    assert result["per_layer"][0]["gap_mean"] == pytest.approx(result["gap"]["mean"], rel=1e-5)
    # deeper layers move the two sides: the numbers are not all the same
    assert result["per_layer"][2]["gap_mean"] != pytest.approx(result["per_layer"][0]["gap_mean"], rel=1e-3)


def test_centroids_by_hand(tiny_vlm):
    ims = images(4)
    result = measure_gap(tiny_vlm, list(zip(ims, CAPTIONS[:4])), per_layer=False, progress=False)
    out = tiny_vlm.pair_embeddings(ims, CAPTIONS[:4])
    mu_i = out["image_embeds"].double().mean(1)
    mu_t = torch.stack([out["text_embeds"][b][out["text_mask"][b]].double().mean(0) for b in range(4)])
    c_i, c_t = mu_i.mean(0), mu_t.mean(0)
    assert result["centroid_distance"] == pytest.approx((c_i - c_t).norm().item(), rel=1e-5)
    assert result["centroid_cosine"] == pytest.approx(
        torch.nn.functional.cosine_similarity(c_i, c_t, dim=0).item(), rel=1e-5)


@pytest.mark.slow
def test_batch_size_does_not_change_the_numbers(tiny_vlm):
    pairs = list(zip(images(5), CAPTIONS))  # captions of different lengths: padding in every batch
    one = measure_gap(tiny_vlm, pairs, batch_size=1, progress=False)
    three = measure_gap(tiny_vlm, pairs, batch_size=3, progress=False)
    assert [s["gap"] for s in one["samples"]] == pytest.approx([s["gap"] for s in three["samples"]], rel=1e-5)
    for a, b in zip(one["per_layer"], three["per_layer"]):
        assert a["gap_mean"] == pytest.approx(b["gap_mean"], rel=1e-4)
        assert a["centroid_distance"] == pytest.approx(b["centroid_distance"], rel=1e-4)


def test_distribution_fields(tiny_vlm):
    result = measure_gap(tiny_vlm, list(zip(images(5), CAPTIONS)), per_layer=False, progress=False, bins=4)
    g = result["gap"]
    gaps = sorted(s["gap"] for s in result["samples"])
    assert g["min"] == pytest.approx(gaps[0]) and g["max"] == pytest.approx(gaps[-1])
    assert g["quantiles"]["0.5"] == pytest.approx(gaps[2])
    assert sum(g["histogram"]["counts"]) == 5 and len(g["histogram"]["edges"]) == 5


def test_load_pairs_and_skips(tiny_vlm, tmp_path):
    path = write_llava(tmp_path, missing=(1,))
    with pytest.warns(UserWarning, match="1 records skipped: image not found"):
        pairs = load_pairs(path)
    assert [p.id for p in pairs] == ["s0", "s2", "s3", "s4"]
    assert pairs[1].caption == CAPTIONS[2] and pairs[1].image == tmp_path / "imgs" / "2.png"
    (tmp_path / "imgs" / "3.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="pair s3: image unreadable"):
        result = measure_gap(tiny_vlm, pairs, batch_size=2, progress=False)
    assert result["n_pairs"] == 3 and result["n_skipped"] == 1
    assert [s["id"] for s in result["samples"]] == ["s0", "s2", "s4"]
    with pytest.warns(UserWarning):
        assert len(load_pairs(path, limit=2)) == 2


def test_load_pairs_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_pairs(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[{]")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_pairs(bad)
    bad.write_text(json.dumps([{"id": 1, "image": "a.png", "conversations": [{"from": "human", "value": "x"}]}]))
    with pytest.raises(ValueError, match="no usable record"):  # no caption: dropped
        load_pairs(bad)
    bad.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match="must hold a JSON list"):
        load_pairs(bad)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    bad.write_text(json.dumps([{"id": "t", "conversations": [{"from": "human", "value": "hi"},
                                                             {"from": "gpt", "value": "hello"}]},
                               {"id": "p", "image": "a.png", "conversations": [{"from": "gpt", "value": "a cap"}]}]))
    with pytest.warns(UserWarning, match="1 records without an image skipped"):
        pairs = load_pairs(bad)
    assert [(p.id, p.caption) for p in pairs] == [("p", "a cap")]
