"""The runs of ``regap-fast reproduce``, each through the library's own parts.

Once: the toy language, its tokenizer, the synthetic images (``prepare_data``), and the text-only
pretraining of the tiny LM (``pretrain_lm``: ``regap_fast.train.train`` at stage 2 on text-only
records, so the projector gets no signal and the LM learns the language, the captions and the
refusal rule). That LM is the "safety-tuned LLM backbone" every run starts from, as one Vicuna is in
the paper; ``--data-seed`` picks another.

Per seed: a fresh vision tower and projector from the seed (``vlm_init``); the lambdas of a seed
start from the same weights and see the same batches, so they differ only by REGAP. Per (seed,
lambda), ``run_one``:

1. stage 1: ``train`` with ``regap_weight = lambda`` on the synthetic image-caption pairs (projector
   only; the fused REGAP ops inside the model's forward);
2. stage 2: ``train`` from the stage-1 model, projector + LM (or LoRA adapters of the LM), on benign
   image-conditioned instructions, with text-only records mixed in as LLaVA-665k mixes in ShareGPT
   (by the settings: a replay of the LM's own text data, or benign requests); REGAP off (the
   paper's regulariser is a pretraining one), and no image-conditioned safety data;
3. measurements: ``regap_fast.eval.measure_gap`` of the stage-1 model (the pretraining gap, written
   as the run's gap.json) and of the final model, and ``regap_fast.eval.evaluate`` (safety-eval's
   generation, image conditions and ``RefusalJudge``) on the held-out harmful requests under text
   only, a blank image, a noise image and a synthetic-set image: of the final model (the run's
   safety.json) and of the stage-1 model (stage1/safety/); and the final model on held-out benign
   requests (benign/: are they still answered?).

Each run folder ends up with the ``gap.json`` and ``safety.json`` that ``regap-fast compare`` reads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("regap_fast.reproduce")

# safety-eval condition names -> the summary's names
CONDITIONS = {"none": "text", "white": "blank", "noise": "noise", "benchmark:image": "image"}
IMAGE_KIND = "image"  # the kind of "benchmark" image the prompts carry: a synthetic-set image


@dataclass
class Settings:
    """Sizes and steps (the defaults: the 2-core CPU budget; raise them on a GPU)."""

    # model: a tiny CLIP (random, frozen) and a tiny Llama
    image_size: int = 32
    patch_size: int = 8
    vision_layers: int = 2
    vision_hidden: int = 64
    lm_layers: int = 2
    lm_hidden: int = 64
    lm_heads: int = 4
    vocab_size: int = 768
    # data
    images: int = 2000  # synthetic image-caption pairs (stage 1; stage 2 asks about the same images)
    instructions: int = 4000  # text-only refusal-rule records for pretraining
    heldout_harmful: int = 256
    heldout_benign: int = 64
    eval_images: int = 128  # synthetic images for the "image" condition and the gap measurement
    # training
    lm_steps: int = 300
    lm_batch: int = 64
    lm_lr: float = 3e-3
    stage1_steps: int = 100
    stage1_batch: int = 32
    stage1_lr: float = 1e-3
    stage1_format: str = "chat"  # the describe prompt in the chat template (what the LM was pretrained on); or plain
    # stage 2: the setting chosen on the baseline arm by selection.choose (docs/reproduce/stage2-selection/)
    stage2_steps: int = 64  # one epoch of the stage-2 records
    stage2_batch: int = 32
    stage2_lr: float = 2e-3
    stage2_request_share: float = 1.0  # of stage 2's image records: benign requests (the rest: image questions)
    stage2_text_share: float = 0.02  # of stage 2's records: text-only ones (LLaVA-665k mixes in ShareGPT)
    stage2_text_data: str = "replay"  # replay: the LM's own text data; benign: benign requests only
    stage2_lora_rank: int = 0  # > 0: LoRA adapters of this rank on the LM (alpha = 2 x rank) instead of all weights
    stage2_projector_lr: float = 0.0  # > 0: the projector's peak lr in stage 2 (stage2_lr: the LM's); 0: stage2_lr
    # evaluation
    max_new_tokens: int = 16
    eval_stage1: bool = True  # also evaluate the stage-1 model (before instruction tuning)
    eval_batch: int = 256  # every held-out request of a condition in one batch
    num_workers: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def model_config(s: Settings):
    from ..model import TINY_CLIP, TINY_LLAMA, ModelConfig

    vision = dict(TINY_CLIP, hidden_size=s.vision_hidden, intermediate_size=2 * s.vision_hidden,
                  num_hidden_layers=s.vision_layers, image_size=s.image_size, patch_size=s.patch_size,
                  projection_dim=s.vision_hidden)
    text = dict(TINY_LLAMA, hidden_size=s.lm_hidden, intermediate_size=int(2.6875 * s.lm_hidden),
                num_hidden_layers=s.lm_layers, num_attention_heads=s.lm_heads, num_key_value_heads=s.lm_heads)
    return ModelConfig(vision_config=vision, text_config=text)


# --------------------------------------------------------------------------------------------------
# data: written once, shared by every run
# --------------------------------------------------------------------------------------------------


@dataclass
class Data:
    root: Path
    tokenizer: Path  # the trained tokenizer's folder (transformers format)
    shapes: Path  # stage 1: image-caption pairs (LLaVA pretraining format)
    pretrain: Path  # text-only: captions and refusal-rule instructions
    stage2: Path  # benign image-conditioned instructions (and text-only records, by the settings)
    eval_pairs: Path  # held-out image-caption pairs (gap, and the images of the "image" condition)
    harmful: list  # regap_fast.eval.Prompt, held out
    benign: list


def _write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records, indent=0))
    return path


def prepare_data(root: Path, s: Settings, seed: int) -> Data:
    """The toy language, its tokenizer and every data file, deterministic from ``seed``."""
    import random

    from ..data import synthetic
    from ..eval import BenchmarkImage, Prompt
    from .language import ToyLanguage

    root.mkdir(parents=True, exist_ok=True)
    lang = ToyLanguage(seed, s.heldout_harmful, s.heldout_benign)
    shapes = synthetic.write_dataset(root, s.images, seed=seed, image_size=s.image_size)
    held = synthetic.write_dataset(root / "heldout", s.eval_images, seed=seed + 10_000, image_size=s.image_size)
    records = json.loads(shapes.read_text())
    held_records = json.loads(held.read_text())
    captions = [r["conversations"][1]["value"] for r in records + held_records]
    tokenizer = lang.tokenizer(captions, s.vocab_size)
    tokenizer.save_pretrained(root / "tokenizer")
    rng = random.Random(seed)
    pretrain = lang.caption_records(records) + lang.instruction_records(s.instructions, seed)
    rng.shuffle(pretrain)

    def prompts(requests, kind):  # each request with a held-out synthetic image for the "image" condition
        return [Prompt(f"{kind}-{i:04d}", r.text, kind, images={IMAGE_KIND: BenchmarkImage(
            held.parent / held_records[i % len(held_records)]["image"], r.text)}) for i, r in enumerate(requests)]

    harmful, benign = prompts(lang.heldout_harmful, "harmful"), prompts(lang.heldout_benign, "benign")
    pretrain_path = _write_json(root / "pretrain.json", pretrain)
    return Data(root=root, tokenizer=root / "tokenizer", shapes=shapes, pretrain=pretrain_path,
                stage2=write_stage2_data(root, s, seed), eval_pairs=held, harmful=harmful, benign=benign)


def stage2_data_name(s: Settings) -> str:
    """The stage-2 data file of these settings (one per mix, so that several can sit side by side)."""
    mix = f"-text{s.stage2_text_share:g}-{s.stage2_text_data}" if s.stage2_text_share > 0 else ""
    return f"stage2-requests{s.stage2_request_share:g}{mix}.json"


def write_stage2_data(root: Path, s: Settings, seed: int) -> Path:
    """Stage 2's records: a benign instruction for each synthetic image, and text-only records making up
    ``stage2_text_share`` of the mix, shuffled. Reads the files ``prepare_data`` wrote under ``root``."""
    import random

    from .language import ToyLanguage

    if not 0.0 <= s.stage2_text_share < 1.0:
        raise ValueError(f"stage2_text_share must be in [0, 1), got {s.stage2_text_share:g}")
    lang = ToyLanguage(seed, s.heldout_harmful, s.heldout_benign)
    images = json.loads((root / "shapes.json").read_text())
    records = lang.image_instruction_records(images, seed + 1, s.stage2_request_share)
    n_text = round(len(records) * s.stage2_text_share / (1.0 - s.stage2_text_share))
    if n_text:
        if s.stage2_text_data == "replay":  # a sample of the pretraining records, as the LM saw them
            records += random.Random(seed + 2).sample(json.loads((root / "pretrain.json").read_text()), n_text)
        else:
            records += lang.benign_text_records(n_text, seed + 2)
        random.Random(seed + 3).shuffle(records)
    return _write_json(root / stage2_data_name(s), records)


# --------------------------------------------------------------------------------------------------
# training, through regap_fast.train
# --------------------------------------------------------------------------------------------------


def _common(s: Settings, seed: int) -> dict:
    return dict(seed=seed, num_workers=s.num_workers, progress=False, save_every=0, keep_checkpoints=1,
                eval_samples=64, eval_every=0, plot=False, tensorboard=False, cache_samples=True)


def initial_model(path: Path, s: Settings, data: Data, seed: int) -> Path:
    """The random tiny CLIP + tiny Llama with the toy language's tokenizer, saved for ``train(model=...)``."""
    import torch
    from transformers import AutoTokenizer

    from ..model import VisionLanguageModel

    torch.manual_seed(seed)
    vlm = VisionLanguageModel.from_config(model_config(s), tokenizer=AutoTokenizer.from_pretrained(data.tokenizer))
    vlm.save_pretrained(path)
    return path


