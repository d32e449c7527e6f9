"""What the three evaluation commands share: model options, model loading, user-error reporting."""

from __future__ import annotations

import argparse
import sys


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL (what ``load_model`` reads) and the options of loading it."""
    parser.add_argument("model", metavar="MODEL", help="a model: a regap-fast run folder (its model/), a model "
                                                       "folder, or a transformers LlavaForConditionalGeneration "
                                                       "folder")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="default: bfloat16 on CUDA, float32 on the CPU")


def load_vlm(args: argparse.Namespace):
    """(vlm, device, dtype) from the MODEL argument and the model options."""
    import torch

    from regap_fast.model import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    return load_model(args.model, device=device, dtype=dtype), device, dtype


def fail(command: str, error: Exception) -> int:
    """A bad input (a missing file, a wrong column): one clear line, no traceback, exit status 2."""
    print(f"regap-fast {command}: error: {error}", file=sys.stderr)
    return 2
