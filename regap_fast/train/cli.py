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
import sys

from .config import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n", 2)[2]
    add_config_arguments(parser)


def setup_logging() -> None:
    import os

    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S")


def run(args: argparse.Namespace) -> int:
    from .loop import train

    setup_logging()
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"regap-fast train: error: {exc}", file=sys.stderr)
        return 2
    train(cfg)
    return 0
