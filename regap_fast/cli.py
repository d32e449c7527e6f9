"""The ``regap-fast`` command (also ``python -m regap_fast``).

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
only the chosen one is imported, so ``regap-fast --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("regap_fast.train.demo", "stage-1 training with and without REGAP on the embedded tiny default"),
    "train": ("regap_fast.train.cli", "train a LLaVA-style model (stage 1 or 2) with REGAP"),
    "gap": ("regap_fast.eval.gap", "measure the modality gap of a model over image-caption pairs"),
    "safety-eval": ("regap_fast.eval.safety", "unsafe-response rate under image conditions"),
    "compare": ("regap_fast.eval.compare", "gap and unsafe rate across runs, and their correlation"),
    "reproduce": ("regap_fast.reproduce", "the paper's safety claim in miniature, end to end on the CPU"),
    "info": ("regap_fast.cli", "versions, and which backends (torch, triton, cuda) can run here"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:  # for `info`
    pass


def run(args: argparse.Namespace) -> int:  # `info`
    import torch

    import regap_fast
    from regap_fast import backends

    print(f"regap_fast {regap_fast.__version__}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}")
    for name, status in backends.available().items():
        print(f"backend {name}: {status}")
    return 0


def _chosen(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="regap-fast",
        description="REGAP: reduce the pretraining modality gap of vision-language models (arXiv 2505.24208).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _chosen(argv)
    modules, parsers = {}, {}
    for name, (module, help_text) in COMMANDS.items():
        parsers[name] = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            modules[name] = importlib.import_module(module)
            modules[name].add_arguments(parsers[name])
    args, unknown = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if unknown:  # reported by the subcommand's parser, with its usage, not the top-level one
        parsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
