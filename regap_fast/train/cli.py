"""``regap-fast train``: LLaVA-style or MiniGPT-4-style stage 1 or 2 with REGAP, on one process or under torchrun.

Examples:

    regap-fast train --out runs/tiny --max-steps 200                   # tiny default, synthetic data
    regap-fast train --arch minigpt4 --out runs/tiny-m4 --max-steps 200  # tiny BLIP-2 ViT + Q-Former + linear
    torchrun --nproc_per_node 8 -m regap_fast train --recipe sharegpt4v \\
        --vision-tower clip-vit-large-patch14-336 --language-model vicuna-7b-v1.5 \\
        --data share-captioner_coco_lcs_sam_1246k_1107.json --image-folder data --out runs/sg4v --fsdp
    torchrun --nproc_per_node 4 -m regap_fast train --recipe minigpt4 \\
        --vision-tower blip2-flan-t5-xxl --language-model vicuna-7b --data pairs.json --out runs/m4
    torchrun --nproc_per_node 8 -m regap_fast train \\
        --vision-tower clip-vit-large-patch14-336 --language-model vicuna-7b-v1.5 \\
        --data blip_laion_cc_sbu_558k.json --image-folder images --out runs/stage1 --regap-weight 0.1
    regap-fast train --stage 2 --lora --model runs/stage1/model --data llava_v1_5_mix665k.json ...
    regap-fast train --out runs/stage1 --resume auto ...                # after an interruption
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from .config import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = __doc__.split("\n", 2)[2]
    add_config_arguments(parser, defaults={"out": None})
    out = next(a for a in parser._actions if a.dest == "out")
    out.help += " (required)"


def setup_logging() -> None:
    """Time and message; the rank only when there are several processes (the others log warnings only)."""
    rank = os.environ.get("RANK", "0")
    prefix = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s {prefix}%(message)s", datefmt="%H:%M:%S")


def check_output_folder(out: Path, overwrite: bool, resume) -> None:
    """A folder with other files in it is not silently written over (a demo's, a previous run's)."""
    if out.is_dir() and not overwrite and not resume:
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
            raise FileExistsError(f"--out {out} is not empty ({shown}): pass --resume auto to continue the run in "
                                  "it, --overwrite to start a new one there (it deletes only what earlier runs of "
                                  "regap-fast wrote; your own files stay), or choose another folder")


def run(args: argparse.Namespace) -> int:
    from .preflight import preflight

    cfg = config_from_args(args)
    if args.out is None:
        raise ValueError("--out DIR is required: the folder for checkpoints, metrics and the trained model")
    check_output_folder(Path(cfg.out), cfg.overwrite, cfg.resume)
    setup_logging()
    plan = preflight(cfg)  # every mistake that can be found is found here, before the loop (and torch) loads
    from .loop import train
    from .report import format_summary

    summary = train(plan.cfg, plan=plan)
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_summary(summary))
    return 0


def interrupted(args: argparse.Namespace) -> str:
    """After Ctrl-C: the last complete checkpoint, and the exact command that goes on from it."""
    from .layout import latest_checkpoint

    last = latest_checkpoint(args.out) if args.out else None
    if last is None:
        return "no checkpoint was written yet (rerun the command to start again)"
    argv = list(getattr(args, "argv", None) or ["train", "--out", str(args.out)])
    return (f"the last complete checkpoint is {last}\nresume with: regap-fast "
            f"{shlex.join(without_resume(argv) + ['--resume', 'auto'])}")


def without_resume(argv: list[str]) -> list[str]:
    """``argv`` without its --resume/--overwrite (a resumed run takes neither twice)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in ("--resume", "--resume_from_checkpoint"):
            skip = "=" not in a
            continue
        if name in ("--overwrite", "--no-overwrite"):
            continue
        out.append(a)
    return out
