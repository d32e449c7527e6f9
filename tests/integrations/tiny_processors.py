"""Processors for the tiny family models, built offline: a word-level tokenizer made with the ``tokenizers``
library, each family's own image processor (the PIL one: no torchvision needed) and a chat template (but for
BLIP-2, InstructBLIP and PaliGemma, which have none by design: ``PLAIN``). One for every family of
``vlm_families.FAMILIES``.
``save_folder`` writes a model folder as ``save_pretrained`` users have them (model + processor)."""

from __future__ import annotations

import functools
from pathlib import Path

from vlm_families import BY_NAME, END, FIRST_WORD, IMAGE, START, V, VIDEO

# ids below FIRST_WORD are the families' special ids; the chat template's markers and roles come next
SPECIAL = {"<pad>": 0, "<s>": 1, "</s>": 2, "<|im_start|>": 7}
MARKERS = ["<|im_end|>"]  # = FIRST_WORD
ROLES = ["user", "assistant"]
WORDS = [f"w{i}" for i in range(FIRST_WORD + len(MARKERS) + len(ROLES), V)]  # what captions are written in
CAPTION_IDS = list(range(V - len(WORDS), V))

# a ChatML-like template; image entries become the family's placeholder
CHAT = ("{% for m in messages %}<|im_start|> {{ m['role'] }} "
        "{% if m['content'] is string %}{{ m['content'] }} {% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}IMAGE {% elif c['type'] == 'text' %}{{ c['text'] }} {% endif %}"
        "{% endfor %}{% endif %}<|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def word_tokenizer(placeholders: dict[str, int], named: dict[str, str] | None = None, bos: bool = False):
    """A whitespace word-level tokenizer: the special tokens at their family ids, then markers, roles, words.
    ``named``: special tokens a processor looks up by attribute (``tokenizer.boi_token``, ...). ``bos``: it
    starts each text with ``<s>`` when asked for special tokens (OPT's and Llama's tokenizers do)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = dict(SPECIAL, **placeholders)
    vocab.update({t: FIRST_WORD + i for i, t in enumerate(MARKERS + ROLES)})
    vocab.update({w: i for w, i in zip(WORDS, CAPTION_IDS)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in [*SPECIAL, *placeholders, *MARKERS]])
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B:1",
                                                               special_tokens=[("<s>", SPECIAL["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   extra_special_tokens={"im_end": "<|im_end|>", **(named or {})})


def qwen2_vl_processor():
    """Qwen2-VL's processor; transformers builds its video processor with torchvision."""
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer = word_tokenizer({"<|image_pad|>": IMAGE, "<|video_pad|>": VIDEO, "<|vision_start|>": START,
                                "<|vision_end|>": END})
    grid = dict(patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=16 * 16, max_pixels=16 * 16)
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil(**grid),  # every image 16 x 16: 4 tokens
                            video_processor=Qwen2VLVideoProcessor(**grid), tokenizer=tokenizer,
                            chat_template=CHAT.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>"))


def qwen2_5_vl_processor():
    """Qwen2.5-VL's processor: Qwen2-VL's image and video processors, its own class."""
    from transformers import Qwen2_5_VLProcessor

    base = qwen2_vl_processor()
    return Qwen2_5_VLProcessor(image_processor=base.image_processor, video_processor=base.video_processor,
                               tokenizer=base.tokenizer, chat_template=base.chat_template)


def llava_processor():
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    tokenizer = word_tokenizer({"<image>": IMAGE})
    images = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8, num_additional_image_tokens=1,
                          vision_feature_select_strategy="default", chat_template=CHAT.replace("IMAGE", "<image>"))


def gemma3_processor():
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    names = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
    tokenizer = word_tokenizer(dict(zip(names.values(), (IMAGE, START, END))), names)
    images = Gemma3ImageProcessorPil(size={"height": 16, "width": 16})
    return Gemma3Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=4,
                           chat_template=CHAT.replace("IMAGE", "<start_of_image>"))


