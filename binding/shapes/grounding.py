"""Where each object's words sit and which read-grid cells the object covers: the supervision the world gives.

The world knows every object's exact mask, so a word's cross-attention map can be checked (``binding.shapes.maps``)
or trained (``binding.shapes.train``, recipe v2) against the object it names, at no labelling cost. Pure
functions of tensors, except ``object_targets``, which reads the scenes and the tokenizer.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from binding.shapes import world

__all__ = ["WORD_COLUMNS", "grounding_terms", "object_targets", "own_object_share", "tail_mask", "word_maps"]

# Column of ``object_targets``' positions for each kind of word.
WORD_COLUMNS = {"colour": 0, "noun": 1}


def tail_mask(ids: torch.Tensor, eos: int) -> torch.Tensor:
    """(B, 77) bool: the first EOT and every position after it (CLIP pads with EOT)."""
    return (ids == eos).long().cumsum(1) > 0


def object_targets(scenes: Sequence[world.Scene], ids: torch.Tensor, grid: tuple[int, int], dropped=None):
    """Where each object's words sit and which cells of the read grid it covers.

    Returns ``pos`` (B, J, 2) long: the CLIP positions of each object's (colour, shape) words; ``masks``
    (B, J, gh*gw) float: 1 on the cells the object touches; ``valid`` (B, J) bool. J = most objects in a scene;
    dropped (empty-caption) rows have no valid object. Every word of the world is one CLIP token and a
    scene's colours and shapes are distinct, so each word's id occurs once in its caption. Objects are at least
    ``world.GAP`` pixels apart, one cell at the 4-pixel cells of a 16x16 grid, so no cell is shared.
    """
    from binding.tokenizer import load_tokenizer

    tok = load_tokenizer()
    gh, gw = grid
    j = max(len(s.objects) for s in scenes)
    pos = torch.zeros(len(scenes), j, 2, dtype=torch.long)
    masks = torch.zeros(len(scenes), j, gh * gw)
    valid = torch.zeros(len(scenes), j, dtype=torch.bool)
    for b, scene in enumerate(scenes):
        if dropped is not None and bool(dropped[b]):
            continue
        row = ids[b].tolist()
        for k, obj in enumerate(scene.objects):
            for c, word in enumerate(obj.pair):
                pos[b, k, c] = row.index(tok.convert_tokens_to_ids(word + "</w>"))
            m = world.object_mask(obj, world.CANVAS)
            cells = m.reshape(gh, m.shape[0] // gh, gw, m.shape[1] // gw).any(axis=(1, 3))
            masks[b, k] = torch.from_numpy(cells.reshape(-1).astype(np.float32))
            valid[b, k] = True
    return pos, masks, valid


def word_maps(maps: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, J, gh*gw): the map of the word at ``positions`` (B, J) from ``maps`` (B, gh, gw, keys)."""
    flat = maps.flatten(1, 2)
    return torch.gather(flat, 2, positions[:, None, :].expand(-1, flat.shape[1], -1)).transpose(1, 2)


def own_object_share(words: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B, J): each word's mass on its own object's cells over its mass on every object's cells (0.5 = none
    preferred between two objects)."""
    on = (words[:, :, None, :] * masks[:, None, :, :]).sum(-1)  # (B, word j, object k)
    return torch.diagonal(on, dim1=1, dim2=2) / on.sum(-1).clamp_min(1e-12)


def grounding_terms(
    layer_maps: Mapping[str, torch.Tensor], pos: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor,
    kinds: Sequence[str] = ("noun",), pixel: bool = True,
) -> dict[str, torch.Tensor]:
    """TokenCompose's two terms (Wang et al., CVPR 2024) for each kind of word, averaged over read layers.

    ``ground_<kind>s``: mean over objects of ``(1 - mass of the word's map, normalised over pixels, inside its
    object)^2``; ``pixel_<kind>s``: the BCE of the word's raw probabilities against the object's mask.
    Empty when no object is valid (a batch of empty captions).
    """
    if not bool(valid.any()):
        return {}
    out = {}
    for kind in kinds:
        token, bce = [], []
        for m in layer_maps.values():
            a = word_maps(m, pos[..., WORD_COLUMNS[kind]])
            inside = (a / a.sum(-1, keepdim=True).clamp_min(1e-8) * masks).sum(-1)
            token.append(((1 - inside) ** 2)[valid].mean())
            bce.append(F.binary_cross_entropy(a[valid].clamp(1e-6, 1 - 1e-6), masks[valid]))
        out[f"ground_{kind}s"] = torch.stack(token).mean()
        if pixel:
            out[f"pixel_{kind}s"] = torch.stack(bce).mean()
    return out
