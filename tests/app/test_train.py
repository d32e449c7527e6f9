"""The training loop: stage 1 with and without REGAP, resume, DDP/FSDP, bad data, stage 2, the CLIs."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from regap_fast.data import synthetic
from regap_fast.train import TrainConfig, train
from regap_fast.train.layout import latest_checkpoint
from regap_fast.train.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A small synthetic set shared by the tests of this module."""
    return synthetic.write_dataset(tmp_path_factory.mktemp("shapes"), n=240, seed=0)


def tiny(out, data, **kw):
    base = dict(out=str(out), data=str(data), global_batch_size=8, micro_batch_size=4, max_steps=6, eval_samples=16,
                eval_every=3, num_workers=0, progress=False, plot=False, tensorboard=False, save_model=False)
    return TrainConfig(**{**base, **kw})


def steps(out):
    return [r for r in read_jsonl(Path(out) / "metrics.jsonl") if "lm_loss" in r]


def evals(out):
    return [r for r in read_jsonl(Path(out) / "metrics.jsonl") if "eval_gap" in r]


@pytest.mark.slow
def test_stage1_learns_and_regap_closes_the_gap(tmp_path, shapes):
    runs = {lam: train(tiny(tmp_path / f"l{lam}", shapes, regap_weight=lam, max_steps=30, eval_every=10))
            for lam in (0.0, 0.5)}
    for lam, s in runs.items():
        # a frozen *random* LM can only be nudged through its inputs: ~0.1 nats in 30 steps
        assert s["final_lm_loss"] < s["initial_lm_loss"] - 0.05, (lam, s)
        train_loss = [r["lm_loss"] for r in steps(tmp_path / f"l{lam}")]
        assert sum(train_loss[-5:]) < sum(train_loss[:5])
    assert runs[0.0]["initial_gap"] == runs[0.5]["initial_gap"]  # the same seed, the same start
    assert runs[0.5]["final_gap"] < 0.5 * runs[0.0]["final_gap"], runs
    assert runs[0.5]["final_gap"] < runs[0.5]["initial_gap"]
    # lambda = 0 trains without the gap; lambda > 0 logs it at every step
    assert all(r["gap"] is None for r in steps(tmp_path / "l0.0"))
    assert all(r["gap"] > 0 for r in steps(tmp_path / "l0.5"))


