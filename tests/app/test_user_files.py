"""Nothing of the user's is deleted: a rerun or ``--overwrite`` removes only what runs of the library wrote
(the manifest of ``regap_fast/train/output_folder.py``), and a run that fails before training leaves no
folder behind."""

import json
from pathlib import Path

import pytest

from regap_fast.cli import main
from regap_fast.data import synthetic
from regap_fast.train.output_folder import MANIFEST, OutputFolder

QUICK = ["--num-workers", "0", "--no-progress", "--no-plot", "--no-tensorboard", "--global-batch-size", "2",
         "--micro-batch-size", "2", "--eval-samples", "1"]


def write(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------------
# the manifest on its own
# --------------------------------------------------------------------------------------------------


def test_only_what_a_run_wrote_is_removed(tmp_path):
    mine = write(tmp_path / "notes.txt", "mine")
    folder = OutputFolder(tmp_path)
    folder.begin()
    write(tmp_path / "checkpoints" / "step-00000001" / "w.bin")
    write(tmp_path / "metrics.jsonl")
    folder.record()
    mine_later = write(tmp_path / "checkpoints" / "mine.pt", "mine too")  # put there after the run
    assert set(folder.written()[0]) == {"checkpoints/step-00000001/w.bin", "metrics.jsonl"}

    removed = OutputFolder(tmp_path).remove_previous()
    assert sorted(removed) == ["checkpoints/step-00000001/w.bin", "metrics.jsonl"]
    assert mine.read_text() == "mine" and mine_later.read_text() == "mine too"
    assert not (tmp_path / "checkpoints" / "step-00000001").exists()  # emptied folder of the run: gone
    assert (tmp_path / "checkpoints").is_dir()  # it holds the user's file
    assert not (tmp_path / MANIFEST).exists()


def test_a_resumed_run_lists_both_runs_and_discard_takes_back_only_its_own(tmp_path):
    first = OutputFolder(tmp_path / "out")
    first.begin()
    write(tmp_path / "out" / "a.txt")
    first.record()
    second = OutputFolder(tmp_path / "out")  # a resumed run
    second.begin()
    write(tmp_path / "out" / "b.txt")
    second.record()
    assert set(second.written()[0]) == {"a.txt", "b.txt"}
    second.discard()
    assert (tmp_path / "out" / "a.txt").exists() and not (tmp_path / "out" / "b.txt").exists()
    assert OutputFolder(tmp_path / "out").written()[0] == ["a.txt"]


def test_discard_removes_a_folder_the_run_created(tmp_path):
    folder = OutputFolder(tmp_path / "new" / "run")
    folder.begin()
    write(tmp_path / "new" / "run" / "initial_model" / "config.json")
    folder.discard()
    assert not (tmp_path / "new" / "run").exists()


# --------------------------------------------------------------------------------------------------
# train and demo, as a user runs them
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    return synthetic.write_dataset(tmp_path_factory.mktemp("tiny"), n=6, seed=0)


@pytest.mark.slow
def test_train_overwrite_keeps_the_users_files(tmp_path, tiny_set, capsys):
    out = tmp_path / "run"
    argv = ["train", *QUICK, "--data", str(tiny_set), "--out", str(out), "--max-steps", "2", "--save-every", "1",
            "--no-save-model"]
    assert main(argv) == 0
    assert (out / "checkpoints" / "step-00000002").is_dir()
    mine = write(out / "checkpoints" / "mine.pt", "my checkpoint")
    notes = write(out / "analysis" / "notes.md", "my notes")

    assert main(argv) == 2  # refused, and the message says what --overwrite deletes
    err = capsys.readouterr().err
    assert "--overwrite" in err and "your own files stay" in err
    assert main([*argv[:-3], "--max-steps", "1", "--save-every", "1", "--no-save-model", "--overwrite"]) == 0
    assert mine.read_text() == "my checkpoint" and notes.read_text() == "my notes"
    steps = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert steps == ["step-00000001"]  # the earlier run's step-00000002 is gone, not resumed or kept
    assert "checkpoints/mine.pt" not in OutputFolder(out).written()[0]


@pytest.mark.slow
def test_an_error_before_training_leaves_no_folder(tmp_path, tiny_set, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    text_only = tmp_path / "text-lm"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(text_only)
    out = tmp_path / "never"
    status = main(["train", *QUICK, "--data", str(tiny_set), "--out", str(out), "--model", str(text_only),
                   "--max-steps", "1"])
    assert status != 0
    assert "Traceback" not in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_demo_rerun_keeps_the_users_files_and_reuses_its_lm(tmp_path, capsys):
    argv = ["demo", "--out", str(tmp_path), "--max-steps", "3", "--samples", "40", "--batch-size", "4",
            "--num-workers", "0", "--no-progress"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "3 steps on the captions alone" in first  # --max-steps caps the LM's steps too
    assert json.loads((tmp_path / "base" / "summary.json").read_text())["steps"] == 3
    analysis = write(tmp_path / "regap_0" / "my_analysis.txt", "mine")
    plot_notes = write(tmp_path / "base" / "my_plot_notes.txt", "mine")
    before = json.loads((tmp_path / "summary.json").read_text())

    assert main(argv) == 0
    assert "reused" in capsys.readouterr().out
    assert analysis.read_text() == "mine" and plot_notes.read_text() == "mine"
    after = json.loads((tmp_path / "summary.json").read_text())
    assert [r["final_gap"] for r in after["runs"]] == [r["final_gap"] for r in before["runs"]]  # deterministic
