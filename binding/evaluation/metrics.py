"""Each image's and each map stack's numbers: attention leakage and neglect, CLIP similarity, the shapes scorer.

Pure functions of one image or one map stack (CLIP needs its weights, loaded once by ``load_clip``):

- attention (``attention_metrics``), no extra model: per (modifier, noun) pair, the overlap of the modifier's
  map with its own noun's map and with the closest other noun's (``binding.metrics.binding_overlaps``);
  ``attn_leakage`` = other / (own + other) (0: all on its own noun, 0.5: as much on another); and each noun's
  peak after A&E's renormalisation over the text tokens (``attn_min_peak``: the most neglected noun). Maps are
  the item's run averaged over all steps (DAAM-style).
- CLIP (``clip_scores``): cosine similarity of the image with the full prompt and the minimum over the prompt's
  parts split on " and " / " with " (A&E's full-prompt and min-object similarity). Needs CLIP weights
  (``--clip`` hub id or folder); without them the report says why it skipped them.
- shapes (``shapes_scores``): the teaching world's exact scorer (every object present, every object in its own
  colour, a colour leak), for prompts in the world's grammar; meaningful on the shapes model only.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from binding.metrics import binding_overlaps, word_map

__all__ = [
    "ClipScorer",
    "ClipUnavailable",
    "DEFAULT_CLIP",
    "METRICS",
    "attention_metrics",
    "clip_scores",
    "clip_similarities",
    "load_clip",
    "noun_peaks",
    "prompt_parts",
    "shapes_scores",
]

DEFAULT_CLIP = "openai/clip-vit-base-patch16"  # the papers' ViT-B/16

# name -> (what it measures, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "attn_own": ("overlap of each modifier's map with its noun's", True),
    "attn_leakage": ("share of a modifier's overlap that falls on another noun", False),
    "attn_margin": ("own - other overlap", True),
    "attn_min_peak": ("peak attention of the most neglected noun", True),
    "clip_full": ("CLIP cosine, image vs full prompt", True),
    "clip_min": ("CLIP cosine, image vs its worst prompt part", True),
    "shapes_present_all": ("every object's shape present (scorer)", True),
    "shapes_bound_all": ("every object present in its own colour (scorer)", True),
    "shapes_leak_any": ("some object in another object's colour (scorer)", False),
}



# -------------------------------------------------------------------------------------------- metrics


def noun_peaks(maps: np.ndarray, nouns) -> dict[str, float]:
    """Each noun's highest attention, A&E-style: the text tokens (SOT and EOT excluded) renormalised per
    pixel to sum 1, so a peak reads as "this noun wins that pixel" whatever SOT absorbs."""
    m = np.asarray(maps, dtype=np.float64).copy()
    inner = np.clip(m[..., 1:-1], 0, None)
    total = inner.sum(-1, keepdims=True)
    m[..., 1:-1] = np.divide(inner, total, out=np.zeros_like(inner), where=total > 0)
    return {f"{n.text}@{n.start}": float(word_map(m, n).max()) for n in nouns}


def attention_metrics(maps: np.ndarray, bindings, nouns) -> dict:
    """Leakage and neglect read off one (H, W, n_tokens) map stack; None where the prompt has nothing to read
    (no modifier: no leakage; no noun: no peak) - a missing value, never a made-up 0."""
    pairs = binding_overlaps(maps, bindings, nouns)
    leak = [p.other / (p.own + p.other) if p.own + p.other > 0 else None for p in pairs]
    leak = [x for x in leak if x is not None]
    peaks = noun_peaks(maps, nouns)
    return {
        "attn_own": float(np.mean([p.own for p in pairs])) if pairs else None,
        "attn_leakage": float(np.mean(leak)) if leak else None,
        "attn_margin": float(np.mean([p.margin for p in pairs])) if pairs else None,
        "attn_min_peak": min(peaks.values()) if peaks else None,
        "pairs": [
            {"modifier": p.modifier, "noun": p.noun, "own": p.own, "other": p.other, "other_noun": p.other_noun}
            for p in pairs
        ],
        "peaks": peaks,
    }


def prompt_parts(prompt: str) -> list[str]:
    """The prompt split on " and " / " with " (A&E's min-object similarity scores each part)."""
    parts = [p.strip(" ,.") for p in re.split(r"\s+(?:and|with)\s+", prompt.strip())]
    return [p for p in parts if p]


def _features(out):
    """transformers 5 returns a model output from get_*_features; 4.x returned the tensor itself."""
    import torch

    return out if isinstance(out, torch.Tensor) else out.pooler_output


def clip_similarities(model, processor, tokenizer, image, texts: Sequence[str]) -> np.ndarray:
    """Cosine similarity of one image with each text under a ``CLIPModel``."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        pixels = processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"].to(device)
        tok = tokenizer(list(texts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        img = _features(model.get_image_features(pixel_values=pixels.to(model.dtype))).float()
        txt = _features(
            model.get_text_features(input_ids=tok["input_ids"].to(device), attention_mask=tok["attention_mask"].to(device))
        ).float()
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return (txt @ img.T)[:, 0].cpu().numpy().astype(np.float64)


def clip_scores(model, processor, tokenizer, image, prompt: str) -> dict:
    """``clip_full`` (image vs the prompt) and ``clip_min`` (the worst of its parts; the full prompt when it
    has one part)."""
    parts = prompt_parts(prompt)
    texts = [prompt] + (parts if len(parts) > 1 else [])
    sims = clip_similarities(model, processor, tokenizer, image, texts)
    return {"clip_full": float(sims[0]), "clip_min": float(sims[1:].min()) if len(sims) > 1 else float(sims[0])}


def shapes_scores(image, prompt: str) -> dict | None:
    """The shapes scorer's verdicts as 0/1 numbers; None for a prompt outside the world's grammar."""
    from binding.shapes import world
    from binding.shapes.scorer import score_image

    try:
        objects = world.parse_caption(prompt)
    except ValueError:
        return None
    s = score_image(image, objects)
    return {
        "shapes_present_all": float(s["present_all"]),
        "shapes_bound_all": float(s["bound_all"]),
        "shapes_leak_any": float(s["leak_any"]),
    }


class ClipUnavailable(RuntimeError):
    """No CLIP weights: the message says why, and the report shows it."""


@dataclass
class ClipScorer:
    model: object
    processor: object
    tokenizer: object
    name: str

    def __call__(self, image, prompt: str) -> dict:
        return clip_scores(self.model, self.processor, self.tokenizer, image, prompt)


def load_clip(spec: str | None, device=None) -> ClipScorer:
    """A ``ClipScorer`` from a hub id (cache first) or a local folder; ``ClipUnavailable`` when it cannot load.

    ``spec`` "none" (or empty) turns CLIP off on purpose.
    """
    if spec is None or str(spec).strip().lower() in ("", "none", "off"):
        raise ClipUnavailable("turned off (--clip none)")
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    spec = str(spec)
    is_dir = os.path.isdir(os.path.expanduser(spec))
    source = os.path.expanduser(spec) if is_dir else spec
    offline = is_dir or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    last = None
    for local_only in (True,) if offline else (True, False):
        try:
            model = CLIPModel.from_pretrained(source, local_files_only=local_only).eval()
            processor = CLIPImageProcessor.from_pretrained(source, local_files_only=local_only)
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
            if device is not None:
                model = model.to(device)
            return ClipScorer(model, processor, tokenizer, spec)
        except Exception as exc:  # any failure means the same thing to the report: no CLIP score
            last = exc
    first_line = str(last).strip().splitlines()[0] if str(last).strip() else type(last).__name__
    raise ClipUnavailable(f"cannot load CLIP weights {spec!r} ({first_line[:200]})")


