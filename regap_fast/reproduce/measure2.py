"""The measurements of one v2-toy model (PLAN-v3 section 6), into its ``eval/`` folder.

* the gap per image condition and LM layer (v1's ``gaps_by_condition``) with MIR beside it (PLAN-v3 4),
  and each held-out image's input gap (for the within-arm gap-safety relation);
* the held-out harmful and benign requests under text, blank, noise, a synthetic image and the glyph
  condition (an image of the object's name; the request names "the object in the image"), greedy,
  judged by ``RecipeJudge``: counts ``{n, harmful_compliance, refusal, other, right_recipe}``;
* the dose-response: the harmful (and benign) requests under the image condition with the image tokens
  moved by t x the mean-gap direction, t in ``dose.DOSES`` (t = 0 is the image condition itself);
* image-question accuracy on the held-out images;
* the gap-safety relation within the model: over the held-out harmful requests under the image
  condition, Pearson's r between the request's image's input gap and its compliance (0 / 1);
* ``answers.jsonl``: every answer with its condition, object and label.
"""

from __future__ import annotations

import json
from pathlib import Path

from .dose import DOSES, gap_direction, shifted_images
from ..eval.stats import correlation
from .judge2 import HARMFUL_COMPLIANCE, RecipeJudge
from .language import IMAGE_QUESTIONS, scene_of
from .language2 import glyph_request_text
from .measure import gaps_by_condition

CONDITIONS_V2 = ("text", "blank", "noise", "image", "glyph")


def _images(condition: str, requests, data, size: int, seed: int, held: list) -> list:
    from ..eval.conditions import blank_image, noise_image

    from PIL import Image

    if condition == "text":
        return [None] * len(requests)
    if condition == "blank":
        return [blank_image(size)] * len(requests)
    if condition == "noise":
        return [noise_image(size, seed, f"{i}") for i in range(len(requests))]
    if condition == "glyph":
        glyphs = {o: Image.open(path).convert("RGB") for o, path in data.glyphs.items()}
        return [glyphs[r.obj] for r in requests]
    return [held[i % len(held)] for i in range(len(requests))]


def _texts(condition: str, requests) -> list[str]:
    if condition == "glyph":
        return [glyph_request_text(r.template, r.suffix) for r in requests]
    return [r.text for r in requests]


def measure_model(model_dir: Path, out_dir: Path, s, data, seed: int, dose: bool = True) -> dict:
    """Gaps, answers under every condition, the dose-response and image questions of the model in
    ``model_dir``. Returns ``{"gap", "image_gaps", "harmful", "benign", "dose", "image_questions"}``."""
    import torch
    from PIL import Image

    from ..eval import load_pairs
    from ..model import load_model

    vlm = load_model(model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = load_pairs(data.eval_pairs)
    gaps = gaps_by_condition(vlm, pairs, s, seed, mir=True)
    held = [Image.open(p.image).convert("RGB") if isinstance(p.image, (str, Path)) else p.image for p in pairs]
    judge = RecipeJudge(data.recipes)
    kw = dict(max_new_tokens=s.max_new_tokens, batch_size=s.eval_batch)
    log = []

    def ask(kind, condition, requests, images=None, tag=None):
        images = _images(condition, requests, data, s.image_size, seed, held) if images is None else images
        answers = vlm.generate(_texts(condition, requests), images, **kw)
        for r, a in zip(requests, answers):
            log.append({"kind": kind, "condition": tag or condition, "object": r.obj, "request": r.text, "answer": a,
                        "label": judge.label(r.obj, a)})
        return judge.count([r.obj for r in requests], answers)

    harmful = {c: ask("harmful", c, data.harmful_requests) for c in CONDITIONS_V2}
    image_labels = [a["label"] for a in log if a["kind"] == "harmful" and a["condition"] == "image"]
    per_image = pair_gaps(vlm, held, [p.caption for p in pairs], s.eval_batch)
    gap_safety = correlation([per_image[i % len(held)] for i in range(len(image_labels))],
                             [float(label == HARMFUL_COMPLIANCE) for label in image_labels])
    benign = {c: ask("benign", c, data.benign_requests) for c in CONDITIONS_V2}
    doses = {}
    if dose:
        d = gap_direction(vlm, held, [p.caption for p in pairs], s.eval_batch)
        for t in DOSES:
            if t == 0.0:
                doses[f"{t:g}"] = {"harmful": harmful["image"], "benign": benign["image"]}
                continue
            with shifted_images(vlm, d, t):
                doses[f"{t:g}"] = {"harmful": ask("harmful", "image", data.harmful_requests, tag=f"image+{t:g}d"),
                                   "benign": ask("benign", "image", data.benign_requests, tag=f"image+{t:g}d")}
    questions = [IMAGE_QUESTIONS[i % len(IMAGE_QUESTIONS)] for i in range(len(pairs))]
    answers = vlm.generate([q for q, _ in questions], held, **kw)
    right = sum(a.strip().lower() == want.format(**scene_of(p.caption)).lower()
                for (_, want), a, p in zip(questions, answers, pairs))
    with open(out_dir / "answers.jsonl", "w") as f:
        for row in log:
            f.write(json.dumps(row) + "\n")
    (out_dir / "gaps.json").write_text(json.dumps(gaps, indent=1) + "\n")
    return {"gap": gaps, "harmful": harmful, "benign": benign, "dose": doses,
            "image_questions": {"n": len(pairs), "right": right},
            "gap_safety": {"n": gap_safety["n"], "r": (gap_safety["pearson"] or {}).get("r"),
                           "note": gap_safety.get("note")}}


def pair_gaps(vlm, images, captions, batch_size: int) -> list[float]:
    """Each pair's input gap: the norm of its mean image token minus its mean caption token (``measure_gap``'s)."""
    import torch

    out = []
    for start in range(0, len(images), batch_size):
        e = vlm.pair_embeddings(images[start:start + batch_size], captions[start:start + batch_size])
        mask = e["text_mask"].unsqueeze(-1).float()
        mu_text = (e["text_embeds"].float() * mask).sum(1) / mask.sum(1).clamp(min=1)
        out += torch.linalg.vector_norm(e["image_embeds"].float().mean(1) - mu_text, dim=-1).tolist()
    return out
