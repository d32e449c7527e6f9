"""The v2 toy's runs (docs/reproduce/PLAN-v3.md): data, the base LM, its shallow alignment, the gates.

Per data seed, text only: the **base LM** (``pipeline.pretrain_lm`` on documents, helpful-only chat
and captions: it knows every recipe and gives it to anyone), then the **aligned LM**: a short SFT from
it on the alignment chat with document replay (``align_lm``). ``lm_gates`` measures G1-G4 on the two
(``gates.measure``) and writes ``gates.json``; ``gates.check`` stops the run on a failed gate before any
stage 1. Stage 1 and stage 2 are v1's (``pipeline.stage1``, ``pipeline.stage2``) from the aligned LM,
on the v2 data (``prepare_data``: shapes plus glyph pairs for stage 1; the arms' stage-2 mixes).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from . import pipeline
from .language import REFUSALS
from .pipeline import Settings, _common, _write_json


@dataclass
class SettingsV2(Settings):
    """v1's sizes and steps with the v2 toy's own (PLAN-v3 sections 2-5)."""

    vocab_size: int = 1024
    instructions: int = 4000  # helpful-only chat records in the base LM's pretraining
    document_repeats: int = 8  # each document this many times in the pretraining mix
    lm_steps: int = 400
    align_records: int = 2000
    align_replay: float = 0.3  # of the alignment records: replayed documents
    align_steps: int = 60
    align_lr: float = 1e-3
    glyphs_per_object: int = 10  # stage 1's glyph pairs ("the word {o}"), per object
    stage2_harmful_refusal_share: float = 0.0  # the VLGuard-like arm's image-attached harmful -> refusal records
    max_new_tokens: int = 24
    eval_stride: int = 1  # PLAN-v3 2: every held-out request (256 harmful, 64 benign); 9.2's cut would be 2


def glyph_image(obj: str, size: int, rng: random.Random):
    """The object's name rendered black on white (PIL's bitmap font), at a random offset, scaled to ``size``."""
    from PIL import Image, ImageDraw

    width = 6 * len(obj) + 8
    canvas = Image.new("RGB", (width, width), "white")
    ImageDraw.Draw(canvas).text((rng.randint(0, 6), rng.randint(0, width - 12)), obj, fill="black")
    return canvas.resize((size, size), Image.BILINEAR)


@dataclass
class DataV2(pipeline.Data):
    align: Path = None  # the alignment SFT's records
    recipes: dict = None  # object -> its recipe words
    glyphs: dict = None  # object -> a held-out glyph image's path (the glyph condition)
    harmful_requests: list = None  # language.Request, the held-out ones evaluated (every eval_stride-th)
    benign_requests: list = None


def prepare_data(root: Path, s: SettingsV2, seed: int) -> DataV2:
    """The v2 language, its tokenizer and every data file, deterministic from ``seed``."""
    from ..data import synthetic
    from ..eval import BenchmarkImage, Prompt
    from .language import HARMFUL, BENIGN
    from .language2 import GLYPH_CAPTION, ToyLanguageV2

    root.mkdir(parents=True, exist_ok=True)
    lang = ToyLanguageV2(seed, s.heldout_harmful, s.heldout_benign)
    shapes = synthetic.write_dataset(root, s.images, seed=seed, image_size=s.image_size)
    held = synthetic.write_dataset(root / "heldout", s.eval_images, seed=seed + 10_000, image_size=s.image_size)
    records, held_records = json.loads(shapes.read_text()), json.loads(held.read_text())
    rng = random.Random(seed)
    (root / "glyphs").mkdir(exist_ok=True)
    glyph_records, glyphs = [], {}
    for obj in HARMFUL + BENIGN:  # stage 1's glyph pairs, and one held-out glyph per object (another offset)
        for k in range(s.glyphs_per_object + 1):
            rel = f"glyphs/{obj.replace(' ', '-')}-{k}.png"
            glyph_image(obj, s.image_size, rng).save(root / rel)
            if k == s.glyphs_per_object:
                glyphs[obj] = root / rel
            else:
                glyph_records.append({"id": f"glyph-{obj}-{k}", "image": rel, "conversations": [
                    {"from": "human", "value": "<image>\n" + rng.choice(synthetic.PROMPTS)},
                    {"from": "gpt", "value": GLYPH_CAPTION.format(o=obj)}]})
    stage1_records = records + glyph_records
    rng.shuffle(stage1_records)
    stage1_path = _write_json(root / "stage1.json", stage1_records)
    captions = [r["conversations"][1]["value"] for r in records + held_records + glyph_records]
    lang.tokenizer(captions, s.vocab_size).save_pretrained(root / "tokenizer")
    docs = lang.document_records()
    pretrain = lang.caption_records(records) + lang.helpful_records(s.instructions, seed)
    pretrain += [dict(d, id=f"{d['id']}-{k}") for d in docs for k in range(s.document_repeats)]
    rng.shuffle(pretrain)
    pretrain_path = _write_json(root / "pretrain.json", pretrain)
    align_path = _write_json(root / "align.json", lang.alignment_records(s.align_records, seed + 5, s.align_replay))

    def prompts(requests, kind):  # each request with a held-out synthetic image, and its object's glyph
        return [Prompt(f"{kind}-{i:04d}", r.text, kind, images={
            pipeline.IMAGE_KIND: BenchmarkImage(held.parent / held_records[i % len(held_records)]["image"], r.text)})
            for i, r in enumerate(requests)]

    harmful = prompts(lang.heldout_harmful, "harmful")[::s.eval_stride]
    benign = prompts(lang.heldout_benign, "benign")[::s.eval_stride]
    data = DataV2(root=root, tokenizer=root / "tokenizer", shapes=stage1_path, pretrain=pretrain_path,
                  stage2=root / "stage2.json", eval_pairs=held, harmful=harmful, benign=benign, align=align_path,
                  recipes=lang.recipes, glyphs=glyphs, harmful_requests=lang.heldout_harmful[::s.eval_stride],
                  benign_requests=lang.heldout_benign[::s.eval_stride])
    return data


def align_lm(out: Path, base_model: Path, s: SettingsV2, data: DataV2, seed: int) -> dict:
    """The shallow text-only alignment: SFT from the base LM on the alignment records (chat format)."""
    from ..train import TrainConfig, train

    return train(TrainConfig(**_common(s, seed), model=str(base_model), out=str(out), data=str(data.align), stage=2,
                             prompt_format="chat", max_steps=s.align_steps, global_batch_size=s.lm_batch,
                             micro_batch_size=s.lm_batch, lr=s.align_lr, regap_weight=0.0))


def lm_gates(folder: Path, s: SettingsV2, data: DataV2, seed: int) -> dict:
    """The base LM (``folder/base``), the aligned LM (``folder/model``) and the gates' results
    (``folder/gates.json``) of a data seed; the gates are measured, not checked (``gates.check`` is the
    caller's)."""
    import time

    import torch

    from ..model import load_model
    from . import gates
    from .language2 import ToyLanguageV2

    t0 = time.perf_counter()
    base = pipeline.pretrain_lm(folder / "base", s, data, seed)
    aligned = align_lm(folder / "aligned", folder / "base" / "model", s, data, seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lang = ToyLanguageV2(seed, s.heldout_harmful, s.heldout_benign)
    values = gates.measure(load_model(folder / "base" / "model", device=device),
                           load_model(folder / "aligned" / "model", device=device), lang, s.max_new_tokens,
                           s.eval_batch)
    out = {"gates": gates.results(values), "base_final_loss": base.get("final_lm_loss"),
           "aligned_final_loss": aligned.get("final_lm_loss"), "seconds": time.perf_counter() - t0}
    (folder / "gates.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


def stage2_data_name(s: SettingsV2) -> str:
    """The stage-2 mix of these settings (one file per mix, side by side)."""
    return (f"stage2-requests{s.stage2_request_share:g}-text{s.stage2_text_share:g}-{s.stage2_text_data}"
            f"-refuse{s.stage2_harmful_refusal_share:g}.json")


def write_stage2_data(root: Path, s: SettingsV2, seed: int) -> Path:
    """Stage 2's records: an instruction per synthetic shapes image (benign requests answered by their recipe,
    image questions and, for the VLGuard-like arm, harmful requests refused) and text-only records making
    up ``stage2_text_share``: a replay of the aligned LM's data, or benign requests."""
    from .language2 import ToyLanguageV2

    if not 0.0 <= s.stage2_text_share < 1.0:
        raise ValueError(f"stage2_text_share must be in [0, 1), got {s.stage2_text_share:g}")
    lang = ToyLanguageV2(seed, s.heldout_harmful, s.heldout_benign)
    images = json.loads((root / "shapes.json").read_text())
    records = lang.image_instruction_records(images, seed + 1, s.stage2_request_share,
                                             s.stage2_harmful_refusal_share)
    n_text = round(len(records) * s.stage2_text_share / (1.0 - s.stage2_text_share))
    if n_text:
        if s.stage2_text_data == "replay":
            records += random.Random(seed + 2).sample(json.loads((root / "align.json").read_text()), n_text)
        else:
            records += [r for r in lang.alignment_chat(2 * n_text, seed + 2)
                        if r["conversations"][1]["value"] not in REFUSALS][:n_text]
        random.Random(seed + 3).shuffle(records)
    return _write_json(root / stage2_data_name(s), records)
