"""LLaVA-format image-caption data: records, image preprocessing, token sequences, batches.

A record (LLaVA-Pretrain ``blip_laion_cc_sbu_558k.json``, LLaVA-Instruct, ...)::

    {"id": "...", "image": "00000/000000010.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nDescribe the image."},
                       {"from": "gpt", "value": "a caption"}]}

The files are a JSON list, or JSON Lines (one record per line). Image paths are relative to an
image folder.

Bad data never stops a run: a malformed record is dropped when the file is read, and a record whose
image turns out to be missing, unreadable or truncated is replaced, when it is drawn, by the next
good record (a deterministic rule, so several processes and a resumed run still see the same
batches); every skip is reported with the batch and counted by the trainer.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from ..constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, PLAIN_SEPARATOR
from ..core import caption_mask
from . import memo

log = logging.getLogger(__name__)

# Vicuna v1's system prompt and conversation format, as LLaVA-1.5 uses them:
# "<system> USER: <image>\n... ASSISTANT: answer</s>"
VICUNA_SYSTEM_PROMPT = ("A chat between a curious human and an artificial intelligence assistant. "
                        "The assistant gives helpful, detailed, and polite answers to the human's questions.")
VICUNA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}" + VICUNA_SYSTEM_PROMPT + " {% endif %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }} "
    "{% elif message['role'] == 'user' %}USER: {{ message['content'] }} "
    "{% else %}ASSISTANT: {{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class TooManyBadRecords(RuntimeError):
    """LlavaDataset gives up: every record of a run of ``max_consecutive_bad`` (or of the whole, smaller
    set) is bad. A DataLoader worker re-raises it in the main process with the same type."""


class BadRecord(ValueError):
    """A record that cannot be used (the message says why); the data pipeline skips it."""


# --------------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------------


def check_record(rec) -> dict:
    """A well-formed record, normalised (image placeholder present when there is an image), or BadRecord."""
    if not isinstance(rec, dict):
        raise BadRecord(f"a record must be a JSON object, got {type(rec).__name__}")
    convs = rec.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise BadRecord("'conversations' must be a non-empty list")
    turns = []
    for turn in convs:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            raise BadRecord(f"each turn needs 'from' in {sorted(ROLES)} and a string 'value', got {turn!r:.120}")
        turns.append({"from": turn["from"], "value": turn["value"]})
    if not any(ROLES[t["from"]] == "assistant" for t in turns):
        raise BadRecord("no answer ('gpt') turn")
    image = rec.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise BadRecord(f"'image' must be a relative path, got {image!r:.120}")
    n_placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns)
    if image is None and n_placeholders:
        raise BadRecord(f"{IMAGE_PLACEHOLDER} in the text but no 'image'")
    if n_placeholders > 1:
        raise BadRecord(f"{n_placeholders} {IMAGE_PLACEHOLDER} placeholders; one image per record is supported")
    if image is not None and n_placeholders == 0:  # LLaVA puts the image before the first question
        users = [t for t in turns if ROLES[t["from"]] == "user"]
        if users:
            users[0]["value"] = IMAGE_PLACEHOLDER + "\n" + users[0]["value"]
        else:
            turns.insert(0, {"from": "human", "value": IMAGE_PLACEHOLDER})
    return {"id": str(rec.get("id", "")), "image": image, "conversations": turns}


def load_records(path: str | Path) -> tuple[list[dict], list[str]]:
    """Read a LLaVA-format JSON list or JSON Lines file: (good records, one message per dropped record).

    A file that is not JSON at all is an error (nothing could be trained on); a bad record or a bad
    line of a JSON Lines file is dropped and reported.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    raw: list = []
    problems: list[str] = []
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    raw.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    problems.append(f"{path}:{lineno}: not valid JSON ({exc.msg})")
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); the LLaVA format is a JSON list of records "
                             "(or use a .jsonl file with one record per line)") from None
        if not isinstance(raw, list):
            raise ValueError(f"{path} must hold a JSON list of records, got a {type(raw).__name__}")
    records = []
    for i, rec in enumerate(raw):
        try:
            rec = check_record(rec)
        except BadRecord as exc:
            problems.append(f"{path} record {i}: {exc}")
            continue
        rec["id"] = rec["id"] or f"{path.name}#{i}"
        records.append(rec)
    for msg in problems[:20]:
        log.warning("skipping malformed record: %s", msg)
    if len(problems) > 20:
        log.warning("... and %d more malformed records", len(problems) - 20)
    if not records:
        raise ValueError(f"{path} holds no usable record ({len(problems)} malformed)")
    return records, problems


