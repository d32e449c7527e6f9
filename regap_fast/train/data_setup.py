"""The data side of a training run: the records split into training and held-out sets, the datasets,
the loader that gives every process its share of each step's global batch, and what a micro-batch counts."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..data import IGNORE_INDEX, LlavaDataset, StepSampler, load_records, synthetic
from ..data.llava import BadRecord, TooManyBadRecords
from ..model import VisionLanguageModel
from .config import TrainConfig
from .dist import Dist
from .errors import RunError
from .preflight import DataSource

log = logging.getLogger("regap_fast.train")


def held_out_count(n_records: int, eval_samples: int) -> int:
    """Records held out to measure on: ``--eval-samples``, at most a tenth of the set, but at least one
    whenever any is asked for (a tenth of a tiny set rounds to none)."""
    if eval_samples <= 0 or n_records < 2:
        return 0
    return max(1, min(eval_samples, n_records // 10))


def split_records(records: list[dict], cfg: TrainConfig) -> tuple[list[dict], list[dict]]:
    """(training records, held-out records): a seeded draw, the same on every rank and on resume."""
    n_eval = held_out_count(len(records), cfg.eval_samples)
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def prompt_format(cfg: TrainConfig) -> str:
    return cfg.prompt_format if cfg.prompt_format != "auto" else ("plain" if cfg.stage == 1 else "chat")


def synthetic_source(cfg: TrainConfig, out: Path, d: Dist) -> DataSource:
    """The embedded shapes set, written under OUT/data (by rank 0; the others wait, then read it)."""
    if d.main:
        synthetic.write_dataset(out / "data", cfg.synthetic_samples, seed=cfg.seed)
    d.barrier()
    path = synthetic.write_dataset(out / "data", cfg.synthetic_samples, seed=cfg.seed)
    records, problems = load_records(path)
    return DataSource(records, len(problems), out / "data")


def load_data(cfg: TrainConfig, vlm: VisionLanguageModel, source: DataSource):
    """(train dataset, held-out dataset, held-out records dropped as unreadable). A bad held-out record
    is dropped once here, so that measuring never meets it (the training set replaces bad records as
    it draws them)."""
    encoder = vlm.encoder(prompt_format(cfg), cfg.max_length)

    def dataset(recs, cache=False):
        return LlavaDataset(recs, source.image_folder, vlm.image_transform, encoder, cache=cache)
    train_records, eval_records = split_records(source.records, cfg)
    probe = dataset(eval_records)
    good = []
    for rec in eval_records:
        try:
            probe.load(rec)
            good.append(rec)
        except BadRecord as exc:
            log.warning("held-out record %s dropped: %s", rec["id"], exc)
    return dataset(train_records, cfg.cache_samples), dataset(good, cfg.cache_samples), len(eval_records) - len(good)


def first_example(dataset) -> dict:
    """The first example that loads (what the attention probe runs on when nothing is held out)."""
    try:
        return dataset[0]
    except TooManyBadRecords as exc:  # every record bad
        raise RunError(str(exc).splitlines()[0]) from None


def make_loader(train_set, collate, cfg: TrainConfig, d: Dist, accum: int, start: int, total: int) -> DataLoader:
    """Micro-batches of this process's share of the steps after ``start``, ``accum`` per step."""
    sampler = StepSampler(len(train_set), cfg.global_batch_size, cfg.micro_batch_size, rank=d.rank,
                          world_size=d.world, seed=cfg.seed, start_step=start, total_steps=total)
    workers = cfg.num_workers
    return DataLoader(train_set, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                      pin_memory=d.device.type == "cuda", persistent_workers=False,
                      prefetch_factor=2 * accum if workers else None)


def batch_counts(batch: dict) -> torch.Tensor:
    """[label tokens, samples with image and caption, input tokens, skipped records] of a micro-batch."""
    return torch.tensor([
        (batch["labels"][:, 1:] != IGNORE_INDEX).sum().item(),
        (batch["image_mask"].any(1) & batch["caption_mask"].any(1)).sum().item(),
        batch["attention_mask"].sum().item(),
        len(batch["skipped"])], dtype=torch.float64)
