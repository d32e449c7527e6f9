"""What the three evaluation commands share: model options, model loading, the names of common flags.

A bad input raises (``ValueError``, ``OSError``); ``regap_fast.cli`` prints it as one line, exit status 2."""

from __future__ import annotations

import argparse
import sys

from ..flags import add_aliases, add_progress_argument

__all__ = ["PRECISIONS", "add_image_folder_argument", "add_model_arguments", "add_progress_argument",
           "device_and_dtype", "load_vlm", "show_progress"]

# --precision takes the training command's names; --dtype's torch names still parse (an older spelling)
PRECISIONS = {"auto": "auto", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16",
              "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _precision(value: str) -> str:
    if value not in PRECISIONS:
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from auto, bf16, fp16, fp32)")
    return PRECISIONS[value]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL (what ``load_model`` reads) and the options of loading it."""
    parser.add_argument("model", metavar="MODEL", help="a model: a regap-fast run folder (its model/), a model "
                                                       "folder, or a transformers vision-language model folder with "
                                                       "its processor (any family of docs/integrations.md)")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    add_aliases(parser.add_argument("--precision", "--dtype", type=_precision, default="auto",
                                    metavar="{auto,bf16,fp16,fp32}",
                                    help="weights and compute; default: bf16 on CUDA, fp32 on the CPU"), "--dtype")


def add_image_folder_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--image-folder``, the name ``train`` uses (``--images DIR`` and ``--image_folder`` still parse)."""
    add_aliases(parser.add_argument("--image-folder", "--image_folder", "--images", dest="image_folder",
                                    metavar="DIR", help=help_text), "--image_folder", "--images")


def show_progress(args: argparse.Namespace) -> bool:
    """Bars only on a terminal: a piped log gets none (as ``train``)."""
    return bool(getattr(args, "progress", True)) and sys.stderr.isatty()


def device_and_dtype(args: argparse.Namespace):
    """(device, dtype or None for the default) from the model options."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    precision = getattr(args, "precision", None) or PRECISIONS.get(getattr(args, "dtype", "auto"), "auto")
    return device, None if precision == "auto" else getattr(torch, TORCH_DTYPES[precision])


def load_vlm(args: argparse.Namespace):
    """(vlm, device, dtype) from the MODEL argument and the model options."""
    from regap_fast.model import load_model

    device, dtype = device_and_dtype(args)
    return load_model(args.model, device=device, dtype=dtype), device, dtype

