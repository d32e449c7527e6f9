"""The parts of ``regap-fast reproduce``'s runs, each through the library's own parts.

Once per data seed: the toy language, its tokenizer, the synthetic images (``prepare_data``), and
the text-only pretraining of the tiny LM (``pretrain_lm``: ``regap_fast.train.train`` at stage 2 on
text-only records, so the projector gets no signal and the LM learns the language, the captions and
the refusal rule). That LM is the "safety-tuned LLM backbone" every run of the data seed starts
from, as one Vicuna is in the paper.

Per model seed: a fresh vision tower and projector from the seed (``vlm_init``); the lambdas of a
seed start from the same weights and see the same batches, so they differ only by REGAP. Then
``stage1`` (``train`` with ``regap_weight = lambda`` on the image-caption pairs, projector only) and,
from that one stage-1 model, each arm's ``stage2`` (projector + the LM's weights, LoRA adapters or
the projector alone, on benign image-conditioned instructions with text-only records mixed in as
LLaVA-665k mixes in ShareGPT; REGAP off unless the arm keeps it on). ``measure.py`` measures every
model; ``schedule.py`` runs the tasks.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

# safety-eval condition names -> the summary's names
CONDITIONS = {"none": "text", "white": "blank", "noise": "noise", "benchmark:image": "image"}
CONDITION_NAMES = tuple(CONDITIONS.values())
DESCRIPTIONS = {"text": "text only", "blank": "blank (white) image", "noise": "Gaussian-noise image",
                "image": "synthetic-set image"}
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
    stage2_train_lm: bool = True  # False: stage 2 trains the projector alone, the LM stays as pretrained
    stage2_regap: bool = False  # True: REGAP stays on in stage 2, at the run's stage-1 lambda
    # evaluation
    max_new_tokens: int = 16
    eval_batch: int = 256  # every held-out request of a condition in one batch
    # the held-out requests evaluated: positions 0, k, 2k, ... (each list is sorted by object, so every object
    # keeps its share). 2 is PLAN v2's one pre-fixed cut (PLAN 10.3), made because the timing probe projected the
    # full study above 80 minutes; 1 evaluates them all (the committed runs before the study, check 8.8.1)
    eval_stride: int = 2
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
    harmful, benign = harmful[::s.eval_stride], benign[::s.eval_stride]
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


# LoRA in stage 2: alpha = 2 x rank (LLaVA-1.5's 256 / 128), dropout 0.05; the trainer puts the adapters on
# peft's "all-linear" (every linear layer of the LM's blocks: not lm_head, not the embeddings)
LORA = {"alpha_over_rank": 2, "dropout": 0.05, "target_modules": "all-linear"}


def stage2(out: Path, stage1_model: Path, s: Settings, data: Data, seed: int, weight: float) -> dict:
    """Instruction tuning from the stage-1 model, as the settings' arm says: what trains (the LM's weights,
    LoRA adapters of it, or the projector alone), the learning rates, and REGAP (off, or at the run's
    stage-1 lambda ``weight``)."""
    from ..train import TrainConfig, train

    rank = s.stage2_lora_rank
    lora = dict(lora=True, lora_rank=rank, lora_alpha=LORA["alpha_over_rank"] * rank,
                lora_dropout=LORA["dropout"]) if rank else {}
    return train(TrainConfig(**_common(s, seed), model=str(stage1_model), out=str(out), data=str(data.stage2),
                             image_folder=str(data.shapes.parent), stage=2, max_steps=s.stage2_steps,
                             global_batch_size=s.stage2_batch, micro_batch_size=s.stage2_batch, lr=s.stage2_lr,
                             mm_projector_lr=s.stage2_projector_lr or None, train_lm=s.stage2_train_lm,
                             regap_weight=weight if s.stage2_regap else 0.0, **lora))


# --------------------------------------------------------------------------------------------------
# where each run keeps its files
# --------------------------------------------------------------------------------------------------


def lm_dir(root: Path, data_seed: int) -> Path:
    return root / f"data{data_seed}" / "lm"


def cell_dir(root: Path, data_seed: int, seed: int, weight: float) -> Path:
    """A cell's folder: init/, stage1/ (its model), eval/ (the stage-1 model's measurements), arms/."""
    return root / f"data{data_seed}" / f"seed{seed}" / f"lambda{weight:g}"


def arm_dir(cell: Path, arm: str) -> Path:
    """An arm's stage 2 from the cell's stage-1 model: stage2/ (training records), eval/ (the final model's)."""
    return cell / "arms" / arm
