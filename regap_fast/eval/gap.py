"""``regap-fast gap``: the modality gap of a LLaVA-style model over image-caption pairs.

The per-sample gap is the quantity REGAP trains on, computed by the same op
(``regap_fast.fused_gap_loss(..., reduction="none")``) on the embeddings the model gives
(``vlm.pair_embeddings``): ``|| mean_i E_img[b, i] - mean_t E_txt[b, t] ||_2`` over the image tokens
(projector outputs) and the caption tokens (LLM input embeddings) of pair b. Reported with it:

* its distribution: mean, std, min, max, quantiles, histogram;
* the dataset-level centroids: ``c_img`` = the mean over pairs of the per-pair image means,
  ``c_txt`` likewise; their distance ``||c_img - c_txt||`` and cosine similarity;
* the mean cosine similarity of the two per-pair means;
* the same at every LM layer from the hidden states (layer 0 = the input embeddings, so its gap is
  the input gap above; as transformers returns them, the last one is after the LM's final norm):
  image-token positions against caption-token positions.

MODEL is one of the library's own model (or run) folders, or a transformers VLM folder with its processor
(``hf_gap``: the model's own processor and chat template, the record's question as the user turn).
"""

from __future__ import annotations

import argparse
import csv
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ._cli import (add_image_folder_argument, add_model_arguments, add_progress_argument, device_and_dtype,
                   load_vlm, show_progress)
from .hf_gap import GapInputs
from .stats import summarize

GAP_JSON, GAP_PNG, MIR_PNG, GAP_SAMPLES = "gap.json", "gap.png", "mir.png", "gap_samples.csv"
# MIR's outlier rule streams the rows again (up to 4 more passes): the first pass's rows are kept for them
# while they fit in this many bytes, so that the model runs over the pairs once; larger sets run it again
MIR_REPLAY_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Pair:
    """An image (a path or a PIL image), its caption, and the question asked about it (the record's human
    turn without the placeholder; a transformers VLM's user turn, unused by the library's own models)."""
    id: str
    image: object
    caption: str
    prompt: str = ""


def load_pairs(path, images=None, limit: int | None = None) -> list[Pair]:
    """Image-caption pairs in the LLaVA pretraining format (read by the trainer's own parser).

    ``path``: a JSON list (or JSONL) of ``{"id", "image", "conversations": [{"from": "human", ...},
    {"from": "gpt", "value": caption}]}``; ``images``: the folder the ``image`` entries are relative
    to (default: the JSON's folder). The caption is the first answer turn. Malformed records, records
    without an image and records whose image file is missing are skipped with a warning.
    """
    from regap_fast.constants import IMAGE_PLACEHOLDER
    from regap_fast.data.llava import ROLES, load_records

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file not found: {path}")
    root = Path(images) if images is not None else path.parent
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    records, _ = load_records(path)  # malformed records are dropped and logged there
    pairs, text_only, missing = [], 0, []
    for rec in records:
        if rec["image"] is None:
            text_only += 1
            continue
        image = root / rec["image"]
        if not image.is_file():
            missing.append(str(image))
            continue
        caption = next(t["value"] for t in rec["conversations"] if ROLES[t["from"]] == "assistant")
        question = next((t["value"] for t in rec["conversations"] if ROLES[t["from"]] == "user"), "")
        pairs.append(Pair(rec["id"], image, caption.strip(), question.replace(IMAGE_PLACEHOLDER, "").strip()))
        if limit is not None and len(pairs) >= limit:
            break
    if text_only:
        warnings.warn(f"{text_only} records without an image skipped", stacklevel=2)
    if missing:
        warnings.warn(f"{len(missing)} records skipped: image not found (first: {missing[0]})", stacklevel=2)
    if not pairs:
        raise ValueError(f"{path}: no usable image-caption pairs (images looked up under {root})")
    return pairs


