"""The ``regap-fast`` command (also ``python -m regap_fast``).

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
only the chosen one is imported (this module imports nothing heavy), so help and argument errors come
back at once.

Errors: a bad input (``ValueError``, ``OSError``) prints ``regap-fast COMMAND: error: ...`` and exits
2, as argparse does; a run that cannot go on (an exception with ``exit_status``, e.g.
``regap_fast.train.errors.RunError``) exits with that status, 1; anything else is a bug and keeps its
traceback. ``--debug`` shows the traceback of every error. Ctrl-C exits 130 with what the command
says about it (``train``: the last complete checkpoint and the command that resumes).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from .flags import HelpFormatter

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("regap_fast.train.demo", "stage-1 training with and without REGAP on the embedded tiny default"),
    "train": ("regap_fast.train.cli", "train a LLaVA-style model (stage 1 or 2) with REGAP"),
    "gap": ("regap_fast.eval.gap", "measure the modality gap of a model over image-caption pairs"),
    "safety-eval": ("regap_fast.eval.safety", "unsafe-response rate under image conditions"),
    "compare": ("regap_fast.eval.compare", "gap and unsafe rate across runs, and their correlation"),
    "reproduce": ("regap_fast.reproduce.cli", "the paper's safety claim in miniature, end to end on the CPU"),
    "info": ("regap_fast.cli", "versions, and which backends (torch, triton, cuda) and kernels can run here"),
}

INTERRUPTED = 130  # the shell's status for a process ended by SIGINT


# --------------------------------------------------------------------------------------------------
# `regap-fast info`
# --------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:  # for `info`
    pass


def run(args: argparse.Namespace) -> int:  # `info`
    import torch

    import regap_fast
    from regap_fast import backends

    print(f"regap_fast {regap_fast.__version__}, torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        print(f"GPU: {torch.cuda.get_device_name()} (sm_{major}{minor})")
    else:
        print("GPU: none (the kernel backends need CUDA tensors; the torch backend runs everywhere)")
    print(extension_line(backends.extension_info()))
    for line in backend_lines(backends.available()):
        print(line)
    return 0


def extension_line(info: dict) -> str:
    """``backends.extension_info()`` in one line: whether ``regap_fast._C`` is built, for which GPU
    architectures, and whether the GPU here can run it."""
    if not info["built"]:
        return f"CUDA extension regap_fast._C: not built ({info['reason']})"
    line = f"CUDA extension regap_fast._C: built for {', '.join(info['archs']) or 'unrecorded architectures'}"
    if info["gpu"] is not None:
        line += f"; this GPU ({info['gpu']}): {'yes' if info['gpu_supported'] else 'no'}"
    return line


def backend_lines(available: dict[str, str]) -> list[str]:
    """``backend/family: yes`` or ``no (why)``, one line each, aligned (a status is '' or 'yes' when it can run)."""
    width = max(map(len, available), default=0)
    return [f"  {name:<{width}}  {'yes' if status in ('', 'yes') else 'no (' + status + ')'}"
            for name, status in available.items()]


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------


def _chosen(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("regap_fast")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser(chosen: str | None):
    """(top-level parser, {command: its parser}, {command: its module (the chosen one only)})."""
    parser = argparse.ArgumentParser(
        prog="regap-fast", formatter_class=HelpFormatter,
        description="REGAP: reduce the pretraining modality gap of vision-language models (arXiv 2505.24208).")
    parser.add_argument("--version", action="version", version=f"regap-fast {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules, parsers = {}, {}
    for name, (module, help_text) in COMMANDS.items():
        parsers[name] = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if name == chosen:
            modules[name] = importlib.import_module(module)
            modules[name].add_arguments(parsers[name])
            parsers[name].add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                       help="show the traceback of an error")
    return parser, parsers, modules


def _one_line_warnings(command: str) -> None:
    """Python warnings as ``regap-fast COMMAND: warning: ...``, without the source line."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"regap-fast {command}: warning: {message}", file=sys.stderr if file is None else file)
    warnings.showwarning = show


# optional packages and the extra that installs them (pyproject.toml): the core ops need neither
EXTRAS = {"transformers": "train", "tokenizers": "train", "safetensors": "train", "PIL": "train", "tqdm": "train",
          "matplotlib": "train", "peft": "train", "tensorboard": "train", "scipy": "eval", "trl": "hf",
          "datasets": "hf"}


def missing_extra(exc: ImportError) -> str | None:
    """The one-line message for an optional package that is not installed, else None."""
    name = (getattr(exc, "name", None) or "").split(".")[0]
    if name not in EXTRAS:
        return None
    return (f"this command needs {name}, which regap_fast installs as an extra: "
            f"pip install -e \".[{EXTRAS[name]}]\" --no-build-isolation (or \".[all]\")")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _main(argv)
    except ModuleNotFoundError as exc:
        message = missing_extra(exc)
        if message is None or "--debug" in argv:
            raise
        print(f"regap-fast {_chosen(argv) or ''}: error: {message}".replace("  ", " "), file=sys.stderr)
        return 2


def _main(argv: list[str]) -> int:
    parser, parsers, modules = build_parser(_chosen(argv))
    args, unknown = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if unknown:  # reported by the subcommand's parser, with its usage, not the top-level one
        parsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    args.argv = argv  # what `train` prints to resume after Ctrl-C
    module = modules[args.command]
    shown = warnings.showwarning
    _one_line_warnings(args.command)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        explain = getattr(module, "interrupted", None)
        print(f"\nregap-fast {args.command}: interrupted" + (f"; {explain(args)}" if explain else ""),
              file=sys.stderr)
        return INTERRUPTED
    except Exception as exc:
        status = getattr(exc, "exit_status", 2 if isinstance(exc, (ValueError, OSError)) else None)
        if status is None or args.debug:
            raise
        print(f"regap-fast {args.command}: error: {exc}", file=sys.stderr)
        return status
    finally:
        warnings.showwarning = shown  # main() may run in-process (tests, notebooks)


if __name__ == "__main__":
    sys.exit(main())
