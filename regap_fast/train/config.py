"""The training configuration: one dataclass, and the command-line flags generated from it."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Optional

from ..flags import add_aliases
from .recipes import RECIPES, get_recipe

VISION_CHOICES = "none, latter-half, all, or K (the blocks from K on; negative: from the end)"


def arg(default, help: str, choices=None, group: str = "training", metavar: Optional[str] = None):
    """A config field with its command-line help (one place for both)."""
    return field(default=default, metadata={"help": help, "choices": choices, "group": group, "metavar": metavar})


@dataclass
class TrainConfig:
    # -- model --------------------------------------------------------------------------------------
    arch: str = arg("llava", "architecture of a new model: llava (CLIP ViT + 2-layer MLP projector) or minigpt4 "
                    "(BLIP-2 ViT + Q-Former + one linear layer); a --model folder carries its own",
                    ["llava", "minigpt4"], group="model")
    model: Optional[str] = arg(None, "start from this model folder: a regap-fast save (e.g. the stage-1 output, "
                               "for stage 2) or a transformers LlavaForConditionalGeneration folder", group="model",
                               metavar="DIR")
    vision_tower: Optional[str] = arg(None, "vision folder: CLIP for --arch llava (e.g. clip-vit-large-patch14-336), "
                                      "a transformers BLIP-2 folder for --arch minigpt4 (its ViT and Q-Former; e.g. "
                                      "blip2-flan-t5-xxl); with --language-model builds a new model (stage 1)",
                                      group="model", metavar="DIR")
    language_model: Optional[str] = arg(None, "causal LM folder (e.g. vicuna-7b-v1.5); with --vision-tower",
                                        group="model", metavar="DIR")
    projector_weights: Optional[str] = arg(None, "start the projector from these weights: MiniGPT-4's stage-1 "
                                           "checkpoint (llama_proj.*), LLaVA's mm_projector.bin, BLIP-2's "
                                           "language_projection.* (.pth, .bin or .safetensors)", group="model",
                                           metavar="FILE")
    image_aspect_ratio: str = arg("keep", "pad: centre each image on a square of the mean colour before the vision "
                                  "tower's preprocessing (LLaVA-1.5's --image_aspect_ratio pad; the llava-1.5 "
                                  "recipe's default); keep: as it is. A --model folder keeps its own unless given",
                                  ["keep", "pad"], group="model")
    vision_feature_layer: int = arg(-2, "vision tower layer whose features are projected (LLaVA-1.5: -2; "
                                    "--arch llava only)", group="model")
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
    cache_samples: bool = arg(False, "keep each loaded example (tokens, pixels) in memory after its first load: "
                              "for a small dataset trained for many epochs, not for LLaVA's 558k", group="data")
    # -- optimisation -------------------------------------------------------------------------------
    recipe: Optional[str] = arg(None, "a named preset of what trains, lr, warm-up, weight decay, batch and length: "
                                + "; ".join(f"{r.name}: {r.summary}" for r in RECIPES.values())
                                + ". A flag given explicitly beats the preset", list(RECIPES))
    stage: int = arg(1, "1: train the projector (vision tower and LM frozen unless --train-vision/--train-lm), "
                     "captions in the plain format; 2: projector + LM, conversations in the chat format", [1, 2])
    train_vision: str = arg("none", f"vision tower blocks to train: {VISION_CHOICES}; blocks after the feature "
                            "layer, the embeddings and the norms stay frozen (ShareGPT4V: latter-half)",
                            metavar="BLOCKS")
    train_lm: Optional[bool] = arg(None, "train the LM's weights (default: in stage 2 only; ShareGPT4V's stage 1 "
                                   "does)")
    lora: bool = arg(False, "stage 2: train LoRA adapters of the LM (peft) instead of all its weights")
    lora_rank: int = arg(128, "LoRA rank (LLaVA-1.5: 128)")
    lora_alpha: int = arg(256, "LoRA alpha (LLaVA-1.5: 256)")
    lora_dropout: float = arg(0.05, "LoRA dropout")
    regap_weight: float = arg(0.1, "lambda: loss = lm + lambda * gap; 0 turns REGAP off (and costs nothing)")
    regap_squared: bool = arg(False, "use the squared distance ||.||^2 (the paper uses ||.||)")
    regap_layer: int = arg(0, "where the gap is taken: 0 the LLM input (the fused kernels), k >= 1 the hidden "
                              "states after decoder layer k (the paper regularises the first layer)")
    regap_scale: str = arg("none", "text-norm: the gap times alpha = 1 / mean caption-token norm, estimated over "
                                   "--regap-scale-steps then frozen and kept in the checkpoints (MIR's "
                                   "normalisation; the paper's warm-up alpha)", ["none", "text-norm"])
    regap_scale_steps: Optional[int] = arg(None, "optimizer steps the text-norm alpha is estimated over (default: "
                                                 "the warm-up steps, at least 1)")
    max_steps: Optional[int] = arg(None, "optimizer steps (default: --epochs over the data)")
    epochs: float = arg(1.0, "passes over the training data, when --max-steps is not given")
    global_batch_size: int = arg(256, "samples per optimizer step over all processes (LLaVA stage 1: 256)")
    micro_batch_size: int = arg(16, "samples per forward/backward on one process; the rest is accumulation")
    lr: Optional[float] = arg(None, "peak learning rate (default: 1e-3 with the LM frozen, 2e-5 when it trains, "
                              "2e-4 LoRA)")
    mm_projector_lr: Optional[float] = arg(None, "peak learning rate of the projector when it differs from --lr "
                                           "(LLaVA's flag; e.g. a stage 2 that tunes the LM gently)")
    weight_decay: float = arg(0.0, "AdamW weight decay (matrices only)")
    warmup_ratio: float = arg(0.03, "linear warm-up as a fraction of the steps, then cosine decay")
    min_lr_ratio: float = arg(0.0, "the cosine decays to lr x this (0: to zero)")
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
    overwrite: bool = arg(False, "start a new run in a non-empty --out: the files earlier runs wrote there "
                          "(listed in OUT/.regap_fast_written.json; checkpoints/step-*) are deleted first, anything "
                          "else in it stays; the command line refuses a non-empty --out without it", group="output")
    plot: bool = arg(True, "plot loss and gap to OUT/metrics.png at the end", group="output")
    progress: bool = arg(True, "show a progress bar", group="output")
    # fields the recipe must not change although they hold their default (filled by the command line and
    # by from_recipe with what was given explicitly); not a flag
    recipe_overrides: tuple = field(default=(), metadata={"cli": False})

    def __post_init__(self):
        """A recipe fills the fields that still hold their default and were not given explicitly."""
        if self.recipe is None:
            return
        recipe = get_recipe(self.recipe)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, value in recipe.settings.items():
            if name not in self.recipe_overrides and getattr(self, name) == defaults[name]:
                setattr(self, name, value)

    @classmethod
    def from_recipe(cls, recipe: Optional[str], **fields) -> "TrainConfig":
        """The recipe's settings, and ``fields`` over them (even where a field is given its default value)."""
        given = set(fields.pop("recipe_overrides", ()))
        overrides = tuple(sorted(given | set(fields)))
        return cls(recipe=recipe, recipe_overrides=overrides, **fields)

    def lm_trainable(self) -> bool:
        return self.train_lm if self.train_lm is not None else self.stage == 2

    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-3 if not self.lm_trainable() else (2e-4 if self.lora else 2e-5)

    def check(self) -> "TrainConfig":
        """Clear errors for combinations that cannot work, before anything is loaded."""
        if (self.vision_tower is None) != (self.language_model is None):
            raise ValueError("--vision-tower and --language-model go together (a new model from two parts)")
        if self.model is not None and self.vision_tower is not None:
            raise ValueError("give either --model or --vision-tower/--language-model, not both")
        if self.recipe is not None:
            get_recipe(self.recipe)
        if not re.fullmatch(r"none|latter-half|all|-?\d+", self.train_vision):
            raise ValueError(f"--train-vision must be {VISION_CHOICES}; got {self.train_vision!r}")
        if self.lora and not self.lm_trainable():
            raise ValueError("--lora is for stage 2 or --train-lm (stage 1 trains the projector only)")
        if self.lora and self.fsdp:
            raise ValueError("--lora keeps the LM frozen in bf16 and trains small adapters: use DDP (no --fsdp)")
        if self.model is not None and self.projector_weights is not None:
            raise ValueError("--projector-weights starts a new model's projector: not with --model")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.regap_weight < 0:
            raise ValueError(f"--regap-weight must be >= 0, got {self.regap_weight}")
        for name in ("global_batch_size", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        self._check_ranges()
        if self.resume is not None and self.overwrite:
            raise ValueError("--resume continues the run in --out, --overwrite starts over: give one of them")
        return self

    def _check_ranges(self) -> None:
        at_least = {"max_steps": 1, "stop_at_step": 1, "eval_samples": 0, "synthetic_samples": 2, "max_length": 1,
                    "num_workers": 0, "save_every": 0, "eval_every": 0, "keep_checkpoints": 1, "lora_rank": 1,
                    "regap_layer": 0, "regap_scale_steps": 1}
        for name, low in at_least.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
        for name in ("lr", "mm_projector_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        if not self.epochs > 0:
            raise ValueError(f"--epochs must be > 0, got {self.epochs}")
        for name in ("warmup_ratio", "lora_dropout"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


EXPLICIT = "_explicit_config_fields"  # where the parsed namespace keeps the flags given on the command line


def _mark(namespace: argparse.Namespace, dest: str) -> None:
    explicit = set(getattr(namespace, EXPLICIT, ()))
    explicit.add(dest)
    setattr(namespace, EXPLICIT, explicit)


class _Store(argparse.Action):
    """Store the value, and remember that the flag was given (so that it beats a recipe)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        _mark(namespace, self.dest)


class _StoreBool(argparse.BooleanOptionalAction):
    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        _mark(namespace, self.dest)


# The names LLaVA's and Hugging Face's training scripts use, accepted as they are (every flag also takes
# its underscore spelling, ``--global_batch_size``). Hidden from the help's flag column, named in its text.
ALIASES = {
    "out": ("--output_dir", "--output-dir"),
    "data": ("--data_path", "--data-path"),
    "save_every": ("--save_steps", "--save-steps"),
    "keep_checkpoints": ("--save_total_limit", "--save-total-limit"),
    "lr": ("--learning_rate", "--learning-rate"),
    "epochs": ("--num_train_epochs", "--num-train-epochs"),
    "micro_batch_size": ("--per_device_train_batch_size",),
    "max_length": ("--model_max_length",),
    "num_workers": ("--dataloader_num_workers",),
    "eval_every": ("--eval_steps",),
    "projector_weights": ("--pretrain_mm_mlp_adapter",),
    "lora_rank": ("--lora_r",),
    "resume": ("--resume_from_checkpoint",),
    "vision_feature_layer": ("--mm_vision_select_layer",),
}


def flag_aliases(name: str, is_bool: bool = False) -> tuple[str, ...]:
    """The other spellings of field ``name``'s flag (none for switches: ``--x_y True`` would not parse)."""
    if is_bool:
        return ()
    underscore = ("--" + name,) if "_" in name else ()
    return tuple(dict.fromkeys(underscore + ALIASES.get(name, ())))


def flag_fields() -> list[dataclasses.Field]:
    """The TrainConfig fields that are command-line flags (all but ``recipe_overrides``)."""
    return [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli", True)]


def add_config_arguments(parser: argparse.ArgumentParser, defaults: Optional[dict] = None) -> None:
    """One flag per TrainConfig field (``--global-batch-size``, ``--lora/--no-lora``, ...), with its aliases."""
    hints = typing.get_type_hints(TrainConfig)
    fields = flag_fields()
    # the help's sections, in the order the fields first name them: model, data, training, output
    groups = {g: parser.add_argument_group(g) for g in dict.fromkeys(f.metadata["group"] for f in fields)}
    for f in fields:
        default = (defaults or {}).get(f.name, f.default)
        kind = hints[f.name]
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        flag = "--" + f.name.replace("_", "-")
        aliases = flag_aliases(f.name, base is bool)
        group = groups[f.metadata["group"]]
        help_text = f.metadata["help"].replace("%", "%%")  # the help formatter adds the default
        if base is bool:
            action = group.add_argument(flag, dest=f.name, action=_StoreBool, default=default, help=help_text)
        else:
            metavar = None if f.metadata["choices"] else (f.metadata["metavar"] or base.__name__.upper())
            action = group.add_argument(flag, *aliases, dest=f.name, action=_Store, type=base, default=default,
                                        choices=f.metadata["choices"], help=help_text, metavar=metavar)
        add_aliases(action, *aliases)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config of the parsed flags: with ``--recipe``, its settings where no flag was given."""
    values = {f.name: getattr(args, f.name) for f in flag_fields()}
    values["recipe_overrides"] = tuple(sorted(getattr(args, EXPLICIT, ())))
    return TrainConfig(**values).check()
