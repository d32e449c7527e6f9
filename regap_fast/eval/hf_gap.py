"""``regap-fast gap`` and ``safety-eval`` on a transformers vision-language model folder, with the model's own
processor and chat template (any family of docs/integrations.md; the folder holds the model and its
processor, as ``save_pretrained`` writes them).

``safety-eval``: ``TransformersVLM.generate`` renders each request as a user turn (the image first when the
condition sends one) with the generation prompt, and decodes what ``model.generate`` adds.

Each pair becomes one conversation, rendered by the processor's chat template: the user turn is the
record's own question (its human turn, the ``<image>`` placeholder dropped) with the image, the
assistant turn is the caption. The gap is ``regap_fast.core``'s at the language model's input, the
``inputs_embeds`` it receives: image positions at the image placeholders, caption positions the
caption's own tokens (``caption_mask`` of the caption's span: the template's markers around it are not
caption tokens).

BLIP-2, InstructBLIP and PaliGemma have no chat template by design (BLIP-2's and InstructBLIP's processors
cannot hold one; PaliGemma is a prefix-to-suffix model). They get their own plain format instead (``PLAIN``):
the question, then the answer. BLIP-2 and InstructBLIP: the text ``"{question} {answer}"`` with the
tokenizer's own special tokens, the processor putting the query tokens in front; InstructBLIP's Q-Former
reads the question alone (the instruction, never the answer). PaliGemma: the processor's prefix
``<image>{question}`` and the answer as its ``suffix``, so the answer is causal after a bidirectional prefix
and its labels are the processor's. A request is the question alone; these models answer only with an
image (BLIP-2's ``generate`` needs ``pixel_values``, PaliGemma's processor needs images), so ``safety-eval``
leaves the ``none`` condition out for them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
PLAIN = ("blip-2", "instructblip", "paligemma")  # model types without a chat template by design
QWEN_SIDE = 448  # the synthetic images' side for processors that take a pixel budget


class GapInputs(NamedTuple):
    """What the gap of one batch is computed from: ``modality_gap(image, caption, image_mask, caption_mask)``
    at the LLM input, and the LLM's hidden states with the image and caption positions in the sequence."""

    image: object
    caption: object
    image_mask: object
    caption_mask: object
    hidden: Optional[Sequence] = None
    hidden_image_mask: object = None
    hidden_caption_mask: object = None


def is_transformers_folder(path) -> bool:
    """A transformers model folder with a processor (not one of regap_fast's own model or run folders)."""
    path = Path(path)
    config = path / "config.json"
    if not config.is_file() or not any((path / name).is_file() for name in PROCESSOR_FILES):
        return False
    return "format" not in json.loads(config.read_text())


