"""What ``--cache-samples`` saves: the training stages of ``regap-fast reproduce``, with and without it.

    regap-fast reproduce --out /tmp/q --quick            # the data and models to train from
    python benchmarks/cache_samples.py /tmp/q [--repeats 2]

Runs the LM's pretraining, stage 1 and stage 2 of seed 0 (lambda 0) with the reproduction's settings,
cache off and on alternated, and prints each stage's ``train_seconds`` (data loading included) and
how many times each record is drawn: the cache can only save the loads after a record's first.
The runs go to a temporary folder; the reproduction's own folder is only read.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def stages(repro: Path) -> dict:
    """name -> (TrainConfig keywords, the data file): the reproduction's own settings for seed 0, lambda 0."""
    from regap_fast.reproduce import pipeline

    s, data, run = pipeline.Settings(), repro / "data", repro / "runs" / "seed0" / "lambda0"
    return {
        "LM pretraining": (dict(model=str(repro / "runs" / "lm" / "initial"), stage=2, prompt_format="chat",
                                max_steps=s.lm_steps, global_batch_size=s.lm_batch, lr=s.lm_lr),
                           data / "pretrain.json"),
        "stage 1": (dict(model=str(run / "init"), stage=1, prompt_format=s.stage1_format, max_steps=s.stage1_steps,
                         global_batch_size=s.stage1_batch, lr=s.stage1_lr), data / "shapes.json"),
        "stage 2": (dict(model=str(run / "stage1" / "model"), stage=2, image_folder=str(data),
                         max_steps=s.stage2_steps, global_batch_size=s.stage2_batch, lr=s.stage2_lr),
                    data / pipeline.stage2_data_name(s)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("repro", type=Path, help="the --out folder of a finished `regap-fast reproduce` run")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    if not (args.repro / "runs" / "seed0" / "lambda0" / "stage1" / "model").is_dir():
        print(f"cache_samples: error: {args.repro} holds no finished seed-0 run of `regap-fast reproduce`",
              file=sys.stderr)
        return 2

    from regap_fast.train import TrainConfig, train

    seconds: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (kw, data) in stages(args.repro).items():
            records = len(json.loads(data.read_text()))
            draws = kw["max_steps"] * kw["global_batch_size"] / records
            for rep in range(args.repeats):
                for cache in (False, True):
                    r = train(TrainConfig(**kw, data=str(data), out=f"{tmp}/{len(seconds)}-{rep}-{cache}", seed=0,
                                          micro_batch_size=kw["global_batch_size"], regap_weight=0.0,
                                          cache_samples=cache, num_workers=0, progress=False, save_every=0,
                                          eval_samples=64, eval_every=0, plot=False, tensorboard=False))
                    seconds.setdefault(name, {"draws_per_record": round(draws, 2), False: [], True: []})[cache].append(
                        round(r["train_seconds"], 2))
            row = seconds[name]
            print(f"{name}: each record drawn {row['draws_per_record']} times; train_seconds without cache "
                  f"{row[False]}, with {row[True]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
