"""The command line as a user meets it: one-line errors before any write, safe outputs, one vocabulary.

Most cases run ``regap_fast.cli.main`` in-process (quick); a few start ``python -m regap_fast`` to see
what a shell sees (exit status, no traceback, import time).
"""

import json
import os
import shlex
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from regap_fast.cli import main
from regap_fast.data import synthetic
from regap_fast.train import TrainConfig, train
from regap_fast.train.layout import latest_checkpoint
from regap_fast.train.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[2]
QUICK = ["--num-workers", "0", "--no-progress", "--no-plot", "--no-tensorboard", "--global-batch-size", "2",
         "--micro-batch-size", "2"]


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """Four image-caption records (the issue's smallest case) and their images."""
    return synthetic.write_dataset(tmp_path_factory.mktemp("tiny"), n=4, seed=0)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    return synthetic.write_dataset(tmp_path_factory.mktemp("small"), n=40, seed=1)


def error_of(capsys, argv, status=2) -> str:
    """Run the command, expect ``status`` and one ``regap-fast CMD: error:`` line, return that line."""
    assert main(argv) == status, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith(f"regap-fast {argv[0]}: error: "), err
    assert not any("Traceback" in line for line in err), err
    return err[-1]


def shell(*args, timeout=120):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "regap_fast", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


# --------------------------------------------------------------------------------------------------
# mistakes: one line, exit 2, nothing written
# --------------------------------------------------------------------------------------------------


def test_bad_inputs_are_one_line_before_any_write(tmp_path, tiny_set, capsys):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("[{")
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out = tmp_path / "out"
    data = ["--data", str(tiny_set)]
    cases = [
        (["--data", str(bad_json)], "is not valid JSON"),
        (["--data", str(empty)], "holds no usable record"),
        ([*data, "--model", str(tmp_path / "nope")], "--model"),
        ([*data, "--vision-tower", str(tmp_path / "v"), "--language-model", str(tmp_path / "l")], "no such folder"),
        ([*data, "--lr", "-1"], "--lr must be > 0"),
        ([*data, "--eval-samples", "-1"], "--eval-samples must be >= 0"),
        ([*data, "--global-batch-size", "3"], "must be a multiple of --micro-batch-size 2"),
        ([*data, "--resume", str(tmp_path)], "not a checkpoint folder"),
        ([*data, "--image-folder", str(tmp_path)], "is --image-folder right?"),
        ([*data, "--image-folder", str(tmp_path / "missing")], "no such folder"),
    ]
    for flags, message in cases:
        line = error_of(capsys, ["train", *QUICK, "--max-steps", "2", "--out", str(out), *flags])
        assert message in line, (flags, line)
        assert not out.exists(), flags  # checked before anything was written
    assert "is a file" in error_of(capsys, ["train", *QUICK, *data, "--out", str(a_file)])
    assert "--out DIR is required" in error_of(capsys, ["train", *QUICK, *data])


def test_eval_commands_report_a_missing_model_in_one_line(tmp_path, tiny_set, capsys):
    line = error_of(capsys, ["gap", str(tmp_path / "nonexistent"), "--data", str(tiny_set), "--out",
                             str(tmp_path / "g")])
    assert "nonexistent" in line
    assert "--batch-size must be >= 1" in error_of(capsys, ["gap", "m", "--data", str(tiny_set), "--out",
                                                            str(tmp_path / "g"), "--batch-size", "0"])