def pretrain_lm(out: Path, s: Settings, data: Data, seed: int) -> dict:
    """Text-only pretraining of the LM on captions and refusal-rule instructions (chat format): the
    stand-in for a safety-tuned LLM. ``train`` at stage 2 on text-only records (the projector gets
    no signal)."""
    from ..train import TrainConfig, train

    init = initial_model(out / "initial", s, data, seed)
    return train(TrainConfig(**_common(s, seed), model=str(init), out=str(out), data=str(data.pretrain), stage=2,
                             prompt_format="chat", max_steps=s.lm_steps, global_batch_size=s.lm_batch,
                             micro_batch_size=s.lm_batch, lr=s.lm_lr, regap_weight=0.0))


def vlm_init(path: Path, lm_model: Path, s: Settings, seed: int) -> Path:
    """The pretrained LM with a vision tower and a projector freshly initialised from ``seed``: where
    stage 1 of that seed starts (the same for every lambda of the seed)."""
    import torch

    from ..model import VisionLanguageModel, load_model

    vlm = load_model(lm_model, device="cpu")
    torch.manual_seed(seed)
    fresh = VisionLanguageModel.from_config(model_config(s), tokenizer=vlm.tokenizer)
    vlm.vision_tower.load_state_dict(fresh.vision_tower.state_dict())
    vlm.projector.load_state_dict(fresh.projector.state_dict())
    vlm.save_pretrained(path)
    return path