# --------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("crop", "square")
ASPECT_MODES = ("keep", "pad")


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """The image centred on a square canvas of ``fill`` as wide as its longer side (LLaVA-1.5's
    ``image_aspect_ratio pad``: nothing is cropped away); an odd margin puts the extra row or column
    after the image."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def mean_colour(mean: Sequence[float]) -> tuple[int, int, int]:
    """The normalisation mean as an 8-bit colour, truncated as LLaVA computes its padding colour
    (so that a padded pixel normalises to about 0)."""
    return tuple(int(m * 255) for m in mean)


@dataclass(frozen=True)
class ImageTransform:
    """An image as the vision tower expects it: ``[3, size, size]`` normalised pixels (fp32).

    ``resize="crop"`` is CLIP's preprocessing, pixel for pixel what transformers'
    ``CLIPImageProcessor`` gives (its PIL implementation, the one LLaVA trained with): the shorter
    side to ``size`` with bicubic resampling and the longer side truncated to an integer, a centre
    crop, ``x / 255`` in float64 then fp32, then ``(x - mean) / std`` in fp32. ``resize="square"`` is
    BLIP-2's: the whole image to ``size`` x ``size`` (bicubic), then the same scaling. ``aspect="pad"``
    first centres the image on a square of the mean colour (LLaVA-1.5). Written out so that it does
    not change with transformers' image-processor classes and backends, and needs no torchvision.
    """

    size: int
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD
    resize: str = "crop"  # "crop": CLIP's (above); "square": straight to size x size, as BLIP-2's processor
    aspect: str = "keep"  # "keep": the image as it is; "pad": expand to a square with the mean colour first

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"unknown resize {self.resize!r}; choose one of {RESIZE_MODES}")
        if self.aspect not in ASPECT_MODES:
            raise ValueError(f"unknown image aspect mode {self.aspect!r}; choose one of {ASPECT_MODES}")

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        if self.aspect == "pad":
            image = expand_to_square(image, mean_colour(self.mean))
        image = image.resize(self.resized_size(*image.size), Image.Resampling.BICUBIC)
        w, h = image.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        return torch.from_numpy(self.normalise(np.asarray(image))).permute(2, 0, 1).contiguous()

    def resized_size(self, w: int, h: int) -> tuple[int, int]:
        """(width, height) before the crop: CLIP's shorter side to ``size``, the longer one
        ``int(size * long / short)`` (truncated, in this order of operations, as CLIPImageProcessor)."""
        if self.resize == "square":
            return self.size, self.size
        if w <= h:
            return self.size, int(self.size * h / w)
        return int(self.size * w / h), self.size

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """``[H, W, 3]`` uint8 -> fp32, with CLIPImageProcessor's rounding: the scaling in float64."""
        x = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
        return (x - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)


