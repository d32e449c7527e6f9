"""Training recipes: the stage-1 settings of the paper's three systems as named presets.

    regap-fast train --recipe sharegpt4v ...            # the preset's values
    regap-fast train --recipe sharegpt4v --lr 1e-5 ...  # a flag given on the command line beats the preset

A recipe sets what is trainable, the learning rate, the warm-up, the weight decay, the batch, the
length of the run and how images are fitted to the vision tower (LLaVA-1.5 pads them to a square);
nothing about the data files or the hardware (``--micro-batch-size``, ``--fsdp``, ...).
From Python, ``TrainConfig.from_recipe("sharegpt4v", lr=1e-5, ...)``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    settings: dict  # TrainConfig field -> value


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("llava-1.5",
           "LLaVA-1.5 stage 1 (LLaVA-Pretrain, 558k captions): the projector only; lr 1e-3, 3% warm-up then "
           "cosine, no weight decay, global batch 256, one epoch; images padded to a square of the mean colour "
           "(image_aspect_ratio pad)",
           dict(arch="llava", stage=1, train_vision="none", train_lm=False, lr=1e-3, warmup_ratio=0.03,
                weight_decay=0.0, global_batch_size=256, epochs=1.0, image_aspect_ratio="pad")),
    Recipe("sharegpt4v",
           "ShareGPT4V stage 1 (ShareGPT4V-PT, 1.2M detailed captions): the latter half of the vision tower's "
           "blocks, the projector and the LLM; lr 2e-5, 3% warm-up then cosine, no weight decay, global batch "
           "256, one epoch",
           dict(arch="llava", stage=1, train_vision="latter-half", train_lm=True, lr=2e-5, warmup_ratio=0.03,
                weight_decay=0.0, global_batch_size=256, epochs=1.0)),
    Recipe("minigpt4",
           "MiniGPT-4 stage 1 (~5M LAION/CC/SBU pairs): the linear layer (llama_proj) only; lr 1e-4, weight "
           "decay 0.05, 20,000 steps of 256 (4 epochs of 5,000 iterations on 4 GPUs x 64), the first 5,000 "
           "a warm-up (25%), then cosine to 8e-5",
           dict(arch="minigpt4", stage=1, train_vision="none", train_lm=False, lr=1e-4, warmup_ratio=0.25,
                min_lr_ratio=0.8, weight_decay=0.05, global_batch_size=256, max_steps=20000)),
)}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]