@pytest.mark.slow
def test_resume_reproduces_an_uninterrupted_run(tmp_path, shapes):
    kw = dict(max_steps=8, eval_every=4, save_every=2, num_workers=1)
    train(tiny(tmp_path / "straight", shapes, **kw))
    train(tiny(tmp_path / "cut", shapes, stop_at_step=5, **kw))
    assert latest_checkpoint(tmp_path / "cut").name == "step-00000005"
    # a checkpoint being written when the process died is never picked up
    (tmp_path / "cut" / "checkpoints" / ".tmp-step-00000006").mkdir()
    with pytest.raises(FileExistsError, match="--resume auto"):  # an exception, not SystemExit (issue 17)
        train(tiny(tmp_path / "cut", shapes, **kw))
    train(tiny(tmp_path / "cut", shapes, resume="auto", **kw))
    a = load_file(str(latest_checkpoint(tmp_path / "straight") / "trainable.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "cut") / "trainable.safetensors"))
    assert a.keys() == b.keys() and len(a) == 4  # the projector's two weights and biases
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert steps(tmp_path / "straight") == [{**r, "seconds": s["seconds"], "tokens_per_s": s["tokens_per_s"]}
                                            for r, s in zip(steps(tmp_path / "cut"), steps(tmp_path / "straight"))]
    assert [p.name for p in sorted((tmp_path / "cut" / "checkpoints").glob("step-*"))] == \
        ["step-00000006", "step-00000008"]  # the last two kept


def _run(args, **kw):
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    # the CPU (gloo) even on a GPU machine: two processes need two GPUs there
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=240, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, shapes, mode):
    flags = ["--data", str(shapes), "--global-batch-size", "8", "--micro-batch-size", "2", "--max-steps", "5",
             "--eval-samples", "16", "--eval-every", "5", "--num-workers", "0", "--no-progress", "--no-plot",
             "--no-tensorboard", "--regap-weight", "0.3"]
    one = _run([sys.executable, "-m", "regap_fast", "train", "--out", str(tmp_path / "one"), *flags])
    assert one.returncode == 0, one.stderr[-3000:]
    extra = ["--fsdp"] if mode == "fsdp" else []
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "regap_fast", "train", "--out", str(tmp_path / "two"), *flags, *extra])
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 processes x 2 micro-batches of 2" in two.stderr
    a, b = steps(tmp_path / "one"), steps(tmp_path / "two")
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        assert x["lm_loss"] == pytest.approx(y["lm_loss"], rel=1e-5)
        assert x["gap"] == pytest.approx(y["gap"], rel=1e-5)
    assert evals(tmp_path / "one")[-1]["eval_gap"] == pytest.approx(evals(tmp_path / "two")[-1]["eval_gap"], rel=1e-5)
    # the exported models agree too (FSDP gathers its shards for it)
    ma = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    mb = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    torch.testing.assert_close(ma["projector.linear_1.weight"], mb["projector.linear_1.weight"], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_bad_data_is_skipped_and_counted(tmp_path, shapes):
    data = tmp_path / "data"
    shutil.copytree(shapes.parent, data)
    records = json.loads((data / shapes.name).read_text())[:100]
    records[3]["image"] = "images/does-not-exist.png"
    truncated = data / records[5]["image"]
    truncated.write_bytes(truncated.read_bytes()[:60])
    records.insert(7, {"id": "broken", "conversations": "not a list"})
    (data / "bad.json").write_text(json.dumps(records))
    s = train(tiny(tmp_path / "run", data / "bad.json", max_steps=30, eval_samples=8, eval_every=0))
    assert s["malformed_records"] == 1
    assert s["skipped_records"] >= 2  # each bad image, every time it is drawn (30 steps x 8 > 2 epochs)
    assert steps(tmp_path / "run")[-1]["skipped"] == s["skipped_records"]


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_stage2(tmp_path, shapes, lora):
    if lora:
        pytest.importorskip("peft")
    stage1 = train(tiny(tmp_path / "s1", shapes, max_steps=2, save_model=True))
    assert stage1["steps"] == 2
    s = train(tiny(tmp_path / "s2", shapes, stage=2, lora=lora, lora_rank=4, lora_alpha=8, max_steps=3,
                   model=str(tmp_path / "s1" / "model"), save_model=True, eval_every=0))
    assert s["final_lm_loss"] > 0
    trained = load_file(str(latest_checkpoint(tmp_path / "s2") / "trainable.safetensors"))
    lm_keys = [k for k in trained if k.startswith("language_model.")]
    assert lm_keys and all(("lora_" in k) == lora for k in lm_keys)
    from regap_fast.model import load_model

    merged = load_model(tmp_path / "s2" / "model")  # LoRA folded in: a plain transformers LM
    assert type(merged.language_model).__name__ == "LlamaForCausalLM"
    assert merged.generate(["hi"], [None], max_new_tokens=2)


@pytest.mark.slow
def test_cli_help_and_bad_flags():
    ok = _run([sys.executable, "-m", "regap_fast", "train", "--help"])
    assert ok.returncode == 0
    for flag in ("--regap-weight", "--resume", "--lora", "--global-batch-size", "--fsdp", "--vision-tower"):
        assert flag in ok.stdout
    bad = _run([sys.executable, "-m", "regap_fast", "train", "--regap-wieght", "1"])
    assert bad.returncode == 2 and "unrecognized arguments: --regap-wieght" in bad.stderr
    wrong = _run([sys.executable, "-m", "regap_fast", "train", "--lora"])
    assert wrong.returncode == 2 and "--lora is for stage 2" in wrong.stderr
    typo = _run([sys.executable, "-m", "regap_fast", "train", "--stage", "3"])
    assert typo.returncode == 2 and "invalid choice" in typo.stderr
    demo = _run([sys.executable, "-m", "regap_fast", "demo", "--help"])
    assert demo.returncode == 0 and "--regap-weight" in demo.stdout


@pytest.mark.slow
def test_demo_writes_its_summary(tmp_path):
    from regap_fast.cli import main

    rc = main(["demo", "--out", str(tmp_path), "--steps", "16", "--lm-steps", "8", "--samples", "200",
               "--batch-size", "8", "--regap-weight", "0.5", "--num-workers", "0", "--no-progress"])
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    runs = summary["runs"]
    assert [r["regap_weight"] for r in runs] == [0.0, 0.5]
    for r in runs:
        assert {"regap_weight", "initial_gap", "final_gap", "final_lm_loss", "steps", "seconds"} <= r.keys()
        assert r["steps"] == 16 and r["seconds"] > 0
    assert runs[1]["final_gap"] < runs[0]["final_gap"]
    try:
        import matplotlib  # noqa: F401  (the plot is skipped, with a warning, without it)
    except ImportError:
        return
    assert Image.open(tmp_path / "demo.png").size[0] > 0


def test_mm_projector_lr_gives_the_projector_its_own_learning_rate():
    from regap_fast.train.loop import make_optimizer

    lm = [torch.nn.Parameter(torch.ones(3, 3)), torch.nn.Parameter(torch.ones(3))]
    projector = [torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(2))]
    cfg = TrainConfig(stage=2, lr=2e-5, weight_decay=0.1, mm_projector_lr=2e-3)
    groups = make_optimizer(lm + projector, cfg, fused=False, projector_params=projector).param_groups
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert [by_param[id(p)] for p in lm + projector] == [(2e-5, 0.1), (2e-5, 0.0), (2e-3, 0.1), (2e-3, 0.0)]
    assert groups[0]["lr"] == 2e-5  # the lr the metrics log is --lr
    same = make_optimizer(lm + projector, TrainConfig(stage=2, lr=2e-5), fused=False, projector_params=projector)
    assert {g["lr"] for g in same.param_groups} == {2e-5} and len(same.param_groups) == 2
    with pytest.raises(ValueError, match="--mm-projector-lr must be > 0"):
        TrainConfig(mm_projector_lr=0.0).check()
