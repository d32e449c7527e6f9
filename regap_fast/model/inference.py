"""Analysis and generation on a ``VisionLanguageModel``: the stage-1 input's embeddings, answers to requests."""

from __future__ import annotations

from typing import Sequence

import torch

from ..data import memo
from ..data.llava import IMAGE_PLACEHOLDER, Collator


class InferenceMixin:
    """``pair_embeddings``, ``chat_prompt`` and ``generate`` of ``VisionLanguageModel`` (no gradient; they
    use the model's tokenizer, encoder, image transform, projector, splice and LM)."""

    def _batch(self, examples: list[dict], padding_side: str = "right") -> dict:
        return Collator(self.tokenizer.pad_token_id, padding_side)(examples)

    @torch.no_grad()
    def pair_embeddings(self, images: Sequence, captions: Sequence[str], *, output_hidden_states: bool = False) -> dict:
        """Image tokens then the caption (the stage-1 input) through the model; see docs/model-api.md."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        enc = self.encoder("plain")
        examples = [dict(enc.encode([{"from": "gpt", "value": c}], has_image=True),
                         pixel_values=self.image_transform(im)) for im, c in zip(images, captions)]
        b = self._batch(examples)
        dev = self.device
        input_ids, image_pos, caption_pos = (b[k].to(dev)
                                             for k in ("input_ids", "image_mask", "caption_mask"))
        image_embeds = self.projector(self.encode_images(b["pixel_values"]))
        inputs_embeds = self.language_model.get_input_embeddings()(input_ids)
        # caption tokens gathered to the front of each row (a stable sort keeps their order), then padded
        nt = int(caption_pos.sum(1).max())
        order = torch.argsort((~caption_pos).to(torch.int8), dim=1, stable=True)[:, :nt]
        text_embeds = inputs_embeds.gather(1, order.unsqueeze(-1).expand(-1, -1, inputs_embeds.shape[-1]))
        text_mask = torch.arange(nt, device=dev) < caption_pos.sum(1, keepdim=True)
        # text_mask: the valid rows of text_embeds; image_mask / caption_mask: positions in the sequence
        out = {"image_embeds": image_embeds, "text_embeds": text_embeds, "text_mask": text_mask,
               "image_mask": image_pos, "caption_mask": caption_pos}
        if output_hidden_states:
            spliced = self._splice(inputs_embeds, image_embeds, image_pos)
            lm_out = self.language_model(inputs_embeds=spliced, use_cache=False, output_hidden_states=True,
                                         logits_to_keep=1)
            out["hidden_states"] = lm_out.hidden_states
        return out

    def chat_prompt(self, user_text: str, has_image: bool) -> str:
        """The chat template applied to one user turn, ``<image>`` where the image goes."""
        content = f"{IMAGE_PLACEHOLDER}\n{user_text}" if has_image else user_text
        tk = memo.tokenizer_key(self.tokenizer) if memo.enabled() else None
        return memo.cached(tk and (tk, "chat_prompt", content), lambda: self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True))

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], images: Sequence, *, max_new_tokens: int = 64, do_sample: bool = False,
                 temperature: float = 1.0, batch_size: int = 8, prefills: Sequence[str] | None = None) -> list[str]:
        """Answers to raw user requests (each with an image or None), batched with left padding.
        ``prefills``: per request, the start of the answer, forced (a prefill probe); what is returned is
        what the model writes after it."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
        if prefills is not None and len(prefills) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(prefills)} prefills")
        enc = self.encoder("chat")
        dev = self.device
        answers: list[str] = []
        pixels: dict[int, tuple] = {}  # id(image) -> (image, its pixels): requests often share an image object

        def transform(im):  # (the image is kept with its pixels: its id stays its own during the call)
            if id(im) not in pixels:
                pixels[id(im)] = (im, self.image_transform(im))
            return pixels[id(im)][1]

        for start in range(0, len(prompts), batch_size):
            examples = []
            forced = prefills[start:start + batch_size] if prefills is not None else [""] * len(prompts)
            for text, im, pre in zip(prompts[start:start + batch_size], images[start:start + batch_size], forced):
                # a literal placeholder typed by a user is text, not a request for an image
                prompt = self.chat_prompt(text.replace(IMAGE_PLACEHOLDER, "<image >"), im is not None)
                prompt += " " + pre.replace(IMAGE_PLACEHOLDER, "<image >") if pre else ""
                examples.append(dict(enc.encode_prompt(prompt),
                                     pixel_values=None if im is None else transform(im)))
            b = self._batch(examples, padding_side="left")
            input_ids, image_pos = b["input_ids"].to(dev), b["image_mask"].to(dev)
            embeds = self.language_model.get_input_embeddings()(input_ids)
            if b["pixel_values"] is not None:
                embeds = self._splice(embeds, self.projector(self.encode_images(b["pixel_values"])), image_pos)
            sampling = {"do_sample": True, "temperature": temperature} if do_sample else {"do_sample": False}
            out = self.language_model.generate(
                inputs_embeds=embeds, attention_mask=b["attention_mask"].to(dev), max_new_tokens=max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id, **sampling)
            answers += [a.strip() for a in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        return answers
