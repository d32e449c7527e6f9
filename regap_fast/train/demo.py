"""``regap-fast demo``: REGAP on the embedded default, no weights and no network needed.

1. Render the synthetic shapes set (LLaVA format) and train the tiny LM on its captions alone, the
   stand-in for a pretrained LLM (a random LM could not be kept frozen in stage 1). ``--arch`` picks the
   model: ``llava`` (tiny CLIP + MLP projector) or ``minigpt4`` (tiny BLIP-2 ViT + Q-Former + linear layer,
   the image tokens wrapped ``<Img>`` ... ``</Img>``).
2. Stage 1 twice from that model and the same seed: lambda = 0, and lambda = --regap-weight.
3. Print the table, write DIR/summary.json, DIR/demo.png and each run's metrics.

The gap and the caption loss in the table are measured on held-out records.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from ..flags import add_aliases, add_progress_argument
from .output_folder import OutputFolder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_aliases(parser.add_argument("--out", "--output_dir", default="runs/demo", metavar="DIR",
                                    help="output folder (a previous demo's is reused; another non-empty folder "
                                         "needs --overwrite)"), "--output_dir")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out that is not a demo's")
    parser.add_argument("--arch", default="llava", choices=["llava", "minigpt4"],
                        help="llava: tiny CLIP + 2-layer MLP projector; minigpt4: tiny BLIP-2 ViT + Q-Former (32 "
                             "query tokens) + one linear layer")
    parser.add_argument("--regap-weight", type=float, default=0.1, metavar="LAMBDA", help="lambda of the REGAP run")
    add_aliases(parser.add_argument("--max-steps", "--steps", type=int, default=300, dest="steps", metavar="N",
                                    help="stage-1 steps per run"), "--steps")
    add_aliases(parser.add_argument("--global-batch-size", "--batch-size", type=int, default=32, dest="batch_size",
                                    metavar="N", help="stage-1 samples per optimizer step"), "--batch-size")
    parser.add_argument("--lm-steps", type=int, default=None, metavar="N",
                        help="steps of caption-only LM training that make the 'pretrained' LM (default: 400, or "
                             "--max-steps when that is smaller; a rerun with the same data, arch and LM steps "
                             "reuses the LM it trained)")
    add_aliases(parser.add_argument("--synthetic-samples", "--samples", type=int, default=3000, dest="samples",
                                    metavar="N", help="synthetic image-caption pairs"), "--samples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the model inits and the data order")
    parser.add_argument("--num-workers", type=int, default=1, metavar="N", help="DataLoader worker processes per run")
    add_progress_argument(parser)


def is_demo_folder(out: Path) -> bool:
    """A previous demo's output: its summary.json has the demo's keys."""
    try:
        return "caption_only_lm_loss" in json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return False


DEFAULT_LM_STEPS = 400


def check_arguments(args: argparse.Namespace) -> None:
    if args.lm_steps is None:  # a short demo (a smoke test) does not wait for the full base LM
        args.lm_steps = min(DEFAULT_LM_STEPS, args.steps)
    for name in ("steps", "batch_size", "lm_steps", "samples"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not is_demo_folder(out) and not args.overwrite:
        raise FileExistsError(f"--out {out} is not empty and holds no previous demo: pass --overwrite to write "
                              "into it, or choose another folder")


def caption_only_records(data_json: Path) -> Path:
    """The captions without their images: what the LM is 'pretrained' on."""
    records = json.loads(data_json.read_text())
    text = [{"id": r["id"], "conversations": [{"from": "human", "value": "Describe."}, r["conversations"][1]]}
            for r in records]
    path = data_json.with_name("captions_only.json")
    path.write_text(json.dumps(text))
    return path


def base_key(args: argparse.Namespace) -> dict:
    """What the data and the caption-only LM depend on: a rerun with the same key reuses them."""
    return {"arch": args.arch, "lm_steps": args.lm_steps, "samples": args.samples, "seed": args.seed}


def reusable_base(out: Path, key: dict) -> bool:
    try:
        return (json.loads((out / "base" / "demo_key.json").read_text()) == key
                and (out / "base" / "model").is_dir() and (out / "base" / "summary.json").is_file())
    except (OSError, ValueError):
        return False


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    check_arguments(args)
    t_start = time.perf_counter()
    out = Path(args.out)
    folder = OutputFolder(out)
    # a rerun replaces what the last demo wrote (the user's own files stay), keeping the rendered data (it
    # checks its own stamp) and the caption-only LM when it was trained for the same settings
    key = base_key(args)
    reuse = reusable_base(out, key)
    folder.remove_previous(keep=lambda rel: rel.startswith("data/") or (reuse and rel.startswith("base/")))
    folder.begin()
    try:
        status = _run(args, out, key, reuse)
    finally:
        folder.record()
    print(f"wrote {out / 'summary.json'}, {out / 'demo.png'} and the runs' metrics.jsonl "
          f"({time.perf_counter() - t_start:.0f} s in all)")
    return status


def _run(args: argparse.Namespace, out: Path, key: dict, reuse: bool) -> int:
    from ..data import synthetic
    from .config import TrainConfig
    from .loop import train
    from .metrics import plot_runs

    data = synthetic.write_dataset(out / "data", args.samples, seed=args.seed)
    # overwrite: a run folder of an older demo (no manifest) holds checkpoints the new run replaces
    common = dict(data=str(data), seed=args.seed, num_workers=args.num_workers, progress=args.progress,
                  save_every=0, keep_checkpoints=1, eval_samples=128, plot=False, tensorboard=False, overwrite=True)

    if reuse:
        print(f"[1/3] the 'pretrained' LM ({args.arch}): reused from {out / 'base'} ({args.lm_steps} steps, same "
              "data and seed)", flush=True)
        lm = json.loads((out / "base" / "summary.json").read_text())
    else:
        print(f"[1/3] the 'pretrained' LM ({args.arch}): {args.lm_steps} steps on the captions alone", flush=True)
        lm = train(TrainConfig(**{**common, "data": str(caption_only_records(data))}, out=str(out / "base"),
                               stage=2, arch=args.arch, prompt_format="plain", max_steps=args.lm_steps,
                               global_batch_size=64, micro_batch_size=64, lr=3e-3, regap_weight=0.0, eval_every=0))
        (out / "base" / "demo_key.json").write_text(json.dumps(key))
    runs = []
    for i, weight in enumerate((0.0, args.regap_weight)):
        print(f"[{i + 2}/3] stage 1, lambda = {weight:g}: {args.steps} steps x {args.batch_size} samples", flush=True)
        s = train(TrainConfig(**common, model=str(out / "base" / "model"), out=str(out / f"regap_{weight:g}"),
                              stage=1, max_steps=args.steps, global_batch_size=args.batch_size,
                              micro_batch_size=args.batch_size, regap_weight=weight,
                              eval_every=max(1, args.steps // 10)))
        runs.append({"regap_weight": weight, "initial_gap": s["initial_gap"], "final_gap": s["final_gap"],
                     "initial_lm_loss": s["initial_lm_loss"], "final_lm_loss": s["final_lm_loss"],
                     "steps": s["steps"], "seconds": s["train_seconds"], "steps_per_second": s["steps_per_second"],
                     "attention": s["attention"], "metrics": str(out / f"regap_{weight:g}" / "metrics.jsonl")})

    plot_runs({f"lambda = {r['regap_weight']:g}": r["metrics"] for r in runs}, out / "demo.png",
              title=f"{args.arch} stage 1 on the synthetic shapes: REGAP closes the gap, the caption loss stays")
    # the LM's caption loss with no image at all: what the image tokens are measured against
    reference = lm["final_lm_loss"]
    (out / "summary.json").write_text(json.dumps({"runs": runs, "caption_only_lm_loss": reference, "arch": args.arch},
                                                 indent=2))

    print(f"\nheld-out measurements, {args.arch} ({runs[0]['attention']}):")
    print(f"{'lambda':>8} {'initial gap':>12} {'final gap':>10} {'caption loss':>13} {'steps/s':>8}")
    for r in runs:
        print(f"{r['regap_weight']:>8g} {r['initial_gap']:>12.3f} {r['final_gap']:>10.3f} "
              f"{r['final_lm_loss']:>13.3f} {r['steps_per_second']:>8.1f}")
    base, reg = runs
    print(f"\nREGAP: final gap {reg['final_gap']:.3f} vs {base['final_gap']:.3f} without "
          f"({100 * (1 - reg['final_gap'] / base['final_gap']):.0f}% smaller); caption loss "
          f"{reg['final_lm_loss']:.3f} vs {base['final_lm_loss']:.3f} (the LM alone, no image: {reference:.3f}).")
    return 0