def _open(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as im:
        return im.convert("RGB")


class _Centroids:
    """Running sums of the per-pair means of one layer, for the dataset-level centroids."""

    def __init__(self):
        self.image = self.text = None
        self.gaps, self.cosines = [], []

    def add(self, mu_image, mu_text, gaps, valid):
        import torch

        mu_image, mu_text = mu_image.double().cpu()[valid], mu_text.double().cpu()[valid]
        if self.image is None:
            self.image, self.text = mu_image.sum(0), mu_text.sum(0)
        else:
            self.image += mu_image.sum(0)
            self.text += mu_text.sum(0)
        self.gaps += gaps[valid].double().cpu().tolist()
        self.cosines += torch.nn.functional.cosine_similarity(mu_image, mu_text, dim=-1).tolist()

    def result(self) -> dict:
        import torch

        n = len(self.gaps)
        if n == 0:
            return {"n": 0}
        c_image, c_text = self.image / n, self.text / n
        return {"centroid_distance": float(torch.linalg.vector_norm(c_image - c_text)),
                "centroid_cosine": float(torch.nn.functional.cosine_similarity(c_image, c_text, dim=0)),
                "pair_cosine_mean": sum(self.cosines) / n}


METRICS = ("l2", "mir", "both")


def measure_gap(vlm, pairs: Sequence, *, batch_size: int = 16, per_layer: bool = True, progress: bool = True,
                bins: int = 30, metric: str = "l2") -> dict:
    """The modality gap of ``vlm`` over ``pairs`` (``Pair`` or ``(image, caption)``; image: path or PIL).

    ``vlm``: the library's ``VisionLanguageModel`` or an ``hf_gap.TransformersVLM``. ``metric``: ``l2`` (the
    distance REGAP trains on), ``mir`` (the REGAP paper's measure, ``regap_fast.eval.mir``) or ``both``.
    With ``l2``, returns ``{"n_pairs", "n_skipped", "gap": {mean, std, min, max, quantiles, histogram},
    "centroid_distance", "centroid_cosine", "pair_cosine_mean", "per_layer": [{"layer", "gap_mean", "gap_std",
    "centroid_distance", "centroid_cosine", "pair_cosine_mean"}, ...] (None without per_layer), "samples":
    [{"id", "gap"}, ...]}``; with ``mir``, ``"mir": {"value", "per_layer": [...], ...}`` (the image-token
    and caption-token hidden states after every decoder layer; the pairs are streamed again only if the
    outlier rule fires). A pair whose image cannot be read, or with no image or caption token, is skipped and
    counted in ``n_skipped``.
    """
    import torch
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if metric not in METRICS:
        raise ValueError(f"unknown gap metric {metric!r}; choose one of {METRICS}")
    pairs = [p if isinstance(p, Pair) else Pair(str(i), p[0], p[1]) for i, p in enumerate(pairs)]
    if not pairs:
        raise ValueError("no pairs to measure")
    l2, with_mir, mir = metric in ("l2", "both"), metric in ("mir", "both"), None
    replay, replay_bytes = [], 0  # the MIR rows of each batch, while they fit in MIR_REPLAY_BYTES
    inputs, layers, samples, skipped = _Centroids(), [], [], 0
    bar = tqdm(total=len(pairs), desc="gap", unit="pair", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch, images = _readable(chunk)
        skipped += len(chunk) - len(batch)
        bar.update(len(chunk))
        if not batch:
            continue
        with torch.inference_mode():
            x = _gap_inputs(vlm, batch, images, per_layer or with_mir)
            layers = layers or [_Centroids() for _ in x.hidden or ()]
            gaps, valid = _measure_batch(x, inputs, layers)
            if with_mir:
                mir = mir or _mir_accumulator(x)
                rows = _add_mir(mir, x, valid)
                replay_bytes += sum(t.numel() * t.element_size() for layer in rows for t in layer)
                if replay is not None and replay_bytes <= MIR_REPLAY_BYTES:
                    replay.append(rows)
                else:
                    replay = None
        skipped += int((~valid).sum())
        samples += [{"id": p.id, "gap": float(g)} for p, g, ok in zip(batch, gaps, valid) if ok]
    bar.close()
    if not samples:
        raise ValueError("no pair could be measured (no readable image with image and caption tokens)")
    result = _summary(inputs, layers if per_layer else None, samples, skipped, bins)
    if mir is not None:
        result["mir"] = _finish_mir(vlm, mir, pairs, batch_size, progress, replay)
    if not l2:  # MIR alone: the pair counts and the per-pair ids, not the L2 numbers
        result = {k: result[k] for k in ("n_pairs", "n_skipped", "mir", "samples")}
        result["samples"] = [{"id": s["id"]} for s in samples]
    return result


def _mir_accumulator(x: GapInputs):
    from .mir import MIRAccumulator

    if not x.hidden or len(x.hidden) < 2:
        raise ValueError("MIR needs the hidden states after the decoder layers; the model returned none")
    return MIRAccumulator(len(x.hidden) - 1)


def _add_mir(acc, x: GapInputs, valid) -> list[tuple]:
    """The image-token and caption-token rows of the measured pairs after each decoder layer (the input
    embeddings, hidden state 0, are not used: as the published MIR); returns them, per layer."""
    keep = valid.to(x.hidden_image_mask.device)[:, None]
    image, caption = x.hidden_image_mask & keep, x.hidden_caption_mask & keep
    rows = [(h[image.to(h.device)], h[caption.to(h.device)]) for h in x.hidden[1:]]
    for layer, (image_rows, caption_rows) in enumerate(rows):
        acc.add(layer, image_rows, caption_rows)
    return rows


def _finish_mir(vlm, acc, pairs: Sequence, batch_size: int, progress: bool, replay: Optional[list] = None) -> dict:
    """The further passes MIR's outlier rule needs (the same rows in the same order: ``replay``, the first
    pass's rows per batch, or the same pairs through the model again in the same batches), and its report."""
    import torch
    from tqdm.auto import tqdm

    from ..core import gap_samples
    from .mir import RADIX_PASSES

    acc.next_pass()
    while acc.passes_needed and replay is not None:
        for rows in replay:
            for layer, (image_rows, caption_rows) in enumerate(rows):
                acc.add(layer, image_rows, caption_rows)
        acc.next_pass()
    while acc.passes_needed:
        bar = tqdm(total=len(pairs), desc=f"MIR median pass {acc.pass_index}/{RADIX_PASSES}", unit="pair",
                   disable=not progress, dynamic_ncols=True)
        for start in range(0, len(pairs), batch_size):
            with warnings.catch_warnings():  # the first pass warned already
                warnings.simplefilter("ignore")
                batch, images = _readable(pairs[start:start + batch_size])
            bar.update(min(batch_size, len(pairs) - start))
            if batch:
                with torch.inference_mode():
                    x = _gap_inputs(vlm, batch, images, True)
                    _add_mir(acc, x, gap_samples(x.image_mask, x.caption_mask).cpu())
        bar.close()
        acc.next_pass()
    r = acc.result()
    return {"definition": "MIR (Huang et al. 2024, arXiv 2410.07167): log10 of the sum over decoder layers "
                          "1..L of the Frechet distance between the image-token and the caption-token hidden "
                          "states, both scaled by 1 / mean caption-token norm, 3-sigma norm outliers replaced "
                          "by the per-dimension median (regap_fast.eval.mir)",
            "value": r.mir, "passes": acc.pass_index,
            "per_layer": [{"layer": i + 1, "frechet": f, "scale": c, "image_rows": n[0], "caption_rows": n[1],
                           "image_outliers": k[0], "caption_outliers": k[1]}
                          for i, (f, c, n, k) in enumerate(zip(r.per_layer, r.scale, r.rows, r.outliers))]}


def _readable(pairs: Sequence[Pair]) -> tuple[list[Pair], list]:
    """The pairs whose image opens, and their images (an unreadable one is skipped with a warning)."""
    batch, images = [], []
    for p in pairs:
        try:
            images.append(_open(p.image))
            batch.append(p)
        except OSError as e:
            warnings.warn(f"pair {p.id}: image unreadable, skipped ({e})", stacklevel=3)
    return batch, images


def _gap_inputs(vlm, batch: Sequence[Pair], images: list, per_layer: bool) -> GapInputs:
    captions = [p.caption for p in batch]
    if hasattr(vlm, "gap_inputs"):  # a transformers VLM: its chat template, the record's question
        return vlm.gap_inputs(images, captions, [p.prompt for p in batch], per_layer)
    out = vlm.pair_embeddings(images, captions, output_hidden_states=per_layer)  # the stage-1 input
    # every image token counts; text_mask marks the valid rows of text_embeds, the others sequence positions
    return GapInputs(out["image_embeds"], out["text_embeds"], None, out["text_mask"], out.get("hidden_states"),
                     out["image_mask"], out["caption_mask"])


def _measure_batch(x: GapInputs, inputs: "_Centroids", layers: list) -> tuple:
    """The per-pair input gaps and which pairs count, accumulated with every layer's into the centroids."""
    from ..core import gap_samples, modality_gap
    from ..ops import masked_mean

    gaps = modality_gap(x.image, x.caption, x.image_mask, x.caption_mask, reduction="none").cpu()
    valid = gap_samples(x.image_mask, x.caption_mask).cpu()
    inputs.add(masked_mean(x.image, x.image_mask), masked_mean(x.caption, x.caption_mask), gaps, valid)
    for acc, h in zip(layers, x.hidden or ()):  # the same op, on one tensor with two position masks
        g = modality_gap(h, h, x.hidden_image_mask, x.hidden_caption_mask, reduction="none")
        acc.add(masked_mean(h, x.hidden_image_mask), masked_mean(h, x.hidden_caption_mask), g.cpu(), valid)
    return gaps, valid


def _summary(inputs: "_Centroids", layers: Optional[list], samples: list, skipped: int, bins: int) -> dict:
    import torch

    result = {"definition": "per pair: || mean image token - mean caption token ||_2 at the LLM input "
                            "(regap_fast.fused_gap_loss, reduction='none')",
              "n_pairs": len(samples), "n_skipped": skipped, "gap": summarize([s["gap"] for s in samples], bins=bins),
              **inputs.result()}
    result["per_layer"] = None if layers is None else [
        {"layer": i, "gap_mean": float(torch.tensor(acc.gaps, dtype=torch.float64).mean()),
         "gap_std": float(torch.tensor(acc.gaps, dtype=torch.float64).std(unbiased=False)), **acc.result()}
        for i, acc in enumerate(layers)]
    result["samples"] = samples
    return result


def write_gap(result: dict, out_dir) -> None:
    """gap.json (everything but the per-pair values), gap_samples.csv (those), gap.png (the L2 gap), mir.png
    (MIR per layer)."""
    from .plots import plot_gap, plot_mir

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in result.items() if k != "samples"}
    (out_dir / GAP_JSON).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    l2 = "gap" in result
    with open(out_dir / GAP_SAMPLES, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(("id", "gap") if l2 else ("id",))
        writer.writerows((s["id"], s["gap"]) if l2 else (s["id"],) for s in result["samples"])
    if l2:
        plot_gap(result, out_dir / GAP_PNG)
    if "mir" in result:
        plot_mir(result, out_dir / MIR_PNG)


def written_files(result: dict) -> list:
    return [GAP_JSON, *([GAP_PNG] if "gap" in result else []), *([MIR_PNG] if "mir" in result else []), GAP_SAMPLES]


def format_gap(result: dict) -> str:
    lines = [f"pairs: {result['n_pairs']} (skipped {result['n_skipped']})"]
    if "gap" in result:
        g = result["gap"]
        q = g["quantiles"]
        lines += [(f"per-sample gap: mean {g['mean']:.4f}  std {g['std']:.4f}  median {q['0.5']:.4f}  "
                   f"[5%, 95%] [{q['0.05']:.4f}, {q['0.95']:.4f}]"),
                  (f"centroids: distance {result['centroid_distance']:.4f}  cosine {result['centroid_cosine']:.4f}  "
                   f"(mean per-pair cosine {result['pair_cosine_mean']:.4f})")]
        for row in result["per_layer"] or []:
            lines.append(f"  layer {row['layer']:>2}: gap {row['gap_mean']:.4f} +- {row['gap_std']:.4f}  "
                         f"centroid distance {row['centroid_distance']:.4f}  cosine {row['centroid_cosine']:.4f}")
    if "mir" in result:
        m = result["mir"]
        lines.append(f"MIR: {m['value']:.4f}  (log10 of the summed per-layer Frechet distances)")
        for row in m["per_layer"]:
            lines.append(f"  layer {row['layer']:>2}: Frechet distance {row['frechet']:.4f}  "
                         f"(outliers replaced: image {row['image_outliers']}, caption {row['caption_outliers']})")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", "--data_path", required=True, metavar="PAIRS",
                        help="image-caption pairs in the LLaVA pretraining JSON format",
                        ).hidden_aliases = ("--data_path",)
    add_image_folder_argument(parser, "the folder the records' image paths are relative to (default: the JSON's "
                                      "folder)")
    parser.add_argument("--out", "--output_dir", required=True, metavar="DIR",
                        help="output folder (gap.json, gap.png, ...)").hidden_aliases = ("--output_dir",)
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per forward pass")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N pairs")
    parser.add_argument("--no-per-layer", action="store_true", help="skip the per-layer L2 gaps (less memory)")
    parser.add_argument("--metric", choices=METRICS, default="l2",
                        help="l2: the distance of the two means REGAP trains on (default); mir: the REGAP paper's "
                             "Modality Integration Rate over the decoder layers; both")
    add_progress_argument(parser)
    add_model_arguments(parser)
    parser.epilog = ("MODEL may also be a transformers vision-language model folder with its processor (any\n"
                     "family of docs/integrations.md): each pair then goes through the model's own processor\n"
                     "and chat template, the record's question as the user turn, the caption as the answer.")


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    pairs = load_pairs(args.data, args.image_folder, args.limit)  # bad inputs fail here, before the model loads
    vlm = _load(args)
    result = measure_gap(vlm, pairs, batch_size=args.batch_size, per_layer=not args.no_per_layer,
                         progress=show_progress(args), metric=args.metric)
    result["model"] = str(Path(args.model).resolve())
    result["data"] = str(Path(args.data).resolve())
    write_gap(result, args.out)
    print(format_gap(result))
    first, *rest = written_files(result)
    print(f"wrote {Path(args.out) / first}, {', '.join(rest)}")
    return 0


def missing_processor(path: Path) -> None:
    """A transformers VLM folder without its processor files: say that, not that the folder is unreadable."""
    try:
        meta = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return
    if "format" not in meta and meta.get("model_type") not in (None, "llava"):
        raise FileNotFoundError(f"{path} holds a transformers {meta['model_type']!r} model but not its processor "
                                "(no preprocessor_config.json or processor_config.json): `gap` renders the pairs "
                                "with the model's own processor; save it there with processor.save_pretrained(DIR)")


def _load(args: argparse.Namespace):
    """A transformers VLM folder with its processor, else what ``load_model`` reads (the library's own)."""
    from .hf_gap import TransformersVLM, is_transformers_folder

    if is_transformers_folder(args.model):
        return TransformersVLM.from_folder(args.model, *device_and_dtype(args))
    missing_processor(Path(args.model))
    vlm, _, _ = load_vlm(args)
    return vlm
