"""The processes ``regap-fast reproduce`` runs its tasks in: their settings, and a warmed pool."""

from __future__ import annotations

import logging
import sys
import warnings


def quiet(threads: int | None) -> None:
    """Per process: torch threads, and only warnings that matter in the log."""
    import torch

    if threads and not torch.cuda.is_available():
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    for name in ("transformers", "regap_fast.train"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _warm(threads: int | None) -> None:
    """A worker's start, while the LM pretrains instead of before its first task: its imports (transformers
    and scipy import their modules on first use: seconds), settings, and a loading memo (the worker's tasks
    tokenise the same records and requests, and decode the same images, with models loaded afresh)."""
    from ..data import memo

    try:  # a missing package is the first task's error to report, in its own words: not a broken pool's
        import scipy.stats  # noqa: F401
        import transformers

        from ..eval import evaluate  # noqa: F401
        from ..model import load_model  # noqa: F401
        from ..train import train  # noqa: F401
        from . import measure, measure2  # noqa: F401

        for name in ("CLIPVisionModel", "LlamaForCausalLM", "AutoTokenizer", "get_cosine_schedule_with_warmup"):
            getattr(transformers, name)
    except ImportError:
        pass
    quiet(threads)
    memo.memoize()


def _started() -> None:
    """A first job: it makes the pool start its processes now."""


def workers(jobs: int, threads: int | None):
    """A pool of ``jobs`` processes, started and warmed now (None: the tasks run in this process)."""
    if jobs <= 1:
        return None
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_warm, initargs=(threads,))
    for _ in range(jobs):
        pool.submit(_started)
    return pool
