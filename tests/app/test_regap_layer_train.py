"""The library's own model and trainer: --regap-layer k (the gap after decoder layer k) against a hand
computation from the hidden states, and --regap-scale text-norm (alpha frozen after its warm-up steps,
kept in the checkpoints, restored exactly on resume)."""

from pathlib import Path

import pytest
import torch
from helpers import gaps_float64
from PIL import Image

from regap_fast.data import synthetic
from regap_fast.model import ModelConfig, VisionLanguageModel
from regap_fast.train import TrainConfig, train
from regap_fast.train.layout import latest_checkpoint
from regap_fast.train.metrics import read_jsonl

CAPTIONS = ["a small red circle in the center", "a large blue square", "there is a green star near the top"]


@pytest.fixture(scope="module")
def tiny_vlm():
    torch.manual_seed(0)
    vlm = VisionLanguageModel.from_config(ModelConfig()).eval()
    assert vlm.language_model.config.num_hidden_layers == 2  # layer 1 is not the last (normed) hidden state
    return vlm


def batch_of(vlm):
    enc = vlm.encoder("plain")
    images = [Image.new("RGB", (64, 64), (70 * i, 90, 200 - 50 * i)) for i in range(len(CAPTIONS))]
    examples = [dict(enc.encode([{"from": "gpt", "value": c}], has_image=True), pixel_values=vlm.image_transform(im))
                for im, c in zip(images, CAPTIONS)]
    return images, vlm._batch(examples)


def test_forward_gap_after_decoder_layer_k(tiny_vlm):
    images, b = batch_of(tiny_vlm)
    inputs = {k: b[k] for k in ("input_ids", "pixel_values", "image_mask", "labels", "caption_mask")}
    with torch.no_grad():
        out = tiny_vlm(**inputs, regap_weight=0.5, regap_layer=1, caption_norms=True)
        h = tiny_vlm.pair_embeddings(images, CAPTIONS, output_hidden_states=True)["hidden_states"][1]
        at_input = tiny_vlm(**inputs, regap_weight=0.5)
    gaps, valid = gaps_float64(h, h, b["image_mask"], b["caption_mask"])
    assert valid.all() and int(out["num_gap_samples"]) == len(CAPTIONS)
    torch.testing.assert_close(out["gap_sum"].double(), gaps.sum(), rtol=1e-5, atol=1e-6)
    rows = h.double()[b["caption_mask"]]
    torch.testing.assert_close(out["caption_norm_sum"], torch.linalg.vector_norm(rows, dim=-1).sum(), rtol=1e-6,
                               atol=1e-6)
    assert int(out["caption_tokens"]) == rows.shape[0]
    torch.testing.assert_close(out["loss"].double(), out["lm_loss"].double() + 0.5 * gaps.mean(), rtol=1e-5,
                               atol=1e-6)
    assert not torch.allclose(at_input["gap_sum"].double(), gaps.sum(), rtol=1e-3)  # layer 0 differs


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return synthetic.write_dataset(tmp_path_factory.mktemp("shapes"), n=96, seed=0)


def tiny(out, data, **kw):
    base = dict(out=str(out), data=str(data), global_batch_size=8, micro_batch_size=4, max_steps=5, eval_samples=8,
                eval_every=5, num_workers=0, progress=False, plot=False, tensorboard=False, save_model=False,
                regap_weight=0.5, regap_layer=1, regap_scale="text-norm", regap_scale_steps=2, save_every=1)
    return TrainConfig(**{**base, **kw})


def steps(out):
    return [r for r in read_jsonl(Path(out) / "metrics.jsonl") if "lm_loss" in r]


@pytest.mark.slow
def test_text_norm_alpha_frozen_after_warm_up_and_restored_on_resume(tmp_path, shapes):
    train(tiny(tmp_path / "straight", shapes))
    recs = steps(tmp_path / "straight")
    alphas = [r["regap_alpha"] for r in recs]
    assert alphas[0] != alphas[1]  # step 2 adds its captions to the estimate
    assert alphas[2:] == [alphas[1]] * 3  # frozen after 2 steps
    for r in recs:  # the logged loss is lm + lambda * alpha * gap
        assert r["loss"] == pytest.approx(r["lm_loss"] + 0.5 * r["regap_alpha"] * r["gap"], rel=1e-9)
    state = torch.load(latest_checkpoint(tmp_path / "straight") / "train_state.pt", weights_only=True)
    assert state["counters"]["regap_scale"]["frozen"] == alphas[1] and state["counters"]["regap_scale"]["steps"] == 2

    train(tiny(tmp_path / "cut", shapes, stop_at_step=2))  # stopped right when alpha froze
    train(tiny(tmp_path / "cut", shapes, resume="auto"))
    assert [r["regap_alpha"] for r in steps(tmp_path / "cut")] == alphas  # bit for bit
    assert [r["gap"] for r in steps(tmp_path / "cut")] == [r["gap"] for r in recs]


def test_bad_layer_and_scale_settings_are_one_line(tmp_path, shapes):
    with pytest.raises(ValueError, match="--regap-layer must be >= 0"):
        tiny(tmp_path / "a", shapes, regap_layer=-1).check()
    with pytest.raises(ValueError, match="--regap-scale-steps must be >= 1"):
        tiny(tmp_path / "b", shapes, regap_scale_steps=0).check()
    with pytest.raises(ValueError, match="REGAP layer 5 does not exist: the language model has 2 decoder layers"):
        train(tiny(tmp_path / "c", shapes, regap_layer=5, max_steps=1))


@pytest.mark.slow
def test_two_processes_freeze_the_alpha_of_one(tmp_path, shapes):
    """Each step's caption norms are summed over the ranks: two processes freeze the alpha one process does."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    flags = ["--data", str(shapes), "--global-batch-size", "8", "--micro-batch-size", "2", "--max-steps", "3",
             "--eval-samples", "8", "--eval-every", "3", "--num-workers", "0", "--no-progress", "--no-plot",
             "--no-tensorboard", "--regap-weight", "0.3", "--regap-layer", "1", "--regap-scale", "text-norm",
             "--regap-scale-steps", "2"]
    runs = {"one": [sys.executable, "-m", "regap_fast", "train"],
            "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "regap_fast", "train"]}
    for name, cmd in runs.items():
        done = subprocess.run([*cmd, "--out", str(tmp_path / name), *flags], capture_output=True, text=True,
                              cwd=root, env=env, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = ([r["regap_alpha"] for r in steps(tmp_path / n)] for n in ("one", "two"))
    assert one[2] == pytest.approx(two[2], rel=1e-12) and one[2] == one[1]  # frozen after step 2, the same
