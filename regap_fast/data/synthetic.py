"""The embedded default data: coloured shapes rendered with Pillow, captions that describe them,
and an offline tokenizer trained on that language.

Everything is a deterministic function of a seed, so the demo, the tests and a fresh machine all
see the same images, captions and token ids, with no download.
"""

from __future__ import annotations

import functools
import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

from .llava import VICUNA_CHAT_TEMPLATE, VICUNA_SYSTEM_PROMPT

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (240, 220, 40),
           "purple": (150, 60, 200), "orange": (250, 140, 20), "pink": (250, 130, 190), "cyan": (40, 220, 230)}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
SIZES = {"small": 0.09, "large": 0.16}  # radius as a fraction of the image side
# a 3x3 grid of places, named as people name them
PLACES = {(0, 0): "in the top left corner", (1, 0): "at the top", (2, 0): "in the top right corner",
          (0, 1): "on the left", (1, 1): "in the center", (2, 1): "on the right",
          (0, 2): "in the bottom left corner", (1, 2): "at the bottom", (2, 2): "in the bottom right corner"}

# LLaVA-Pretrain asks for a brief description with varied wording; so do we.
PROMPTS = ("Describe the image briefly.", "What is in this picture?", "Give a short caption for the image.",
           "Summarize the visual content of the image.", "Write a terse description of the photo.")
BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        return [(cx + (r if k % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + k * math.pi / 5),
                 cy + (r if k % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    raise ValueError(shape)


def _describe(obj: dict) -> str:
    return f"a {obj['size']} {obj['colour']} {obj['shape']}"


def _caption(objects: list[dict], rng: random.Random) -> str:
    parts = [f"{_describe(o)} {PLACES[o['cell']]}" for o in objects]
    style = rng.randrange(3)
    if style == 0:
        return " and ".join(parts)
    if style == 1:
        return "there is " + " and ".join(parts)
    return "an image of " + " and ".join(parts)


def render_example(rng: random.Random, size: int = 64) -> tuple[Image.Image, str]:
    """One or two shapes in distinct grid cells on a plain grey background, and their caption."""
    cells = rng.sample(sorted(PLACES), rng.choice((1, 1, 2)))
    objects = [{"shape": rng.choice(SHAPES), "colour": rng.choice(sorted(COLOURS)),
                "size": rng.choice(sorted(SIZES)), "cell": c} for c in cells]
    grey = rng.randrange(70, 190)
    img = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(img)
    for o in objects:
        r = SIZES[o["size"]] * size
        jitter = size / 24
        cx = (o["cell"][0] + 0.5) * size / 3 + rng.uniform(-jitter, jitter)
        cy = (o["cell"][1] + 0.5) * size / 3 + rng.uniform(-jitter, jitter)
        colour = COLOURS[o["colour"]]
        if o["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.polygon(_shape_points(o["shape"], cx, cy, r), fill=colour)
    return img, _caption(objects, rng)


def captions(n: int, seed: int = 0) -> list[str]:
    """The captions of ``write_dataset(n, seed)`` without rendering any image."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        _, cap = render_example(rng, size=8)  # same RNG draws as full size; the tiny image is thrown away
        rng.choice(PROMPTS)
        out.append(cap)
    return out


def write_dataset(out_dir: str | Path, n: int = 3000, seed: int = 0, image_size: int = 64,
                  name: str = "shapes.json") -> Path:
    """Render ``n`` image-caption pairs into ``out_dir/images`` and list them in ``out_dir/name``
    in the LLaVA pretraining format. Returns the JSON's path; an existing identical set is reused."""
    out_dir = Path(out_dir)
    json_path = out_dir / name
    stamp = {"n": n, "seed": seed, "image_size": image_size}
    stamp_path = out_dir / (name + ".stamp")
    if json_path.exists() and stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp:
        return json_path
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        img, cap = render_example(rng, image_size)
        rel = f"images/{i:06d}.png"
        img.save(out_dir / rel)
        records.append({"id": f"shapes-{i:06d}", "image": rel, "conversations": [
            {"from": "human", "value": "<image>\n" + rng.choice(PROMPTS)},
            {"from": "gpt", "value": cap}]})
    tmp = json_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(records, indent=0))
    tmp.replace(json_path)
    stamp_path.write_text(json.dumps(stamp))
    return json_path


def tokenizer_corpus(seed: int = 0, n: int = 4000) -> list[str]:
    """Text the default tokenizer is trained on: captions, prompts and the chat template's words."""
    texts = captions(n, seed)
    texts += list(PROMPTS) * 20 + [VICUNA_SYSTEM_PROMPT, "USER: ASSISTANT:"] * 20
    # every word the generator can say, so that none is split into bytes by chance
    words = list(COLOURS) + list(SHAPES) + list(SIZES) + [w for p in PLACES.values() for w in p.split()]
    texts += [" ".join(words)] * 20
    return texts


@functools.lru_cache(maxsize=4)
def _trained_bpe(vocab_size: int, seed: int) -> str:
    """The trained tokenizer as JSON (cached: every caller gets its own object built from it)."""
    return _train_bpe(tokenizer_corpus(seed), vocab_size)


def _train_bpe(texts, vocab_size: int) -> str:
    """A byte-level BPE trained on ``texts``, as JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str()


def _wrap_tokenizer(tokenizer_json: str):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(tokenizer_json)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                 model_max_length=2048)
    hf.chat_template = VICUNA_CHAT_TEMPLATE
    return hf


def default_tokenizer(vocab_size: int = 512, seed: int = 0):
    """A byte-level BPE tokenizer trained offline on the synthetic language, with a chat template.

    Byte-level: any text (a safety prompt, an unknown word) still encodes, so the tools that feed the
    tiny model arbitrary requests work. Returns a transformers ``PreTrainedTokenizerFast``.
    """
    return _wrap_tokenizer(_trained_bpe(vocab_size, seed))


def train_tokenizer(texts, vocab_size: int = 512):
    """The same kind of tokenizer as ``default_tokenizer`` (byte-level BPE, the same special tokens, the
    Vicuna chat template), trained offline on ``texts``: for a language of your own (``regap-fast
    reproduce`` trains one on its toy language). Deterministic for the same texts."""
    return _wrap_tokenizer(_train_bpe(list(texts), vocab_size))