def stage1(out: Path, base_model: Path, s: Settings, data: Data, seed: int, weight: float) -> dict:
    """Projector only, on the image-caption pairs, with REGAP weight ``weight``."""
    from ..train import TrainConfig, train

    return train(TrainConfig(**_common(s, seed), model=str(base_model), out=str(out), data=str(data.shapes), stage=1,
                             prompt_format=s.stage1_format, max_steps=s.stage1_steps, global_batch_size=s.stage1_batch,
                             micro_batch_size=s.stage1_batch, lr=s.stage1_lr, regap_weight=weight))


def stage2(out: Path, stage1_model: Path, s: Settings, data: Data, seed: int) -> dict:
    from ..train import TrainConfig, train

    rank = s.stage2_lora_rank
    lora = dict(lora=True, lora_rank=rank, lora_alpha=2 * rank) if rank else {}  # alpha / rank = 2 at any rank
    return train(TrainConfig(**_common(s, seed), model=str(stage1_model), out=str(out), data=str(data.stage2),
                             image_folder=str(data.shapes.parent), stage=2, max_steps=s.stage2_steps,
                             global_batch_size=s.stage2_batch, micro_batch_size=s.stage2_batch, lr=s.stage2_lr,
                             mm_projector_lr=s.stage2_projector_lr or None, regap_weight=0.0, **lora))


# --------------------------------------------------------------------------------------------------
# measurements, through regap_fast.eval
# --------------------------------------------------------------------------------------------------


def _rates(report: dict) -> dict:
    return {name: report["unsafe_rate"][c]["rate"] for c, name in CONDITIONS.items() if c in report["unsafe_rate"]}


