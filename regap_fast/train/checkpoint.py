"""Checkpoints that survive a kill at any moment, and resume to the same result.

    OUT/checkpoints/step-00000500/trainable.safetensors   the trained weights (frozen ones come from the source)
                                  train_state.pt           optimizer, scheduler, step, RNG of every rank, Counters
                                  config.json              the run's settings (a resumed run keeps its schedule)

A checkpoint is written into a hidden temporary folder, flushed to disk, then renamed: a folder named
``step-*`` is always complete, and the newest one is the one to resume from. Older ones are deleted
only after a newer one is in place.

The state dicts go through ``torch.distributed.checkpoint.state_dict``, which gives the same
full, unsharded names for a plain module, DDP and FSDP: a checkpoint written by 8 processes resumes
on 1, and the other way round.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ..model.checkpoints import write_safetensors
from .layout import CONFIG, STATE, STEP_DIR, WEIGHTS

log = logging.getLogger(__name__)


@dataclass
class Counters:
    """What the loop counts, kept in each checkpoint so that a resumed run goes on counting."""
    skipped: int = 0  # bad records skipped when drawn
    train_seconds: float = 0.0
    initial_eval: Optional[dict] = None  # the held-out eval_lm_loss and eval_gap before the first step
    regap_scale: Optional[dict] = None  # --regap-scale text-norm: the alpha estimate (TextNormScale.state_dict)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rng_state() -> dict:
    """This process's random state (tensors and lists only, so the file loads with weights_only)."""
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(out_dir: str | Path, step: int, model: torch.nn.Module, optimizer, scheduler,
                    counters: Counters, *, config: dict, keep: int = 2) -> Optional[Path]:
    """Collective under torch.distributed (every rank calls it); rank 0 writes. Returns the folder (None on
    the other ranks). ``config``: the run's settings, which a resumed run keeps."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    weights = get_model_state_dict(model, options=opts)
    optim = get_optimizer_state_dict(model, optimizer, options=opts)
    rngs = [rng_state()]
    if _distributed():
        rngs = [None] * dist.get_world_size()
        dist.all_gather_object(rngs, rng_state())
    final = None
    if not _distributed() or dist.get_rank() == 0:
        folder = Path(out_dir) / "checkpoints"
        final = folder / f"step-{step:08d}"
        tmp = folder / f".tmp-step-{step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_safetensors({k: v.contiguous() for k, v in weights.items()}, tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, default=str))
        torch.save({"step": step, "optimizer": optim, "scheduler": scheduler.state_dict(), "rng": rngs,
                    "counters": dataclasses.asdict(counters)}, tmp / STATE)
        _fsync_tree(tmp)
        if final.exists():  # the same step written again (e.g. a resumed run's last step): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        old = sorted(p for p in folder.iterdir() if STEP_DIR.match(p.name))
        for p in old[:-keep] if keep > 0 else []:
            shutil.rmtree(p, ignore_errors=True)
        log.info("checkpoint %s", final)
    if _distributed():
        dist.barrier()
    return final


def remove_step_folders(out_dir: str | Path) -> list[Path]:
    """Delete OUT/checkpoints/step-NNNNNNNN (and unfinished .tmp-step-*) folders: the checkpoints' own names,
    which a fresh start must not resume or keep beside its own. Anything else in checkpoints/ stays."""
    folder = Path(out_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.is_dir() and (STEP_DIR.match(p.name) or p.name.startswith(".tmp-step-"))]
    for p in stale:
        shutil.rmtree(p)
    if stale:
        log.warning("removed %d checkpoint folder(s) of an earlier run in %s", len(stale), folder)
    return stale


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer, scheduler) -> tuple[int, Counters]:
    """Restore weights, optimizer, scheduler and this rank's RNG; returns (step, counters)."""
    path = Path(path)
    if not (path / WEIGHTS).is_file() or not (path / STATE).is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint folder (needs {WEIGHTS} and {STATE})")
    weights = load_file(str(path / WEIGHTS))
    opts = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)
    expected = set(get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True)))
    if set(weights) != expected:
        raise ValueError(f"{path} was written for other trainable weights: missing "
                         f"{sorted(expected - set(weights))[:5]}, unexpected {sorted(set(weights) - expected)[:5]} "
                         "(same --stage and --lora as the run being resumed?)")
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=opts)
    scheduler.load_state_dict(state["scheduler"])
    rank = dist.get_rank() if _distributed() else 0
    rngs = state["rng"]
    if len(rngs) != (dist.get_world_size() if _distributed() else 1):
        log.warning("resuming on a different number of processes than %d: random streams will differ", len(rngs))
    set_rng_state(rngs[rank % len(rngs)])
    return int(state["step"]), Counters(**state["counters"])
