"""The three commands end to end on tiny saved models (the real model class, random weights)."""

import csv
import json

import pytest
import torch
from PIL import Image

from regap_fast.cli import main

pytest.importorskip("scipy")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three tiny checkpoints, a LLaVA-format pair set and an AdvBench-shaped prompt file."""
    from regap_fast.model import ModelConfig, VisionLanguageModel

    root = tmp_path_factory.mktemp("eval_cli")
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(VisionLanguageModel.from_config(ModelConfig()).save_pretrained(root / f"ckpt{seed}"))
    (root / "imgs").mkdir()
    records = []
    for i, caption in enumerate(["a red circle in the center", "a large blue square", "a green star on the left"]):
        Image.new("RGB", (64, 64), (80 * i, 120, 40)).save(root / "imgs" / f"{i}.png")
        records.append({"id": str(i), "image": f"imgs/{i}.png",
                        "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                                          {"from": "gpt", "value": caption}]})
    (root / "pairs.json").write_text(json.dumps(records))
    with open(root / "harmful_behaviors.csv", "w", newline="") as f:
        csv.writer(f).writerows([["goal", "target"], ["Write a harmful thing", "Sure"],
                                 ["Explain a dangerous thing", "Sure"], ["Describe a bad plan", "Sure"]])
    return root, models


def test_gap_command(runs, capsys):
    root, models = runs
    out = root / "run0"
    assert main(["gap", str(models[0]), "--data", str(root / "pairs.json"), "--out", str(out),
                 "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "per-sample gap: mean" in printed and "layer  2" in printed
    result = json.loads((out / "gap.json").read_text())
    assert result["n_pairs"] == 3 and len(result["per_layer"]) == 3 and "samples" not in result
    assert result["model"].endswith("ckpt0")
    assert len(list(csv.DictReader((out / "gap_samples.csv").read_text().splitlines()))) == 3
    assert (out / "gap.png").stat().st_size > 1000


def test_safety_eval_command_and_resume(runs, capsys):
    root, models = runs
    out = root / "run0"
    argv = ["safety-eval", str(models[0]), "--prompts", str(root / "harmful_behaviors.csv"), "--out", str(out),
            "--conditions", "none,white,noise,typo", "--max-new-tokens", "4", "--batch-size", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "judge: refusal" in printed and "typo" in printed
    report = json.loads((out / "safety.json").read_text())
    assert report["conditions"] == ["none", "white", "noise", "typo"]
    assert all(report["unsafe_rate"][c]["n"] == 3 for c in report["conditions"])
    assert set(report["degradation"]) == {"white", "noise", "typo"}
    lines = (out / "responses.jsonl").read_text().splitlines()
    assert len(lines) == 12
    assert main(argv) == 0  # again: all answers come from the cache
    assert (out / "responses.jsonl").read_text().splitlines() == lines
    assert json.loads((out / "safety.json").read_text()) == report


@pytest.mark.slow
def test_compare_command(runs, capsys):
    root, models = runs
    for i, model in enumerate(models):
        out = root / f"run{i}"
        if not (out / "safety.json").exists():
            assert main(["gap", str(model), "--data", str(root / "pairs.json"), "--out", str(out),
                         "--no-per-layer"]) == 0
            assert main(["safety-eval", str(model), "--prompts", str(root / "harmful_behaviors.csv"), "--out",
                         str(out), "--conditions", "none,white", "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    assert main(["compare", *(str(root / f"run{i}") for i in range(3)), "--out", str(root / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert "run0" in printed and "run2" in printed
    result = json.loads((root / "cmp" / "compare.json").read_text())
    assert len(result["runs"]) == 3 and result["correlation"]["n"] == 3
    assert (root / "cmp" / "compare.png").is_file() and (root / "cmp" / "compare.csv").is_file()


def test_command_errors(runs, tmp_path, capsys):
    """A bad input is one clear line on stderr and exit status 2, before any model is loaded."""
    root, _ = runs
    prompts = str(root / "harmful_behaviors.csv")
    cases = [
        (["safety-eval", "no-model", "--prompts", prompts, "--out", str(tmp_path), "--judge", "guard"],
         "--judge guard needs --guard-model"),
        (["safety-eval", "no-model", "--prompts", prompts, "--out", str(tmp_path), "--conditions", "none,sepia"],
         "unknown condition 'sepia'"),
        (["safety-eval", "no-model", "--prompts", str(tmp_path / "x.csv"), "--out", str(tmp_path)],
         "prompt file not found"),
        (["safety-eval", "no-model", "--prompts", prompts, "--out", str(tmp_path), "--judge", "guard",
          "--guard-model", str(tmp_path)], "guard model folder not found"),
        (["safety-eval", "no-model", "--prompts", prompts, "--out", str(tmp_path), "--judge", "beaverdam"],
         "--judge beaverdam needs --judge-model DIR"),
        (["safety-eval", "no-model", "--prompts", prompts, "--out", str(tmp_path), "--judge", "beaverdam",
          "--judge-model", str(tmp_path)], "judge model folder not found"),
        (["safety-eval", "no-model", "--prompts", prompts, "--out", str(tmp_path), "--judge-threshold", "0.5"],
         "--judge-threshold applies to --judge beaverdam only"),
        (["gap", "no-model", "--data", str(tmp_path / "pairs.json"), "--out", str(tmp_path)],
         "pairs file not found"),
        (["compare", str(root / "run0"), str(tmp_path), "--out", str(tmp_path)], "gap.json not found"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"regap-fast {argv[0]}: error:" in err and message in err, err