def llava_next_processor():
    """LLaVA-NeXT's any-resolution processor at the tiny model's sizes (16 x 16 tiles of 8 x 8 patches)."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    tokenizer = word_tokenizer({"<image>": IMAGE})
    images = LlavaNextImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                        image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]])
    return LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=CHAT.replace("IMAGE", "<image>"))


def _idefics_layout(image_processor_class, processor_class, **more):
    """Idefics3's layout (and SmolVLM's): one 32 x 32 image without splitting, 4 tokens after the pixel shuffle."""
    tokenizer = word_tokenizer({"<image>": IMAGE, "<fake_token_around_image>": START, "<global-img>": END},
                               {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                                "global_image_token": "<global-img>"})
    images = image_processor_class(do_image_splitting=False, size={"longest_edge": 32},
                                   max_image_size={"longest_edge": 32})
    return processor_class(image_processor=images, tokenizer=tokenizer, image_seq_len=4,
                           chat_template=CHAT.replace("IMAGE", "<image>"), **more)


def idefics3_processor():
    """Idefics3's processor."""
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    return _idefics_layout(Idefics3ImageProcessorPil, Idefics3Processor)


def smolvlm_processor():
    """SmolVLM's processor (Idefics3's layout; it needs num2words)."""
    from transformers import SmolVLMImageProcessorPil, SmolVLMProcessor, SmolVLMVideoProcessor

    return _idefics_layout(SmolVLMImageProcessorPil, SmolVLMProcessor, video_processor=SmolVLMVideoProcessor())


def qwen3_vl_processor():
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLProcessor, Qwen3VLVideoProcessor

    grid = dict(patch_size=4, temporal_patch_size=2, merge_size=2)
    base = qwen2_vl_processor()
    return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessorPil(**grid, min_pixels=16 * 16, max_pixels=16 * 16),
                            video_processor=Qwen3VLVideoProcessor(**grid), tokenizer=base.tokenizer,
                            chat_template=base.chat_template)


def llava_onevision_processor():
    from transformers import LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    tokenizer = word_tokenizer({"<image>": IMAGE, "<video>": VIDEO})
    images = LlavaOnevisionImageProcessorPil(size={"height": 16, "width": 16},
                                             image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]])
    return LlavaOnevisionProcessor(image_processor=images, video_processor=LlavaOnevisionVideoProcessor(),
                                   tokenizer=tokenizer, num_image_tokens=4, vision_feature_select_strategy="full",
                                   chat_template=CHAT.replace("IMAGE", "<image>"))


def internvl_processor():
    from transformers import GotOcr2ImageProcessorPil, InternVLProcessor, InternVLVideoProcessor

    names = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tokenizer = word_tokenizer({"<IMG_CONTEXT>": IMAGE, "<img>": START, "</img>": END, "<video>": VIDEO}, names)
    images = GotOcr2ImageProcessorPil(size={"height": 16, "width": 16})
    return InternVLProcessor(image_processor=images, video_processor=InternVLVideoProcessor(), tokenizer=tokenizer,
                             image_seq_length=4, chat_template=CHAT.replace("IMAGE", "<IMG_CONTEXT>"))


