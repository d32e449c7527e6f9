"""What a training run checks before any work and any write: a mistake costs one line, not a built model.

``preflight`` reads only small things (the data file, folder listings, the checkpoint's config) and
raises the built-in exception a caller expects (``ValueError``, ``FileNotFoundError``,
``FileExistsError``, ``NotADirectoryError``); ``regap-fast train`` prints it as one line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .config import TrainConfig
from .layout import CONFIG, STATE, WEIGHTS, latest_checkpoint

log = logging.getLogger("regap_fast.train")

# Settings that make the run what it is: a resumed run takes them from its checkpoint (its optimizer,
# schedule and data order were made with them), whatever the command line says. The others (workers,
# micro-batch, cadence of evaluation and checkpoints, output switches, paths) may change on resume.
TRAJECTORY_FIELDS = ("arch", "stage", "recipe", "train_vision", "train_lm", "lora", "lora_rank", "lora_alpha",
                     "lora_dropout", "regap_weight", "regap_squared", "regap_layer", "regap_scale",
                     "regap_scale_steps", "max_steps", "epochs", "global_batch_size",
                     "lr", "mm_projector_lr", "weight_decay", "warmup_ratio", "min_lr_ratio", "grad_clip", "seed",
                     "eval_samples", "synthetic_samples", "max_length", "prompt_format", "vision_feature_layer")

IMAGES_CHECKED = 200  # records whose image paths are looked at before the run: enough to catch a wrong folder


@dataclass
class DataSource:
    """The records to train on, read and checked before the run (``None`` records: the embedded set)."""
    records: Optional[list]
    malformed: int
    image_folder: Optional[Path]


@dataclass
class Plan:
    """A checked run: its config (with the checkpoint's schedule when resuming), where it resumes from,
    and its data (None: the embedded synthetic set, written by the run)."""
    cfg: TrainConfig
    checkpoint: Optional[Path]
    data: Optional[DataSource]


def preflight(cfg: TrainConfig, world_size: Optional[int] = None) -> Plan:
    cfg.check()
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder")
    check_batch(cfg, world)
    check_model_paths(cfg)
    checkpoint = find_checkpoint(cfg, out)
    if checkpoint is not None:
        cfg = adopt_checkpoint_settings(cfg, checkpoint)
    return Plan(cfg, checkpoint, check_data(cfg))


def check_batch(cfg: TrainConfig, world: int) -> None:
    G, mb = cfg.global_batch_size, cfg.micro_batch_size
    if G % (mb * world):
        processes = f" x {world} processes (= {mb * world})" if world > 1 else ""
        raise ValueError(f"--global-batch-size {G} must be a multiple of --micro-batch-size {mb}{processes}; "
                         "the rest of the global batch is gradient accumulation")


def check_model_paths(cfg: TrainConfig) -> None:
    for flag, value in (("--model", cfg.model), ("--vision-tower", cfg.vision_tower),
                        ("--language-model", cfg.language_model)):
        if value is not None and not Path(value).is_dir():
            raise FileNotFoundError(f"{flag} {value}: no such folder")
    if cfg.projector_weights is not None and not Path(cfg.projector_weights).is_file():
        raise FileNotFoundError(f"--projector-weights {cfg.projector_weights}: no such file")


def find_checkpoint(cfg: TrainConfig, out: Path) -> Optional[Path]:
    """The checkpoint to resume from (None: a fresh start), or why this folder cannot be used."""
    if cfg.resume is None:
        if latest_checkpoint(out) is not None and not cfg.overwrite:
            raise FileExistsError(f"{out} already holds checkpoints: pass --resume auto to continue that run, "
                                  "--overwrite to start over in it, or choose another --out")
        return None
    if cfg.resume == "auto":
        found = latest_checkpoint(out)
        if found is None:
            log.info("--resume auto: no checkpoint in %s yet, starting from step 0", out)
        return found
    path = Path(cfg.resume)
    if not all((path / name).is_file() for name in (WEIGHTS, STATE, CONFIG)):
        raise FileNotFoundError(f"--resume {cfg.resume}: not a checkpoint folder (one holds {WEIGHTS}, {STATE} "
                                f"and {CONFIG}; they are under OUT/checkpoints/step-*)")
    return path


def adopt_checkpoint_settings(cfg: TrainConfig, checkpoint: Path) -> TrainConfig:
    """The config with the checkpoint's trajectory settings, and a warning for each flag that differed."""
    saved = json.loads((checkpoint / CONFIG).read_text())
    changed = {}
    for name in TRAJECTORY_FIELDS:
        if name in saved and saved[name] != getattr(cfg, name):
            changed[name] = saved[name]
            log.warning("--%s %s differs from the checkpoint's %s: the checkpoint's is used (a resumed run keeps "
                        "its schedule and data order; start a new --out to change it)", name.replace("_", "-"),
                        getattr(cfg, name), saved[name])
    if not changed:
        return cfg
    overrides = tuple(sorted(set(cfg.recipe_overrides) | set(changed)))
    return dataclasses.replace(cfg, **changed, recipe_overrides=overrides)


def check_data(cfg: TrainConfig) -> Optional[DataSource]:
    """Read the data file and look for its images; None for the embedded set."""
    if cfg.data is None:
        return None
    from ..data import load_records

    records, problems = load_records(cfg.data)
    if cfg.eval_samples > 0 and len(records) < 2:
        raise ValueError(f"--data {cfg.data} holds {len(records)} usable record; training needs at least 2 "
                         "(one is held out to measure the loss and gap on), or --eval-samples 0")
    folder = Path(cfg.image_folder) if cfg.image_folder else Path(cfg.data).parent
    if cfg.image_folder and not folder.is_dir():
        raise FileNotFoundError(f"--image-folder {cfg.image_folder}: no such folder")
    check_images_exist(records, folder)
    return DataSource(records, len(problems), folder)


def check_images_exist(records: list, folder: Path) -> None:
    """A wrong image folder shows at once: none of the first records' images is there."""
    with_image = [r for r in records[:IMAGES_CHECKED] if r.get("image")]
    if with_image and not any((folder / r["image"]).is_file() for r in with_image):
        raise FileNotFoundError(f"none of the first {len(with_image)} records' images is under {folder} (e.g. "
                                f"{folder / with_image[0]['image']}): is --image-folder right?")