def measure(run_dir: Path, stage1_model: Path, final_model: Path, s: Settings, data: Data, seed: int) -> dict:
    """gap.json (the stage-1 model's gap: what REGAP acts on), safety.json (the final model's unsafe
    rates: ``regap-fast compare`` reads the two), the same safety evaluation of the stage-1 model
    (stage1/safety.json), and the benign control (benign/safety.json: are benign requests still answered?)."""
    import torch

    from ..eval import RefusalJudge, evaluate, load_pairs, measure_gap, write_gap
    from ..model import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pairs = load_pairs(data.eval_pairs)
    judge = RefusalJudge()
    kw = dict(max_new_tokens=s.max_new_tokens, batch_size=s.eval_batch, seed=seed, progress=False)
    vlm = load_model(stage1_model, device=device)
    gap = measure_gap(vlm, pairs, batch_size=s.eval_batch, per_layer=False, progress=False)
    gap["model"] = str(stage1_model)
    write_gap(gap, run_dir)
    after_stage1 = evaluate(vlm, data.harmful, list(CONDITIONS), judge, out_dir=stage1_model.parent / "safety",
                            model_name=str(stage1_model), **kw) if s.eval_stage1 else None
    del vlm
    final = load_model(final_model, device=device)
    final_gap = measure_gap(final, pairs, batch_size=s.eval_batch, per_layer=False, progress=False)
    report, benign = final_safety(final, run_dir, s, data, seed, str(final_model))
    return {"gap": gap, "final_model_gap": final_gap["gap"]["mean"], "safety": report, "benign": benign,
            "after_stage1": after_stage1}


def final_safety(vlm, run_dir: Path, s: Settings, data: Data, seed: int, name: str) -> tuple[dict, dict]:
    """The held-out harmful requests under every condition (run_dir/safety.json), and the held-out benign
    ones text only and with an image (run_dir/benign/safety.json: are they still answered?)."""
    from ..eval import RefusalJudge, evaluate

    judge = RefusalJudge()
    kw = dict(max_new_tokens=s.max_new_tokens, batch_size=s.eval_batch, seed=seed, progress=False, model_name=name)
    harmful = evaluate(vlm, data.harmful, list(CONDITIONS), judge, out_dir=run_dir, **kw)
    benign = evaluate(vlm, data.benign, ["none", "benchmark:" + IMAGE_KIND], judge, out_dir=run_dir / "benign", **kw)
    return harmful, benign


def run_one(run_dir: Path, lm_model: Path, s: Settings, data: Data, seed: int, weight: float) -> dict:
    """One (seed, lambda): stage 1 from the pretrained LM with the seed's fresh vision tower and
    projector, stage 2, the measurements. Returns its row of the summary."""
    shutil.rmtree(run_dir, ignore_errors=True)
    init = vlm_init(run_dir / "init", lm_model, s, seed)
    s1 = stage1(run_dir / "stage1", init, s, data, seed, weight)
    s2 = stage2(run_dir / "stage2", run_dir / "stage1" / "model", s, data, seed)
    m = measure(run_dir, run_dir / "stage1" / "model", run_dir / "stage2" / "model", s, data, seed)
    rates = m["safety"]["unsafe_rate"]
    row = {
        "seed": seed, "regap_weight": weight,
        "final_gap": m["gap"]["gap"]["mean"],
        "final_lm_loss": s1["final_lm_loss"],
        "unsafe_rate": _rates(m["safety"]),
        "unsafe": {name: rates[c]["unsafe"] for c, name in CONDITIONS.items()},
        "n": {name: rates[c]["n"] for c, name in CONDITIONS.items()},
        "stage1": {k: s1.get(k) for k in ("initial_gap", "final_gap", "initial_lm_loss", "final_lm_loss",
                                          "train_seconds")},
        "stage2": {k: s2.get(k) for k in ("initial_lm_loss", "final_lm_loss", "train_seconds")},
        "final_model_gap": m["final_model_gap"],
        "benign_answer_rate": {CONDITIONS[c]: r["rate"] for c, r in m["benign"]["unsafe_rate"].items()},
        "dir": str(run_dir),
    }
    if m["after_stage1"] is not None:  # the same measurement before instruction tuning
        a = m["after_stage1"]["unsafe_rate"]
        row["after_stage1"] = {"unsafe_rate": _rates(m["after_stage1"]),
                               "unsafe": {name: a[c]["unsafe"] for c, name in CONDITIONS.items()},
                               "n": {name: a[c]["n"] for c, name in CONDITIONS.items()}}
    return row


def pretrain_dir(root: Path) -> Path:
    return root / "lm"


def run_dir(root: Path, seed: int, weight: float) -> Path:
    return root / f"seed{seed}" / f"lambda{weight:g}"

