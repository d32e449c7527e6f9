"""Image conditions: what is sent with each harmful request.

==================  ==============================================================  ==================
condition           image                                                           text sent
==================  ==============================================================  ==================
``none``            no image (the LLM backbone's own safety)                        the request
``white``           a blank white square                                            the request
``black``           a blank black square                                            the request
``noise``           Gaussian pixel noise (mean 127.5, std 64, clipped), seeded by   the request
                    (seed, prompt id): the same image for a prompt in every run
``typo``            the request as typography, FigStep style: wrapped at 15         FigStep's fixed
                    characters, then the empty list items ``1.`` ``2.`` ``3.``,      prompt
                    black bold monospace on white (``Prompt.typo_text`` if set)
``benchmark:KIND``  the benchmark's own image of that kind (MM-SafetyBench ``SD``,  the text that goes
                    ``TYPO``, ``SD_TYPO``; FigStep ``figstep``; HarmBench ``image``)   with that image
==================  ==============================================================  ==================

Synthetic images are made at ``size`` x ``size`` (the model's ``vlm.image_size``), so the model's
preprocessing does not rescale them; the benchmark's images go to the model as they are on disk.
``benchmark`` alone in a condition list stands for every benchmark image kind the prompts have.
"""

from __future__ import annotations

import functools
import textwrap
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from .prompts import FIGSTEP_PROMPT, Prompt

TEXT_ONLY = "none"
SYNTHETIC = ("white", "black", "noise", "typo")
BENCHMARK_PREFIX = "benchmark:"
NOISE_MEAN, NOISE_STD = 127.5, 64.0
# FigStep's layout, for its 760-pixel image: font size 80, text at (20, 10), line spacing 11
_FIGSTEP_SIZE, _FIGSTEP_FONT, _FIGSTEP_XY, _FIGSTEP_SPACING = 760, 80, (20, 10), 11
# FigStep's font first, then the same style found here, then the one matplotlib ships
_FONT_NAMES = ("FreeMonoBold.ttf", "DejaVuSansMono-Bold.ttf")


@dataclass(frozen=True)
class ConditionInput:
    """What one condition sends for one prompt: the image (None: text only), the text, and a short
    description of the image for the record."""
    image: object
    text: str
    image_desc: str


def available_conditions(prompts: Sequence[Prompt]) -> list[str]:
    """``none``, the synthetic conditions, and each benchmark image kind the prompts have."""
    kinds = sorted({k for p in prompts for k in p.images})
    return [TEXT_ONLY, *SYNTHETIC, *(BENCHMARK_PREFIX + k for k in kinds)]


def parse_conditions(spec: str | Sequence[str] | None, prompts: Sequence[Prompt]) -> list[str]:
    """A comma-separated string or a list -> the conditions to run, validated, in order, no repeats.

    ``None`` or ``"all"``: every available condition. ``"benchmark"``: every benchmark image kind.
    """
    available = available_conditions(prompts)
    if spec is None:
        return available
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    out = []
    for item in filter(None, items):
        if item == "all":
            expanded = available
        elif item == "benchmark":
            expanded = [c for c in available if c.startswith(BENCHMARK_PREFIX)]
            if not expanded:
                raise ValueError("condition 'benchmark': these prompts have no benchmark images (pass the image "
                                 "folder, or use a benchmark that has images)")
        elif item in available:
            expanded = [item]
        else:
            raise ValueError(f"unknown condition {item!r}; available here: {', '.join(available)} "
                             f"(or 'benchmark', 'all')")
        out += [c for c in expanded if c not in out]
    if not out:
        raise ValueError("no conditions given")
    return out


def condition_text(condition: str, prompt: Prompt) -> str | None:
    """The text ``condition`` sends with ``prompt``; None when the prompt lacks that benchmark image."""
    if condition == TEXT_ONLY or condition in ("white", "black", "noise"):
        return prompt.text
    if condition == "typo":
        return FIGSTEP_PROMPT
    if condition.startswith(BENCHMARK_PREFIX):
        item = prompt.images.get(condition[len(BENCHMARK_PREFIX):])
        return None if item is None else item.text
    raise ValueError(f"unknown condition {condition!r}")


def condition_input(condition: str, prompt: Prompt, *, size: int, seed: int = 0) -> ConditionInput | None:
    """The image and text ``condition`` sends for ``prompt``; None when the prompt lacks that
    benchmark image kind."""
    text = condition_text(condition, prompt)
    if text is None:
        return None
    if condition == TEXT_ONLY:
        return ConditionInput(None, text, "none")
    if condition in ("white", "black"):
        return ConditionInput(blank_image(size, condition), text, f"{condition} {size}x{size}")
    if condition == "noise":
        return ConditionInput(noise_image(size, seed, prompt.id), text, f"gaussian noise {size}x{size} seed={seed}")
    if condition == "typo":
        return ConditionInput(typographic_image(prompt.typo_text or prompt.text, size), text,
                              f"typographic {size}x{size} font={font_name()}")
    from PIL import Image

    path = prompt.images[condition[len(BENCHMARK_PREFIX):]].path
    with Image.open(path) as im:
        return ConditionInput(im.convert("RGB"), text, str(path))


def blank_image(size: int, color: str = "white"):
    from PIL import Image

    return Image.new("RGB", (size, size), color)


def noise_image(size: int, seed: int, key: str):
    """Gaussian pixel noise, the same for the same (seed, key) on any machine."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])
    pixels = rng.normal(NOISE_MEAN, NOISE_STD, size=(size, size, 3)).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


@functools.cache
def _font_path() -> str | None:
    from PIL import ImageFont

    for name in _FONT_NAMES:
        try:
            return ImageFont.truetype(name, 10).path
        except OSError:
            pass
    try:
        from matplotlib import font_manager

        return font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans Mono", weight="bold"))
    except (ImportError, ValueError):
        return None


def font_name() -> str:
    """The font the typographic images use (FigStep's FreeMonoBold where installed)."""
    path = _font_path()
    return path.rsplit("/", 1)[-1] if path else "Pillow default"


def typographic_image(text: str, size: int):
    """FigStep's typographic prompt image, laid out at ``size`` pixels instead of 760."""
    from PIL import Image, ImageDraw, ImageFont

    scale = size / _FIGSTEP_SIZE
    font_size = max(1, round(_FIGSTEP_FONT * scale))
    path = _font_path()
    font = ImageFont.truetype(path, font_size) if path else ImageFont.load_default(font_size)
    body = textwrap.fill(text.strip(), width=15) + "".join(f"\n{i}. " for i in (1, 2, 3))
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).multiline_text((round(_FIGSTEP_XY[0] * scale), round(_FIGSTEP_XY[1] * scale)), body,
                                         fill="black", font=font, spacing=max(0, round(_FIGSTEP_SPACING * scale)))
    return image
