"""The training configuration: one dataclass, and the command-line flags generated from it."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Optional


def arg(default, help: str, choices=None, group: str = "training", metavar: Optional[str] = None):
    """A config field with its command-line help (one place for both)."""
    return field(default=default, metadata={"help": help, "choices": choices, "group": group, "metavar": metavar})


@dataclass
class TrainConfig:
    # -- model --------------------------------------------------------------------------------------
    model: Optional[str] = arg(None, "start from this model folder: a regap-fast save (e.g. the stage-1 output, "
                               "for stage 2) or a transformers LlavaForConditionalGeneration folder", group="model",
                               metavar="DIR")
    vision_tower: Optional[str] = arg(None, "CLIP vision folder (e.g. clip-vit-large-patch14-336); with "
                                      "--language-model builds a new LLaVA (stage 1)", group="model", metavar="DIR")
    language_model: Optional[str] = arg(None, "causal LM folder (e.g. vicuna-7b-v1.5); with --vision-tower",
                                        group="model", metavar="DIR")
    vision_feature_layer: int = arg(-2, "vision tower layer whose features are projected (LLaVA-1.5: -2)",
                                    group="model")
    attn_implementation: str = arg("auto", "attention kernels: auto = flash_attention_2 if the flash-attn "
                                   "package imports, else sdpa (PyTorch's flash kernel on CUDA in bf16)",
                                   ["auto", "flash_attention_2", "sdpa", "eager"], group="model")
    projector_backend: str = arg("auto", "REGAP kernel backend for the fused projector",
                                 ["auto", "torch", "triton", "cuda"], group="model")
    gradient_checkpointing: bool = arg(False, "recompute the LM's activations in backward (less memory)",
                                       group="model")
    # -- data ---------------------------------------------------------------------------------------
    data: Optional[str] = arg(None, "LLaVA-format JSON list or .jsonl of records; default: the embedded "
                              "synthetic shapes set, written under OUT/data", group="data", metavar="JSON")
    image_folder: Optional[str] = arg(None, "folder the records' image paths are relative to "
                                      "(default: the data file's folder)", group="data", metavar="DIR")
    synthetic_samples: int = arg(3000, "size of the embedded synthetic set", group="data")
    eval_samples: int = arg(128, "records held out of training to measure loss and gap on", group="data")
    max_length: int = arg(2048, "longest token sequence (image tokens included); longer answers are cut",
                          group="data")
    prompt_format: str = arg("auto", "plain: <image> caption (LLaVA stage 1); chat: the chat template "
                             "(stage 2); auto: by stage", ["auto", "plain", "chat"], group="data")
    num_workers: int = arg(2, "DataLoader worker processes per training process", group="data")
    # -- optimisation -------------------------------------------------------------------------------
    stage: int = arg(1, "1: train the projector (vision tower and LM frozen); 2: projector + LM", [1, 2])
    lora: bool = arg(False, "stage 2: train LoRA adapters of the LM (peft) instead of all its weights")
    lora_rank: int = arg(128, "LoRA rank (LLaVA-1.5: 128)")
    lora_alpha: int = arg(256, "LoRA alpha (LLaVA-1.5: 256)")
    lora_dropout: float = arg(0.05, "LoRA dropout")
    regap_weight: float = arg(0.1, "lambda: loss = lm + lambda * gap; 0 turns REGAP off (and costs nothing)")
    regap_squared: bool = arg(False, "use the squared distance ||.||^2 (the paper uses ||.||)")
    max_steps: Optional[int] = arg(None, "optimizer steps (default: --epochs over the data)")
    epochs: float = arg(1.0, "passes over the training data, when --max-steps is not given")
    global_batch_size: int = arg(256, "samples per optimizer step over all processes (LLaVA stage 1: 256)")
    micro_batch_size: int = arg(16, "samples per forward/backward on one process; the rest is accumulation")
    lr: Optional[float] = arg(None, "peak learning rate (default: 1e-3 stage 1, 2e-5 stage 2, 2e-4 LoRA)")
    weight_decay: float = arg(0.0, "AdamW weight decay (matrices only)")
    warmup_ratio: float = arg(0.03, "linear warm-up as a fraction of the steps, then cosine decay to 0")
    grad_clip: float = arg(1.0, "clip the global gradient norm (0: off)")
    precision: str = arg("auto", "auto: bf16 autocast on CUDA, fp32 on the CPU", ["auto", "bf16", "fp32"])
    fsdp: bool = arg(False, "shard the model with FSDP (for LMs that do not fit one GPU) instead of DDP")
    seed: int = arg(0, "seed of the model init, the data order and everything random")
    # -- output -------------------------------------------------------------------------------------
    out: str = arg("runs/regap", "output folder: checkpoints, metrics, plot, final model", group="output",
                   metavar="DIR")
    resume: Optional[str] = arg(None, "continue a run: 'auto' (the latest checkpoint in --out, or start) "
                                "or a checkpoint folder", group="output", metavar="auto|DIR")
    stop_at_step: Optional[int] = arg(None, "stop (with a checkpoint) at this step although the schedule runs "
                                      "to --max-steps, e.g. to fit a job's time limit; --resume auto goes on",
                                      group="output")
    save_every: int = arg(500, "steps between checkpoints (0: only at the end)", group="output")
    keep_checkpoints: int = arg(2, "checkpoints kept (older ones are deleted once a newer one is written)",
                                group="output")
    eval_every: int = arg(100, "steps between measurements of the held-out loss and gap (0: start and end)",
                          group="output")
    save_model: bool = arg(True, "write the trained model to OUT/model at the end (load_model reads it)",
                           group="output")
    tensorboard: bool = arg(True, "also log to TensorBoard (OUT/tensorboard) when it is installed", group="output")
    plot: bool = arg(True, "plot loss and gap to OUT/metrics.png at the end", group="output")
    progress: bool = arg(True, "show a progress bar", group="output")

    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.stage == 1 else (2e-4 if self.lora else 2e-5)

    def check(self) -> "TrainConfig":
        """Clear errors for combinations that cannot work, before anything is loaded."""
        if (self.vision_tower is None) != (self.language_model is None):
            raise ValueError("--vision-tower and --language-model go together (a new model from two parts)")
        if self.model is not None and self.vision_tower is not None:
            raise ValueError("give either --model or --vision-tower/--language-model, not both")
        if self.lora and self.stage != 2:
            raise ValueError("--lora is for stage 2 (stage 1 trains the projector only)")
        if self.lora and self.fsdp:
            raise ValueError("--lora keeps the LM frozen in bf16 and trains small adapters: use DDP (no --fsdp)")
        if self.regap_weight < 0:
            raise ValueError(f"--regap-weight must be >= 0, got {self.regap_weight}")
        for name in ("global_batch_size", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("--max-steps must be >= 1")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


GROUPS = {"model": "model", "data": "data", "training": "training", "output": "output"}


def add_config_arguments(parser: argparse.ArgumentParser, defaults: Optional[dict] = None) -> None:
    """One flag per TrainConfig field (``--global-batch-size``, ``--lora/--no-lora``, ...)."""
    hints = typing.get_type_hints(TrainConfig)
    groups = {g: parser.add_argument_group(g) for g in GROUPS}
    for f in dataclasses.fields(TrainConfig):
        default = (defaults or {}).get(f.name, f.default)
        kind = hints[f.name]
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        flag = "--" + f.name.replace("_", "-")
        group = groups[f.metadata["group"]]
        help_text = f.metadata["help"] + (f" (default: {default})" if default is not None else "")
        if base is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                               help=help_text)
        else:
            metavar = None if f.metadata["choices"] else (f.metadata["metavar"] or base.__name__.upper())
            group.add_argument(flag, dest=f.name, type=base, default=default, choices=f.metadata["choices"],
                               help=help_text, metavar=metavar)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}).check()
