"""Whether the shapes model's words carry the caption: map separation and the padding ablation.

Guidance can only move what the maps tell apart. Two measurements say whether they do, on any candidate model:

- **Map separation**, teacher-forced: ground-truth two-object scenes are encoded, noised to a timestep and
  passed through the UNet with their own caption. For each object's words (its noun, its colour word) the
  *own-object share* is the mass of the word's map on its object's cells over its mass on both objects' cells
  (0.5 = no preference, 1 = all on its own object), per read layer and timestep band. The share of every
  pixel's attention that lands on EOT and padding says where the UNet reads the caption from.
- **Padding ablation**: single-object prompts are generated with the stock pipeline three ways: as they are,
  with the word positions' encoder outputs replaced by the empty prompt's (only EOT/padding carry the
  caption), and with EOT/padding replaced (only the words carry it). The scorer's bound rate of each says
  which route the model follows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from binding.shapes import world

__all__ = ["BANDS", "check_maps", "format_check", "map_separation", "padding_ablation", "separation_scenes"]

# Timestep bands (the 1000 training steps in thirds): at 20 PNDM steps the guidance's first 10 steps lie in
# the top two.
BANDS: tuple[tuple[str, int, int], ...] = (("t 0-333", 0, 333), ("t 334-666", 334, 666), ("t 667-999", 667, 999))
TIMESTEPS = tuple(range(50, 1000, 100))  # 50, 150, ..., 950: three or four per band
KINDS = ("noun", "colour")


def separation_scenes(n_layouts: int = 4) -> list[world.Scene]:
    """The 28 held-out prompts, each laid out ``n_layouts`` times: objects the model never saw together."""
    return [world.layout_scene(world.parse_caption(p), 10_000 + 97 * k + i)
            for i, p in enumerate(world.HELDOUT_PROMPTS) for k in range(n_layouts)]


def _band(t: int) -> str:
    return next(name for name, lo, hi in BANDS if lo <= t <= hi)


@torch.no_grad()
def map_separation(pipe, scenes: Sequence[world.Scene], timesteps: Sequence[int] = TIMESTEPS, seed: int = 0,
                   batch: int = 32) -> dict:
    """Own-object shares per kind, read layer and band, and the attention mass on EOT/padding (module docstring).

    Returns ``{"share": {kind: {layer: {band: mean}}}, "tail_mass": {layer: {band: mean}}, "scenes": n}``,
    with the layer ``"average"`` (every read layer's heads equally weighted) beside each named layer.
    """
    from binding.attention import AttentionCapture
    from binding.shapes.grounding import WORD_COLUMNS, object_targets, own_object_share, tail_mask, word_maps
    from binding.shapes.model import scene_tensor

    scenes = [s for s in scenes if len(s.objects) == 2]
    if not scenes:
        raise ValueError("map separation needs two-object scenes")
    size = world.CANVAS
    unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    device = unet.device
    acp = pipe.scheduler.alphas_cumprod.to(torch.float64)
    sums: dict = {}

    def add(key, values: torch.Tensor) -> None:
        s, n = sums.get(key, (0.0, 0))
        sums[key] = (s + float(values.sum()), n + values.numel())

    with AttentionCapture(unet, size, size, pipe.vae_scale_factor) as capture:
        for start in range(0, len(scenes), batch):
            part = scenes[start : start + batch]
            x = scene_tensor(part, size).to(device, vae.dtype)
            z0 = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
            ids = tok([s.caption for s in part], padding="max_length", max_length=77, truncation=True,
                      return_tensors="pt").input_ids.to(device)
            cond = te(ids)[0]
            tail = tail_mask(ids, tok.eos_token_id)
            pos, masks, valid = object_targets(part, ids.cpu(), capture.grid)
            pos, masks = pos.to(device), masks.to(device)
            for t in timesteps:
                g = torch.Generator("cpu").manual_seed(seed * 100_003 + start * 1009 + int(t))
                noise = torch.randn(z0.shape, generator=g).to(device, z0.dtype)
                a = acp[int(t)]
                zt = a.sqrt().float() * z0 + (1 - a).sqrt().float() * noise
                with capture.record(batch_index=None) as rec:
                    unet(zt, torch.full((len(part),), int(t), device=device), encoder_hidden_states=cond)
                layers = {**rec.layer_maps(), "average": rec.maps()}
                band = _band(int(t))
                for name, m in layers.items():
                    flat = m.flatten(1, 2)  # (B, HW, 77)
                    add(("tail", name, band), (flat * tail[:, None, :]).sum(-1).mean(-1))
                    for kind, column in WORD_COLUMNS.items():
                        share = own_object_share(word_maps(m, pos[..., column]), masks)
                        add(("share", kind, name, band), share)
    out: dict = {"share": {k: {} for k in KINDS}, "tail_mass": {}, "scenes": len(scenes),
                 "timesteps": list(timesteps)}
    for key, (s, n) in sums.items():
        if key[0] == "tail":
            out["tail_mass"].setdefault(key[1], {})[key[2]] = s / n
        else:
            out["share"][key[1]].setdefault(key[2], {})[key[3]] = s / n
    for table in (out["tail_mass"], *out["share"].values()):
        for bands in table.values():
            bands["all"] = float(np.mean([bands[b] for b, _, _ in BANDS if b in bands]))
    return out


def _blanked(cond: torch.Tensor, empty: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep[..., None], cond, empty.expand_as(cond))


@dataclass
class _Mode:
    name: str
    label: str


ABLATIONS = (
    _Mode("normal", "as is"),
    _Mode("words_blanked", "words blanked (only EOT/padding carry the caption)"),
    _Mode("padding_blanked", "EOT/padding blanked (only the words carry it)"),
)


@torch.no_grad()
def padding_ablation(pipe, seeds: Sequence[int] = (0, 1), steps: int = 20, guidance_scale: float = 7.5,
                     log: Callable[[str], None] | None = None) -> dict:
    """Bound and present rates of single-object prompts (all 28 colour-shape combinations) under each ablation."""
    from binding.shapes.grounding import tail_mask
    from binding.shapes.scorer import score_image

    tok, te = pipe.tokenizer, pipe.text_encoder
    device = pipe.unet.device
    prompts = [world.caption([(c, s)]) for c in world.COLOURS for s in world.SHAPES]
    empty_ids = tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids.to(device)
    empty = te(empty_ids)[0]
    counts = {m.name: {"bound": 0, "present": 0, "n": 0} for m in ABLATIONS}
    for prompt in prompts:
        ids = tok([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids.to(device)
        cond = te(ids)[0]
        tail = tail_mask(ids, tok.eos_token_id)
        words = ~tail
        words[:, 0] = False  # SOT sees nothing but itself: the same in every prompt
        embeds = {"normal": cond, "words_blanked": _blanked(cond, empty, ~words),
                  "padding_blanked": _blanked(cond, empty, ~tail)}
        for mode in ABLATIONS:
            for seed in seeds:
                g = torch.Generator("cpu").manual_seed(int(seed))
                image = pipe(prompt_embeds=embeds[mode.name], negative_prompt_embeds=empty,
                             num_inference_steps=steps, guidance_scale=guidance_scale, generator=g,
                             height=world.CANVAS, width=world.CANVAS).images[0]
                s = score_image(image, world.parse_caption(prompt))
                c = counts[mode.name]
                c["bound"] += int(s["bound_all"])
                c["present"] += int(s["present_all"])
                c["n"] += 1
        if log:
            log(f"ablation: {prompt!r} done")
    return {m: {"bound": c["bound"] / c["n"], "present": c["present"] / c["n"], "n": c["n"]}
            for m, c in counts.items()}


def check_maps(pipe, n_layouts: int = 4, timesteps: Sequence[int] = TIMESTEPS, ablation_seeds: Sequence[int] = (0, 1),
               ablation: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Both measurements on one model (the ``teach check-maps`` command)."""
    out = {"separation": map_separation(pipe, separation_scenes(n_layouts), timesteps)}
    if log:
        log(format_check(out))
    if ablation:
        out["ablation"] = padding_ablation(pipe, ablation_seeds, log=None)
    return out


def _short(layer: str) -> str:
    return layer.replace(".processor", "").replace("attentions.", "a").replace("_blocks.", "").replace(
        ".transformer_blocks.0.attn2", "")


def format_check(result: dict) -> str:
    """The check as Markdown tables (what the model card and the closing notes quote)."""
    sep = result["separation"]
    bands = [b for b, _, _ in BANDS] + ["all"]
    lines = [f"Own-object share of a word's map (0.5 = no preference), teacher-forced on {sep['scenes']} "
             f"two-object scenes of the held-out prompts, t = {', '.join(map(str, sep['timesteps']))}:", "",
             "| word | read layer | " + " | ".join(bands) + " |", "|---|---|" + "---|" * len(bands)]
    for kind in KINDS:
        for layer, row in sep["share"][kind].items():
            lines.append(f"| {kind} | {_short(layer)} | " + " | ".join(f"{row[b]:.3f}" for b in bands) + " |")
    lines += ["", "Share of each pixel's cross-attention on EOT and padding:", "",
              "| read layer | " + " | ".join(bands) + " |", "|---|" + "---|" * len(bands)]
    for layer, row in sep["tail_mass"].items():
        lines.append(f"| {_short(layer)} | " + " | ".join(f"{row[b]:.3f}" for b in bands) + " |")
    if "ablation" in result:
        ab = result["ablation"]
        n = next(iter(ab.values()))["n"]
        lines += ["", f"Padding ablation ({n} generations each: 28 single-object prompts x seeds; scorer rates):", "",
                  "| encoder outputs | every object present | in its own colour (bound) |", "|---|---|---|"]
        for mode in ABLATIONS:
            r = ab[mode.name]
            lines.append(f"| {mode.label} | {r['present']:.3f} | {r['bound']:.3f} |")
    return "\n".join(lines)