def open_image(path: Path) -> Image.Image:
    """The fully decoded image, or BadRecord (missing, unreadable, truncated)."""
    if not path.is_file():
        raise BadRecord(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not in a later step
            return im.convert("RGB")
    except Exception as exc:  # PIL raises many types for broken files; none may stop the run
        raise BadRecord(f"unreadable image {path}: {type(exc).__name__}: {exc}") from None


# --------------------------------------------------------------------------------------------------
# token sequences
# --------------------------------------------------------------------------------------------------


# LLaVA's stage-1 template (conversation.py ``conv_llava_plain``, train.py ``preprocess_plain``): the
# tokenizer's BOS, the image, the caption, then the template's separator (PLAIN_SEPARATOR); the question
# is dropped, the labels cover the caption and the separator, and no end-of-sequence token is added.


class Segment(NamedTuple):
    """A piece of a conversation. ``answer``: the model learns it (labels) and it is caption text;
    ``tail``: text right after it that the model also learns but that is not caption text (the plain
    format's separator), tokenised together with ``text`` as the reference implementations do."""

    text: str
    answer: bool = False
    tail: str = ""


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Encoder:
    """Turns a conversation into the model's token sequence, labels and masks.

    ``fmt="plain"`` (stage-1 pretraining), token for token LLaVA's ``preprocess_plain``::

        <bos> [image tokens] tokens(caption + "\\n")      labels: IGNORE ... IGNORE tokens(caption + "\\n")

    the question dropped, no end-of-sequence token (``plain_end=None``: the tokenizer's EOS instead
    of the separator). ``fmt="chat"`` (stage 2): the tokenizer's chat template, every assistant turn
    an answer (its end-of-turn token labelled too, so that the model learns to stop).

    The image is ``num_image_tokens`` slots (filled with the pad id; the model writes the projector
    outputs there); their labels are ``IGNORE_INDEX``, as are the prompt's.

    Caption tokens (REGAP's text side, ``caption_mask``) follow ``regap_fast.core.caption_mask``: the
    labelled tokens that are not special (BOS, EOS, ...), within the answer's own text: not the plain
    format's separator. An answer and its separator are tokenised together (as LLaVA does); the
    answer's text is the leading tokens that equal the caption tokenised alone, so a token that
    merges the caption's last characters with the separator does not count either.
    """

    def __init__(self, tokenizer, num_image_tokens: int, fmt: str = "plain", max_length: Optional[int] = None,
                 image_wrap: tuple[str, str] = ("", ""), plain_end: Optional[str] = PLAIN_SEPARATOR):
        if fmt not in ("plain", "chat"):
            raise ValueError(f"unknown prompt format {fmt!r}; choose 'plain' (stage 1) or 'chat' (stage 2)")
        if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("the 'chat' format needs a tokenizer with a chat template")
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.fmt = fmt
        self.max_length = max_length
        self.image_wrap = image_wrap  # text around the image slots (MiniGPT-4: "<Img>", "</Img>")
        self.plain_end = plain_end if plain_end is not None else (tokenizer.eos_token or "")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.special_ids = sorted(set(tokenizer.all_special_ids))
        # the tokenizer's and these settings' key in ``memo``, read on first use (a tokenizer it cannot key: None)
        self._memo_settings: Optional[tuple] = None
        self._memo_settings_read = False

    def _memo_key(self, *parts) -> Optional[tuple]:
        """The key of a result in the process-wide ``memo`` (None when it is off or cannot key this tokenizer)."""
        if not memo.enabled():
            return None
        if not self._memo_settings_read:
            self._memo_settings_read = True
            tk = memo.tokenizer_key(self.tokenizer)
            self._memo_settings = None if tk is None else (tk, self.num_image_tokens, self.fmt, self.max_length,
                                                           self.image_wrap, self.plain_end)
        return None if self._memo_settings is None else (self._memo_settings, *parts)

    @staticmethod
    def _copy(out: dict[str, list]) -> dict[str, list]:
        return {k: list(v) for k, v in out.items()}  # a memoised result is never handed out to be changed

    # -- text pieces ------------------------------------------------------------------------------

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    @staticmethod
    def _extend(out: dict, ids: list[int], labels: list[int], image: bool, text: list[bool]) -> None:
        """``text``: which of ``ids`` are an answer's own text (caption tokens if labelled and not special)."""
        out["input_ids"] += ids
        out["labels"] += labels
        out["image_mask"] += [image] * len(ids)
        out["caption_mask"] += text

    def _append_image(self, out: dict) -> None:
        before, after = self.image_wrap
        self._append_text(out, Segment(before))
        n = self.num_image_tokens
        self._extend(out, [self.pad_id] * n, [IGNORE_INDEX] * n, True, [False] * n)
        self._append_text(out, Segment(after))

    def _append_text(self, out: dict, seg: Segment) -> None:
        ids = self._ids(seg.text + seg.tail)
        n_caption = common_prefix_length(ids, self._ids(seg.text)) if seg.tail else len(ids)
        labels = list(ids) if seg.answer else [IGNORE_INDEX] * len(ids)
        self._extend(out, ids, labels, False, [k < n_caption for k in range(len(ids))])

    def _append(self, out: dict, seg: Segment) -> None:
        """Tokenise one segment; the placeholder becomes the image slots."""
        pieces = seg.text.split(IMAGE_PLACEHOLDER)
        for k, piece in enumerate(pieces):
            if k:
                self._append_image(out)
            last = k == len(pieces) - 1
            self._append_text(out, Segment(piece, seg.answer, seg.tail if last else ""))

    def _segments(self, conversations: Sequence[dict], has_image: bool) -> list[Segment]:
        if self.fmt == "plain":
            answer = next(t["value"] for t in conversations if ROLES[t["from"]] == "assistant")
            return [Segment(IMAGE_PLACEHOLDER if has_image else ""), Segment(answer, True, self.plain_end)]
        msgs = [{"role": ROLES[t["from"]], "content": t["value"]} for t in conversations]
        segments, done = [], ""
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prompt = self.render(msgs[:i], add_generation_prompt=True)
            full = self.render(msgs[:i + 1])
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise ValueError("the chat template does not render conversations as growing prefixes; "
                                 "cannot tell the answers from the prompts")
            segments += [Segment(prompt[len(done):]), Segment(full[len(prompt):], True)]
            done = full
        return segments

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # -- public -----------------------------------------------------------------------------------

    def encode_segments(self, segments: Sequence[tuple]) -> dict[str, list]:
        """Token sequence of ``Segment``s (or ``(text, answer[, tail])`` tuples), BOS first."""
        segments = [Segment(*s) for s in segments]
        out = {"input_ids": [], "labels": [], "image_mask": [], "caption_mask": []}
        bos = self.tokenizer.bos_token
        if bos and not (segments and segments[0].text.startswith(bos)):
            self._extend(out, [self.tokenizer.bos_token_id], [IGNORE_INDEX], False, [False])
        for seg in segments:
            self._append(out, seg)
        ids, labels = (torch.tensor([out[k]], dtype=torch.long) for k in ("input_ids", "labels"))
        text = torch.tensor([out["caption_mask"]], dtype=torch.bool)
        out["caption_mask"] = caption_mask(ids, labels, self.special_ids, within=text)[0].tolist()
        return out

    def encode(self, conversations: Sequence[dict], has_image: bool) -> dict[str, list]:
        """input_ids, labels, image_mask, caption_mask (lists of one length); BadRecord
        if the sequence cannot fit ``max_length``."""
        key = self._memo_key("encode", tuple((t["from"], t["value"]) for t in conversations), has_image)
        if key is None:
            return self._encode(conversations, has_image)
        return self._copy(memo.cached(key, lambda: self._encode(conversations, has_image)))

    def _encode(self, conversations: Sequence[dict], has_image: bool) -> dict[str, list]:
        out = self.encode_segments(self._segments(conversations, has_image))
        if self.max_length and len(out["input_ids"]) > self.max_length:
            if any(out["image_mask"][self.max_length:]):
                raise BadRecord(f"the image tokens end beyond max_length={self.max_length}")
            out = {k: v[:self.max_length] for k, v in out.items()}
        if all(label == IGNORE_INDEX for label in out["labels"]):
            raise BadRecord("no answer token left (empty answer, or cut by max_length)")
        return out

    def encode_prompt(self, text: str) -> dict[str, list]:
        """A prompt for generation (the chat template already applied): no answer."""
        key = self._memo_key("prompt", text)
        if key is None:
            return self.encode_segments([Segment(text)])
        return self._copy(memo.cached(key, lambda: self.encode_segments([Segment(text)])))


# --------------------------------------------------------------------------------------------------
# dataset, batches, sampling
# --------------------------------------------------------------------------------------------------


class LlavaDataset(Dataset):
    """Records -> examples (token sequence + pixel values). A bad record is replaced by the next
    good one (see the module docstring); ``example["skipped"]`` lists what was passed over."""

    def __init__(self, records: list[dict], image_folder: str | Path | None, transform: ImageTransform,
                 encoder: Encoder, max_consecutive_bad: int = 100, cache: bool = False):
        self.records = records
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.transform = transform
        self.encoder = encoder
        self.max_consecutive_bad = max_consecutive_bad
        # record index -> its example: loading (image decode, transform, chat template, tokeniser) is
        # deterministic, so a small dataset seen for many epochs need not repeat it. Each DataLoader
        # worker keeps its own cache.
        self._cache: dict[int, dict] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.records)

    def load(self, rec: dict) -> dict:
        pixel_values = None
        if rec["image"] is not None:
            if self.image_folder is None:
                raise BadRecord("the record has an image but no image folder was given")
            path = self.image_folder / rec["image"]
            key = memo.file_key(path) if memo.enabled() else None
            pixel_values = memo.cached(key and ("pixels", key, self.transform),
                                       lambda: self.transform(open_image(path)))
        ex = self.encoder.encode(rec["conversations"], has_image=pixel_values is not None)
        ex["pixel_values"] = pixel_values
        ex["id"] = rec["id"]
        return ex

    def __getitem__(self, index: int) -> dict:
        skipped = []
        for k in range(min(self.max_consecutive_bad, len(self.records))):
            i = (index + k) % len(self.records)
            rec = self.records[i]
            try:
                ex = self._cache[i] if self._cache is not None and i in self._cache else self.load(rec)
            except BadRecord as exc:
                skipped.append(f"{rec['id']}: {exc}")
                continue
            if self._cache is not None:
                self._cache[i] = ex
            return dict(ex, skipped=skipped)  # a new dict: the cached example is never changed
        raise TooManyBadRecords(f"{len(skipped)} bad record{'s' if len(skipped) != 1 else ''} in a row from index "
                                f"{index} (is the image folder right?); last: " + skipped[-1])