class TransformersVLM:
    """A transformers VLM and its processor, measured as ``measure_gap`` measures the library's own model."""

    def __init__(self, model, processor):
        from ..integrations.transformers import check_supported, placeholder_ids, special_ids_of

        check_supported(model)
        self.model, self.processor = model.eval(), processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        kind = getattr(model.config, "model_type", None)
        self.plain = not getattr(processor, "chat_template", None) and kind in PLAIN
        if not self.plain and not getattr(processor, "chat_template", None):
            raise ValueError("the model's processor has no chat template: the pairs cannot be put into its format")
        self.prefix_suffix = self.plain and kind == "paligemma"  # the answer goes in as the processor's suffix
        self.answers_without_image = not self.plain
        self.placeholders = placeholder_ids(model)
        self.special_ids = special_ids_of(model, self.tokenizer.all_special_ids)

    @classmethod
    def from_folder(cls, path, device: str = "cpu", dtype=None) -> "TransformersVLM":
        """The model (``AutoModelForImageTextToText``) and its processor from a local folder."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype or "auto")
        except ValueError as e:  # transformers lists every class it knows: one line is enough
            kind = json.loads((Path(path) / "config.json").read_text()).get("model_type")
            raise ValueError(f"{path}: model_type {kind!r} is not a transformers image-text-to-text model "
                             f"({str(e).splitlines()[0][:160]})") from None
        return cls(model.to(device), AutoProcessor.from_pretrained(str(path)))

    @property
    def image_size(self) -> int:
        """The side of the square synthetic images (blank, noise, typographic): the processor's input size."""
        images = getattr(self.processor, "image_processor", None)
        budget, low = getattr(images, "max_pixels", None), getattr(images, "min_pixels", None) or 0
        if budget is None and hasattr(images, "temporal_patch_size"):  # transformers 5 keeps the budget in size
            size = getattr(images, "size", None) or {}
            budget, low = size.get("longest_edge"), size.get("shortest_edge") or 0
        if budget:  # Qwen-VL, GLM-4V: a pixel budget (their ``size`` counts pixels): 448 px within it
            return int(min(max(QWEN_SIDE, low ** 0.5), budget ** 0.5))
        for attr in ("crop_size", "size", "max_image_size"):
            value = getattr(images, attr, None)
            if isinstance(value, int):
                return value
            if isinstance(value, dict) or hasattr(value, "get"):
                for key in ("height", "shortest_edge", "longest_edge"):
                    if value.get(key):
                        return int(value[key])
        vision = getattr(self.model.config, "vision_config", None)
        return int(getattr(vision, "image_size", 0) or 336)

    def _prompt(self, request: str, with_image: bool) -> str:
        if self.plain:  # BLIP-2's processor puts the query tokens in front itself; PaliGemma's prefix names them
            return (self.processor.image_token if self.prefix_suffix and with_image else "") + request
        user = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": request}]
        return self.processor.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                  add_generation_prompt=True)

    def generate(self, prompts: Sequence[str], images: Sequence, *, max_new_tokens: int = 64, do_sample: bool = False,
                 temperature: float = 1.0, batch_size: int = 8) -> list[str]:
        """Answers to raw user requests (each with a PIL image or None), batched with left padding; requests
        with and without an image go in separate forward passes (processors take one kind per call)."""
        import torch

        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
        if not self.answers_without_image and any(im is None for im in images):
            raise ValueError(f"a {self.model.config.model_type} model answers only with an image")
        answers: list = [None] * len(prompts)
        groups = [[i for i, im in enumerate(images) if (im is None) == none] for none in (True, False)]
        dtype = next(self.model.parameters()).dtype
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        sampling = {"do_sample": True, "temperature": temperature} if do_sample else {"do_sample": False}
        for group in groups:
            for start in range(0, len(group), batch_size):
                chunk = group[start:start + batch_size]
                with_image = images[chunk[0]] is not None
                texts = [self._prompt(prompts[i], with_image) for i in chunk]
                kwargs = {"images": [[images[i].convert("RGB")] for i in chunk]} if with_image else {}
                batch = self.processor(text=texts, padding=True, padding_side="left", add_special_tokens=self.plain,
                                       return_tensors="pt", **kwargs)
                inputs = {k: v.to(self.model.device, dtype if v.is_floating_point() else v.dtype)
                          for k, v in batch.items()}
                with torch.inference_mode():
                    out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling)
                new = out[:, inputs["input_ids"].shape[1]:]
                for i, text in zip(chunk, self.tokenizer.batch_decode(new, skip_special_tokens=True)):
                    answers[i] = text.strip()
        return answers

    def _conversation(self, prompt: str, caption: str) -> str:
        if self.plain:
            return f"{prompt} {caption}".strip()
        user = [{"type": "image"}] + ([{"type": "text", "text": prompt}] if prompt else [])
        messages = [{"role": "user", "content": user},
                    {"role": "assistant", "content": [{"type": "text", "text": caption}]}]
        return self.processor.apply_chat_template(messages, tokenize=False)

    def _caption_span(self, prompt: str, caption: str) -> tuple[int, int]:
        """(tokens after the caption, caption tokens) in the rendered conversation: what differs from the same
        conversation with an empty caption. The image tokens come before, so the count from the end holds
        after the processor expands them."""
        from ..data.llava import common_prefix_length

        full, empty = (self.tokenizer(self._conversation(prompt, c), add_special_tokens=self.plain)["input_ids"]
                       for c in (caption, ""))
        start = common_prefix_length(full, empty)
        after = common_prefix_length(full[start:][::-1], empty[start:][::-1])
        return after, len(full) - start - after

    def gap_inputs(self, images: Sequence, captions: Sequence[str], prompts: Sequence[str],
                   per_layer: bool) -> GapInputs:
        """One forward over the pairs; the LLM's inputs_embeds (and hidden states) with the two masks."""
        import torch

        from ..core import caption_mask
        from ..integrations.transformers import LanguageModelInputs

        common = dict(images=[[im] for im in images], padding=True, padding_side="right", return_tensors="pt")
        if self.prefix_suffix:  # PaliGemma labels its suffix, the answer
            batch = self.processor(text=[self._prompt(p, True) for p in prompts], suffix=list(captions), **common)
            labels = batch.pop("labels")
        else:
            batch = self.processor(text=[self._conversation(p, c) for p, c in zip(prompts, captions)],
                                   add_special_tokens=self.plain, **common)
            labels = self._caption_labels(batch, prompts, captions)
        if "qformer_input_ids" in batch:  # InstructBLIP: the Q-Former's instruction is the question, not the answer
            instruction = self.processor.qformer_tokenizer(list(prompts), padding=True, return_tensors="pt")
            batch["qformer_input_ids"], batch["qformer_attention_mask"] = (instruction["input_ids"],
                                                                           instruction["attention_mask"])
        ids = batch["input_ids"]
        dtype = next(self.model.parameters()).dtype
        inputs = {k: v.to(self.model.device, dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()}
        with LanguageModelInputs(self.model) as seen:
            out = self.model(**inputs, output_hidden_states=per_layer)
        embeds = seen[0]
        image_mask = torch.isin(ids, torch.tensor(self.placeholders)).to(embeds.device)
        caption = caption_mask(ids, labels, self.special_ids).to(embeds.device)
        hidden = None
        if per_layer:  # BLIP-2 keeps the LM's outputs apart
            hidden = getattr(out, "hidden_states", None) or out.language_model_outputs.hidden_states
        return GapInputs(embeds, embeds, image_mask, caption, hidden, image_mask, caption)

    def _caption_labels(self, batch, prompts: Sequence[str], captions: Sequence[str]):
        """``-100`` but on each caption's span in the right-padded batch."""
        import torch

        ids = batch["input_ids"]
        labels = torch.full_like(ids, -100)
        for row, (length, (after, n)) in enumerate(zip(batch["attention_mask"].sum(1).tolist(),
                                                       map(self._caption_span, prompts, captions))):
            labels[row, length - after - n:length - after] = ids[row, length - after - n:length - after]
        return labels