@pytest.mark.slow
def test_shell_sees_one_line_and_status_2(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = shell("train", "--data", str(bad), "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "regap-fast train: error:" in r.stderr
    debug = shell("train", "--data", str(bad), "--out", str(tmp_path / "o"), "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr  # --debug keeps the traceback


@pytest.mark.slow
def test_version_and_help_defaults():
    import regap_fast

    r = shell("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"regap-fast {regap_fast.__version__}"
    demo = shell("demo", "--help")
    assert demo.returncode == 0
    text = " ".join(demo.stdout.split())
    assert "--seed SEED seed of the data" in text and "(default: 0)" in text
    assert "--progress, --no-progress" in text and "(default: 300)" in text
    train_help = " ".join(shell("train", "--help").stdout.split())
    assert "(default: 256)" in train_help and "(also: --output_dir" in train_help
    assert "--output_dir" not in train_help.split("(also:")[0]  # aliases stay out of the flag column


@pytest.mark.slow
def test_help_does_not_import_the_training_code():
    """Only the chosen command's argument module is imported: no training loop, no model code."""
    code = ("import sys, contextlib, io\nfrom regap_fast.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: main(['train', '--help'])\n    except SystemExit: pass\n"
            "heavy = ('regap_fast.train.loop', 'regap_fast.model', 'transformers')\n"
            "print(sorted(m for m in heavy if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


@pytest.mark.slow
def test_help_is_fast():
    """`regap-fast --help` under 1.5 s needs `import regap_fast` to stay light (lazy package __init__)."""
    t = time.perf_counter()
    probe = subprocess.run([sys.executable, "-c", "import regap_fast, sys; print('torch' in sys.modules)"],
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
    if probe.stdout.strip() == "True":
        pytest.skip("regap_fast/__init__.py imports torch eagerly (the lazy __init__ is the lead's change)")
    t = time.perf_counter()
    r = shell("--help")
    assert r.returncode == 0 and time.perf_counter() - t < 1.5


# --------------------------------------------------------------------------------------------------
# the library raises exceptions, never SystemExit
# --------------------------------------------------------------------------------------------------


def test_library_raises_exceptions(tmp_path, tiny_set):
    with pytest.raises(ValueError, match="--lr must be > 0"):
        train(TrainConfig(out=str(tmp_path / "x"), data=str(tiny_set), lr=-1.0))
    with pytest.raises(ValueError, match="multiple of --micro-batch-size"):
        train(TrainConfig(out=str(tmp_path / "x"), data=str(tiny_set), global_batch_size=3, micro_batch_size=2))
    with pytest.raises(FileNotFoundError, match="data file not found"):
        train(TrainConfig(out=str(tmp_path / "x"), data=str(tmp_path / "none.json")))
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------------
# small data sets
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("eval_samples", [0, 1, 128])
def test_four_records_train(tmp_path, tiny_set, capsys, eval_samples):
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--data", str(tiny_set), "--out", str(out), "--max-steps", "3", "--eval-samples",
                 str(eval_samples), "--no-save-model"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3
    held = [r for r in read_jsonl(out / "metrics.jsonl") if "eval_gap" in r]
    if eval_samples == 0:
        assert held == [] and summary["final_gap"] is None
    else:  # a tenth of 4 records rounds to none: one is held out all the same
        assert [r["step"] for r in held] == [0, 3] and summary["final_gap"] > 0
    printed = capsys.readouterr().out
    assert printed.startswith("trained 3 of 3 steps in ") and "{" not in printed  # a summary for a person


def test_a_bad_held_out_record_is_dropped_not_fatal(tmp_path, tiny_set):
    """The held-out set of a tiny set is one record: its bad image must not stop the run."""
    records = json.loads(tiny_set.read_text())
    from regap_fast.train.data_setup import split_records

    cfg = TrainConfig(data=str(tiny_set), eval_samples=1)
    _, (held,) = split_records(records, cfg)
    broken = [dict(r, image="images/missing.png") if r["id"] == held["id"] else r for r in records]
    data = tiny_set.parent / "held_out_broken.json"
    data.write_text(json.dumps(broken))
    s = train(TrainConfig(out=str(tmp_path / "r"), data=str(data), image_folder=str(tiny_set.parent), max_steps=2,
                          global_batch_size=2, micro_batch_size=2, eval_samples=1, num_workers=0, progress=False,
                          plot=False, tensorboard=False, save_model=False))
    assert s["steps"] == 2 and s["unreadable_held_out_records"] == 1 and s["final_gap"] is None


def test_all_bad_training_records_end_in_one_line(tmp_path, tiny_set, capsys):
    records = json.loads(tiny_set.read_text())
    for r in records[1:]:
        r["image"] = "images/missing.png"  # one good image: the folder is right, the set is not
    data = tiny_set.parent / "mostly_broken.json"
    data.write_text(json.dumps(records))
    line = error_of(capsys, ["train", *QUICK, "--data", str(data), "--image-folder", str(tiny_set.parent),
                             "--out", str(tmp_path / "r"), "--max-steps", "4", "--eval-samples", "1"], status=1)
    assert "bad records in a row" in line


# --------------------------------------------------------------------------------------------------
# outputs: refused when not empty, resumable after Ctrl-C, readable files
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_non_empty_out_is_refused_unless_overwrite(tmp_path, tiny_set, capsys):
    out = tmp_path / "demo_like"
    out.mkdir()
    (out / "summary.json").write_text('{"keep": "me"}')
    argv = ["train", *QUICK, "--data", str(tiny_set), "--out", str(out), "--max-steps", "1", "--no-save-model"]
    assert "is not empty (summary.json)" in error_of(capsys, argv)
    assert json.loads((out / "summary.json").read_text()) == {"keep": "me"}
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 1


@pytest.mark.slow
def test_ctrl_c_names_the_checkpoint_and_the_command_that_resumes(tmp_path, small_set, capsys, monkeypatch):
    from regap_fast.train import loop

    out = tmp_path / "run"
    argv = ["train", *QUICK, "--data", str(small_set), "--out", str(out), "--max-steps", "4", "--save-every", "2",
            "--eval-samples", "2", "--no-save-model"]
    real_step = loop.train_step

    def interrupted_at_3(run, step):
        if step == 3:
            raise KeyboardInterrupt
        return real_step(run, step)
    monkeypatch.setattr(loop, "train_step", interrupted_at_3)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"the last complete checkpoint is {out / 'checkpoints' / 'step-00000002'}" in err
    command = err.split("resume with: ")[1].strip().splitlines()[0]
    assert command.startswith("regap-fast train ") and command.endswith("--resume auto")
    monkeypatch.setattr(loop, "train_step", real_step)
    assert main(shlex.split(command)[1:]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "lm_loss" in r] == [1, 2, 3, 4]


@pytest.mark.slow
def test_resume_keeps_the_checkpoints_schedule_and_says_so(tmp_path, small_set, caplog):
    out = tmp_path / "run"
    base = dict(out=str(out), data=str(small_set), global_batch_size=2, micro_batch_size=2, max_steps=4,
                eval_samples=2, num_workers=0, progress=False, plot=False, tensorboard=False, save_model=False,
                lr=1e-3, warmup_ratio=0.0)
    train(TrainConfig(**base, stop_at_step=2, save_every=2))
    with caplog.at_level("WARNING", logger="regap_fast.train"):
        train(TrainConfig(**{**base, "lr": 0.5, "global_batch_size": 4}, resume="auto"))
    assert "--lr 0.5 differs from the checkpoint's 0.001: the checkpoint's is used" in caplog.text
    assert "--global-batch-size 4 differs from the checkpoint's 2" in caplog.text
    lrs = [r["lr"] for r in read_jsonl(out / "metrics.jsonl") if "lr" in r]
    assert max(lrs) <= 1e-3  # cosine from 1e-3, never 0.5


def test_outputs_are_readable_like_any_file(tmp_path, tiny_set):
    out = tmp_path / "run"
    train(TrainConfig(out=str(out), data=str(tiny_set), global_batch_size=2, micro_batch_size=2, max_steps=1,
                      num_workers=0, progress=False, plot=False, tensorboard=False))
    umask = os.umask(0)
    os.umask(umask)
    want = 0o666 & ~umask
    files = [out / "model" / "model.safetensors", latest_checkpoint(out) / "trainable.safetensors",
             out / "initial_model" / "model.safetensors", out / "summary.json"]
    assert {str(f): stat.S_IMODE(f.stat().st_mode) for f in files} == {str(f): want for f in files}


# --------------------------------------------------------------------------------------------------
# flags that did nothing, aliases, log lines
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_regap_squared_trains_on_the_squared_distance(tmp_path, small_set):
    """Step 1 sees the same batch from the same init: the mean of squared gaps is above the squared mean
    gap (Jensen; per-sample gaps differ), and far from the plain mean."""
    gaps = {}
    for squared in (False, True):
        out = tmp_path / f"sq{squared}"
        train(TrainConfig(out=str(out), data=str(small_set), global_batch_size=8, micro_batch_size=8, max_steps=1,
                          eval_samples=2, num_workers=0, progress=False, plot=False, tensorboard=False,
                          save_model=False, regap_squared=squared))
        gaps[squared] = next(r["gap"] for r in read_jsonl(out / "metrics.jsonl") if "gap" in r)
    assert gaps[True] > gaps[False] ** 2 * (1 + 1e-6)
    assert abs(gaps[True] - gaps[False]) > 0.1 * gaps[False]


def test_llava_and_hf_names_are_aliases():
    import argparse

    from regap_fast.train.config import add_config_arguments, config_from_args

    def parse(*argv):
        p = argparse.ArgumentParser()
        add_config_arguments(p)
        return config_from_args(p.parse_args(list(argv)))
    ours = parse("--out", "o", "--data", "d.json", "--image-folder", "i", "--save-every", "7", "--keep-checkpoints",
                 "3", "--lr", "2e-3", "--micro-batch-size", "4", "--global-batch-size", "8", "--max-length", "99",
                 "--mm-projector-lr", "1e-3")
    theirs = parse("--output_dir", "o", "--data_path", "d.json", "--image_folder", "i", "--save_steps", "7",
                   "--save_total_limit", "3", "--learning_rate", "2e-3", "--per_device_train_batch_size", "4",
                   "--global_batch_size", "8", "--model_max_length", "99", "--mm_projector_lr", "1e-3")
    assert theirs.mm_projector_lr == 1e-3
    assert {k: v for k, v in theirs.to_dict().items() if k != "recipe_overrides"} == \
        {k: v for k, v in ours.to_dict().items() if k != "recipe_overrides"}


def test_eval_commands_share_the_training_names(tmp_path):
    import argparse

    from regap_fast.eval import gap, safety

    for module in (gap, safety):
        p = argparse.ArgumentParser()
        module.add_arguments(p)
        extra = ["--prompts", "p.csv"] if module is safety else ["--data", "d.json"]
        new = p.parse_args(["m", *extra, "--out", "o", "--image-folder", "imgs", "--precision", "bf16"])
        old = p.parse_args(["m", *extra, "--out", "o", "--images", "imgs", "--dtype", "bfloat16"])
        assert (new.image_folder, new.precision) == (old.image_folder, old.precision) == ("imgs", "bf16")


def test_single_process_log_lines(tmp_path, tiny_set, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="regap_fast.train"):
        train(TrainConfig(out=str(tmp_path / "r"), data=str(tiny_set), global_batch_size=2, micro_batch_size=2,
                          max_steps=1, num_workers=0, progress=False, plot=False, tensorboard=False,
                          save_model=False))
    text = caplog.text
    assert "(1 process x 1 micro-batch of 2)" in text and "1 record held out" in text
    assert "rank 0" not in text and "processes x" not in text


def test_info_says_yes_or_no_for_every_backend(capsys):
    from regap_fast import backends

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "CUDA extension regap_fast._C: " in out
    for name, status in backends.available().items():
        line = next(x for x in out.splitlines() if x.split() and x.split()[0] == name)
        assert line.split()[1] == ("yes" if status in ("", "yes") else "no"), line


def test_info_extension_line_says_what_backends_found():
    """The line repeats ``extension_info``'s verdict for this GPU; it does not judge architectures itself."""
    from regap_fast.cli import extension_line

    assert extension_line({"built": False, "archs": [], "gpu": None, "gpu_supported": None,
                           "reason": "No module named 'regap_fast._C'"}) == \
        "CUDA extension regap_fast._C: not built (No module named 'regap_fast._C')"
    built = {"built": True, "archs": ["sm_80", "sm_90"], "reason": ""}
    assert extension_line({**built, "gpu": None, "gpu_supported": None}) == \
        "CUDA extension regap_fast._C: built for sm_80, sm_90"
    # sm_86 is in neither list, but sm_80's SASS runs on it: the verdict is backends'
    assert extension_line({**built, "gpu": "sm_86", "gpu_supported": True}).endswith("; this GPU (sm_86): yes")
    assert extension_line({**built, "gpu": "sm_75", "gpu_supported": False}).endswith("; this GPU (sm_75): no")


def test_warnings_are_one_line(tmp_path, capsys):
    """A Python warning reads `regap-fast CMD: warning: ...`, without its source line."""
    root = tmp_path / "mmsb" / "data" / "processed_questions"
    root.mkdir(parents=True)
    (root / "99-Made_Up.json").write_text(json.dumps({"0": {"Question": "q?"}}))
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # shown even if an earlier test met it
        assert main(["safety-eval", str(tmp_path / "no-model"), "--prompts", str(tmp_path / "mmsb"), "--out",
                     str(tmp_path / "o"), "--conditions", "none"]) == 2
    err = capsys.readouterr().err
    assert "regap-fast safety-eval: warning: MM-SafetyBench: scenario names not in the published 13" in err
    assert err.strip().splitlines()[-1].startswith("regap-fast safety-eval: error: ") and "no-model" in err
    assert "warnings.warn(" not in err


def test_mmsafetybench_images_one_level_down(tmp_path):
    """The image archive unpacks into `MM-SafetyBench(imgs)/`: pointed at the folder above it, the images
    are found there; a folder with no scenario in it or below is an error that says where it looked."""
    from regap_fast.eval.prompts import load_prompts

    qdir = tmp_path / "data" / "processed_questions"
    qdir.mkdir(parents=True)
    (qdir / "01-Illegal_Activitiy.json").write_text(json.dumps(
        {"0": {"Question": "q?", "Rephrased Question(SD)": "sd text", "Rephrased Question": "typo text"}}))
    unpacked = tmp_path / "downloads" / "MM-SafetyBench(imgs)" / "01-Illegal_Activitiy" / "SD"
    unpacked.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(unpacked / "0.jpg")
    prompt, = load_prompts(tmp_path, "mmsafetybench", images=tmp_path / "downloads")
    assert prompt.images["SD"].path == unpacked / "0.jpg" and prompt.images["SD"].text == "sd text"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no scenario folder .* in .*empty"):
        load_prompts(tmp_path, "mmsafetybench", images=tmp_path / "empty")


def test_progress_bars_stay_out_of_piped_logs(tmp_path, tiny_set, capsys):
    """`gap` draws no bar when stderr is not a terminal, as `train` (pytest's capture is not one)."""
    from regap_fast.model import ModelConfig, VisionLanguageModel

    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(ModelConfig()).save_pretrained(tmp_path / "m")
    assert main(["gap", str(model), "--data", str(tiny_set), "--out", str(tmp_path / "g"), "--no-per-layer"]) == 0
    err = capsys.readouterr().err
    assert "pair/s" not in err and "it/s" not in err and "%|" not in err


@pytest.mark.slow
def test_a_missing_extra_is_one_line_that_names_it(tmp_path):
    """The core install has no transformers: a training command says which extra to install."""
    code = ("import sys; sys.modules['transformers'] = None; from regap_fast.cli import main; "
            f"sys.exit(main(['demo', '--out', {str(tmp_path / 'demo')!r}]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("regap-fast demo: error:"), out.stderr[-2000:]
    assert "transformers" in lines[0] and '".[train]"' in lines[0]