class Collator:
    """Pads examples into a batch (right padding for training, left for generation)."""

    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    def __call__(self, examples: list[dict]) -> dict:
        S = max(len(e["input_ids"]) for e in examples)
        fills = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX, "image_mask": False,
                 "caption_mask": False, "attention_mask": 0}
        rows = {k: [] for k in fills}
        for e in examples:
            n = len(e["input_ids"])
            e = dict(e, attention_mask=[1] * n)
            for k, fill in fills.items():
                pad = [fill] * (S - n)
                rows[k].append(e[k] + pad if self.padding_side == "right" else pad + e[k])
        batch = {k: torch.tensor(v, dtype=torch.bool if isinstance(fills[k], bool) else torch.long)
                 for k, v in rows.items()}
        pixels = [e["pixel_values"] for e in examples if e.get("pixel_values") is not None]
        batch["pixel_values"] = torch.stack(pixels) if pixels else None
        batch["ids"] = [e.get("id") for e in examples]
        batch["skipped"] = [s for e in examples for s in e.get("skipped", ())]
        return batch


class StepSampler(Sampler):
    """Micro-batches of indices for optimizer steps ``[start_step, total_steps)``.

    Step ``s`` takes positions ``[s*G, (s+1)*G)`` of an endless stream of seeded epoch permutations
    (``G`` = global batch); rank ``r`` of ``W`` takes the ``r``-th contiguous ``G/W`` of them, cut into
    micro-batches. So the samples of a step, and how they are grouped into micro-batches, depend only
    on the seed and the step: not on the number of processes, nor on where a run was resumed.
    """

    def __init__(self, num_samples: int, global_batch: int, micro_batch: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, start_step: int = 0, total_steps: int):
        if global_batch % (micro_batch * world_size):
            raise ValueError(f"global batch {global_batch} must be a multiple of micro batch x processes "
                             f"= {micro_batch} x {world_size}")
        self.n, self.G, self.mb = num_samples, global_batch, micro_batch
        self.rank, self.world = rank, world_size
        self.seed, self.start, self.total = seed, start_step, total_steps
        self._perm: tuple[int, torch.Tensor] | None = None

    def _epoch_perm(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def step_indices(self, step: int) -> list[int]:
        """The global batch of ``step`` (all ranks)."""
        out = []
        for p in range(step * self.G, (step + 1) * self.G):
            out.append(int(self._epoch_perm(p // self.n)[p % self.n]))
        return out

    def __iter__(self):
        per_rank = self.G // self.world
        for step in range(self.start, self.total):
            mine = self.step_indices(step)[self.rank * per_rank:(self.rank + 1) * per_rank]
            for m in range(0, per_rank, self.mb):
                yield mine[m:m + self.mb]

    def __len__(self) -> int:
        return (self.total - self.start) * (self.G // (self.mb * self.world))