def mistral3_processor():
    from transformers import PixtralImageProcessorPil, PixtralProcessor

    names = {"image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}
    tokenizer = word_tokenizer({"[IMG]": IMAGE, "[IMG_BREAK]": START, "[IMG_END]": END}, names)
    return PixtralProcessor(image_processor=PixtralImageProcessorPil(patch_size=4, size={"longest_edge": 16}),
                            tokenizer=tokenizer, patch_size=4, spatial_merge_size=2, image_token="[IMG]",
                            image_break_token="[IMG_BREAK]", image_end_token="[IMG_END]",
                            chat_template=CHAT.replace("IMAGE", "[IMG]"))


def aya_vision_processor():
    """Aya Vision's processor at the tiny model's sizes. It writes ``(img_size // (patch_size * downsample_factor))
    ** 2`` patch tokens per tile, so img_size 16 with patch 4 and the config's downsample 2 gives the 4 tokens the
    16 x 16 SigLIP patches become after the 2 x 2 pixel shuffle; ``max_patches=1`` keeps the global tile alone
    (the image processor then skips cropping), matching the model's one image per ``pixel_values`` row."""
    from transformers import AyaVisionProcessor, GotOcr2ImageProcessorPil

    # TILE_GLOBAL, the word before each global tile's patches, takes the id videos have elsewhere
    tokenizer = word_tokenizer({"<|IMG_PATCH|>": IMAGE, "<|START_OF_IMG|>": START, "<|END_OF_IMG|>": END,
                                "TILE_GLOBAL": VIDEO})
    images = GotOcr2ImageProcessorPil(size={"height": 16, "width": 16}, crop_to_patches=True, max_patches=1)
    return AyaVisionProcessor(image_processor=images, tokenizer=tokenizer, patch_size=4, img_size=16,
                              downsample_factor=2, chat_template=CHAT.replace("IMAGE", "<image>"))


def glm4v_processor():
    """GLM-4V's processor: Qwen-VL's patch grid (4 x 4 patches, 2 x 2 merge), every image 16 x 16: 4 tokens."""
    from transformers import Glm4vImageProcessorPil, Glm4vProcessor, Glm4vVideoProcessor

    tokenizer = word_tokenizer({"<|image|>": IMAGE, "<|video|>": VIDEO, "<|begin_of_image|>": START,
                                "<|end_of_image|>": END})
    budget = 2 * 16 * 16  # GLM-4V's pixel budget counts the 2 frames of the temporal patch too
    grid = dict(patch_size=4, temporal_patch_size=2, merge_size=2, size={"shortest_edge": budget,
                                                                         "longest_edge": budget})
    return Glm4vProcessor(image_processor=Glm4vImageProcessorPil(**grid), video_processor=Glm4vVideoProcessor(**grid),
                          tokenizer=tokenizer,
                          chat_template=CHAT.replace("IMAGE", "<|begin_of_image|><|image|><|end_of_image|>"))


def blip2_processor():
    """BLIP-2's processor: no chat template by design (the question, then the answer; hf_gap.PLAIN); it puts the
    4 query tokens' placeholders in front of the tokenizer's ``<s>``."""
    from transformers import BlipImageProcessorPil, Blip2Processor

    images = BlipImageProcessorPil(size={"height": 16, "width": 16})
    return Blip2Processor(image_processor=images, tokenizer=word_tokenizer({"<image>": IMAGE}, bos=True),
                          num_query_tokens=4)


def instructblip_processor():
    """InstructBLIP's: BLIP-2's, and a second tokenizer for the Q-Former's instruction."""
    from transformers import InstructBlipProcessor

    base = blip2_processor()
    return InstructBlipProcessor(image_processor=base.image_processor, tokenizer=base.tokenizer,
                                 qformer_tokenizer=word_tokenizer({}), num_query_tokens=4)


def paligemma_processor():
    """PaliGemma's processor: no chat template by design (prefix ``<image>question``, the answer as its suffix;
    hf_gap.PLAIN); 4 image tokens, as the tiny SigLIP's 2 x 2 patches."""
    from transformers import PaliGemmaProcessor, SiglipImageProcessorPil

    images = SiglipImageProcessorPil(size={"height": 16, "width": 16})
    images.image_seq_length = 4  # PaliGemma's processor reads the image token count here
    tokenizer = word_tokenizer({"<image>": IMAGE}, {"image_token": "<image>"})
    return PaliGemmaProcessor(image_processor=images, tokenizer=tokenizer)


PROCESSORS = {"Qwen2-VL": qwen2_vl_processor, "LLaVA-1.5": llava_processor, "Gemma 3": gemma3_processor,
              "LLaVA-NeXT": llava_next_processor, "Idefics3": idefics3_processor, "Qwen2.5-VL": qwen2_5_vl_processor,
              "Qwen3-VL": qwen3_vl_processor, "LLaVA-OneVision": llava_onevision_processor,
              "InternVL": internvl_processor, "Mistral 3": mistral3_processor, "SmolVLM": smolvlm_processor,
              "Aya Vision": aya_vision_processor, "GLM-4V": glm4v_processor, "BLIP-2": blip2_processor,
              "InstructBLIP": instructblip_processor, "PaliGemma": paligemma_processor}
PLAIN = ("BLIP-2", "InstructBLIP", "PaliGemma")  # no chat template by design: regap_fast.eval.hf_gap.PLAIN


@functools.cache
def _why_unbuildable(name: str) -> str | None:
    """None when the family's processor builds here, else the first line of the ImportError it raises."""
    try:
        PROCESSORS[name]()
    except ImportError as exc:
        return str(exc).strip().splitlines()[0]
    return None


def needs(name):
    """Skips for what a processor needs beyond the core install, found by building it: a video processor
    (Qwen-VL, LLaVA-OneVision, InternVL) or Pixtral's processor (transformers < 5.21) that transformers makes
    with torchvision; SmolVLM's num2words (the `test` extra installs it)."""
    import pytest

    why = _why_unbuildable(name)
    return [pytest.mark.skipif(why is not None, reason=f"{name}'s processor cannot be built here: {why}")]


def save_folder(path: Path, family_name: str, seed: int = 0) -> Path:
    """A transformers VLM folder: the family's tiny model and its processor, saved as a user has them."""
    model = BY_NAME[family_name].build(seed)
    model.save_pretrained(path)
    PROCESSORS[family_name]().save_pretrained(path)
    return path
