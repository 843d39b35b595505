"""Capture of the UNet's cross-attention probabilities, only where they are read.

The guidance losses read cross-attention *probabilities*, which fused SDPA never materialises. Computing them
costs time and memory, so ``AttentionCapture`` wraps the processor of the cross-attention layers that are read
and leaves every other layer on its own processor (``AttnProcessor2_0`` by default). A wrapped layer computes
probabilities only during a pass that records, and only for the one batch element recorded.

Which layers are read (``binding/METHODS.md``). Stable Diffusion's guidance reads the cross-attention layers of
the coarsest grid that the down and up blocks attend at: 16x16 for SD 1.x at 512 px (down_blocks.2 and
up_blocks.1; the 8x8 mid block lies below it and is left out), i.e. the latent side / 4, 24x24 for SD 2.1 at
768 px. The same rule on another UNet picks the grid it plays that role in; every cross-attention layer at that
grid is read (the mid block too when it sits there, as in the tiny model and as diffusers' Attend-and-Excite
does). Grids come from the UNet's structure and the image size, never from a constant. Divide & Bind's
attribute maps also read every finer grid, nearest-downsampled to the read grid; since nearest-downsampling
keeps a fixed subset of query pixels, only those rows of the probability matrix are computed.

Three kinds of pass:

* no recording: the original processors run (vanilla diffusers);
* ``record(batch_index=...)`` without grad: every layer's output still comes from its original processor (so
  the denoising is exactly diffusers'), and the read layers add the probabilities of one batch element (the
  conditional half of the CFG batch) for display;
* ``record(...)`` with grad (the guidance pass, batch 1): the read layers compute QK^T once, record its softmax
  and take their output from it (diffusers' Attend-and-Excite processor does the same), and with
  ``stop_early`` the forward pass is cut right after the last layer read: the loss depends on nothing after it;
* ``record(batch_index=None)``: the read layers take that explicit path for the whole batch, with or without
  grad (the teaching model's grounding loss in training, and its map diagnostics, read every element).

Usage::

    with AttentionCapture(pipe.unet, height, width, pipe.vae_scale_factor) as capture:
        with capture.record(stop_early=True) as rec:
            pipe.unet(latents, t, encoder_hidden_states=cond)
        maps = rec.maps()              # (gh, gw, 77) fp32, differentiable
    # processors restored here
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "AttentionCapture",
    "LayerInfo",
    "Recording",
    "StopForward",
    "cross_attention_layers",
    "latent_size",
    "read_grid",
]

# The order in which diffusers' Attend-and-Excite aggregates its stored maps. Summation order changes the last
# bits of the average, and the x100 softmax of A&E amplifies them, so the guided run reproduces it exactly.
_AGGREGATION_ORDER = ("up", "down", "mid")


class StopForward(Exception):
    """Raised inside the UNet after the last layer a guidance pass reads; caught by ``record``."""


@dataclass(frozen=True)
class LayerInfo:
    """One cross-attention layer: its processor key, where it sits and the query grid it attends from."""

    name: str  # the key of ``unet.attn_processors``
    place: str  # "down", "mid" or "up"
    block: int  # index in down_blocks / up_blocks (0 for mid)
    grid: tuple[int, int]
    heads: int


def latent_size(height: int, width: int, vae_scale_factor: int) -> tuple[int, int]:
    """The latent grid for an image size (the pipeline's ``prepare_latents`` rule)."""
    return int(height) // vae_scale_factor, int(width) // vae_scale_factor


def _halve(hw: tuple[int, int], times: int) -> tuple[int, int]:
    h, w = hw
    for _ in range(times):  # a stride-2, padding-1 3x3 convolution: ceil(n / 2)
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


def cross_attention_layers(unet, height: int, width: int, vae_scale_factor: int) -> list[LayerInfo]:
    """Every cross-attention layer of ``unet`` with the grid its queries lie on for this image size.

    A down block's level is the number of downsamplers before it; the mid block sits below them all; an up
    block climbs back by the upsamplers before it (its upsampler matches the skip connection's size).
    """
    from diffusers.models.attention_processor import Attention

    latent = latent_size(height, width, vae_scale_factor)
    down = list(getattr(unet, "down_blocks", []))
    up = list(getattr(unet, "up_blocks", []))
    down_levels = [sum(1 for b in down[:i] if getattr(b, "downsamplers", None)) for i in range(len(down))]
    mid_level = sum(1 for b in down if getattr(b, "downsamplers", None))
    up_levels = [mid_level - sum(1 for b in up[:i] if getattr(b, "upsamplers", None)) for i in range(len(up))]

    out = []
    for name, module in unet.named_modules():
        if not isinstance(module, Attention) or not getattr(module, "is_cross_attention", False):
            continue
        parts = name.split(".")
        if parts[0] == "down_blocks":
            place, block, level = "down", int(parts[1]), down_levels[int(parts[1])]
        elif parts[0] == "up_blocks":
            place, block, level = "up", int(parts[1]), up_levels[int(parts[1])]
        elif parts[0] == "mid_block":
            place, block, level = "mid", 0, mid_level
        else:
            continue
        out.append(LayerInfo(f"{name}.processor", place, block, _halve(latent, level), module.heads))
    return out


def read_grid(unet, height: int, width: int, vae_scale_factor: int) -> tuple[int, int]:
    """The grid the losses read: the coarsest one the down/up blocks cross-attend at (SD 1.x at 512 px: 16x16).

    Falls back to the mid block's grid for a UNet that cross-attends nowhere else.
    """
    layers = cross_attention_layers(unet, height, width, vae_scale_factor)
    if not layers:
        raise ValueError("this UNet has no cross-attention layer: there are no attention maps to guide")
    outer = [l.grid for l in layers if l.place != "mid"] or [l.grid for l in layers]
    return min(outer, key=lambda g: (g[0] * g[1], g))


def _nearest_rows(src: tuple[int, int], dst: tuple[int, int], device) -> torch.Tensor:
    """Flat indices of the ``src`` pixels that ``F.interpolate(mode="nearest")`` keeps when shrinking to ``dst``."""
    idx = torch.arange(src[0] * src[1], dtype=torch.float64).view(1, 1, *src)
    picked = F.interpolate(idx, size=dst, mode="nearest")
    return picked.flatten().long().to(device)


class Recording:
    """The maps of one UNet pass. ``maps()`` averages the read layers; ``attribute_maps()`` stacks the finer ones."""

    def __init__(self, capture: "AttentionCapture", batch_index: int | None, attributes: bool, stop_early: bool):
        self.capture = capture
        self.batch_index = batch_index
        self.attributes = attributes and bool(capture.attribute_layers)
        self.stop_early = stop_early
        self.read: dict[str, torch.Tensor] = {}  # name -> (heads, gh*gw, keys)
        self.fine: dict[str, torch.Tensor] = {}  # name -> (heads, gh*gw, keys): the kept pixels of a finer grid
        self.expected = len(capture.read_layers) + (len(capture.attribute_layers) if self.attributes else 0)

    def wants(self, role: str) -> bool:
        return role == "read" or (role == "attribute" and self.attributes)

    def add(self, role: str, name: str, probs: torch.Tensor) -> None:
        (self.read if role == "read" else self.fine)[name] = probs
        if self.stop_early and len(self.read) + len(self.fine) == self.expected:
            raise StopForward

    def _check_read(self) -> None:
        if len(self.read) != len(self.capture.read_layers):
            raise RuntimeError(
                f"the pass recorded {len(self.read)} of {len(self.capture.read_layers)} read layers; "
                "was the UNet called inside record()?"
            )

    def maps(self) -> torch.Tensor:
        """(gh, gw, keys) fp32: every head of every read layer, equally weighted.

        With ``batch_index=None``: (batch, gh, gw, keys), each element's own average.
        """
        self._check_read()
        gh, gw = self.capture.grid
        if self.batch_index is None:
            heads = {l.name: l.heads for l in self.capture.read_layers}
            layers = self.layer_maps()
            return sum(m * heads[k] for k, m in layers.items()) / sum(heads.values())  # every head weighs the same
        stacked = torch.cat(
            [
                self.read[l.name].float().reshape(-1, gh, gw, self.read[l.name].shape[-1])
                for l in self.capture.aggregation_order
            ]
        )
        return stacked.sum(0) / stacked.shape[0]

    def layer_maps(self) -> dict[str, torch.Tensor]:
        """Each read layer's maps averaged over its heads: name -> ([batch,] gh, gw, keys) fp32."""
        self._check_read()
        gh, gw = self.capture.grid
        out = {}
        for l in self.capture.aggregation_order:
            probs = self.read[l.name].float()  # ([batch,] heads, gh*gw, keys)
            out[l.name] = probs.mean(-3).reshape(*probs.shape[:-3], gh, gw, probs.shape[-1])
        return out

    def attribute_maps(self) -> torch.Tensor | None:
        """(N, gh, gw, keys) fp32: each head of each finer layer at the pixels nearest-downsampling keeps.

        None when the model has no grid finer than the read grid.
        """
        if not self.attributes:
            return None
        gh, gw = self.capture.grid
        return torch.cat(
            [
                self.fine[l.name].float().reshape(-1, gh, gw, self.fine[l.name].shape[-1])
                for l in self.capture.attribute_layers
            ]
        )


def _query_key(attn, hidden_states, encoder_hidden_states, temb, index: int, rows: torch.Tensor | None = None):
    """Query and key of batch element ``index`` as (heads, L, head_dim), computed as ``AttnProcessor2_0`` does;
    with ``rows``, the query of those pixels only (picked after the group norm, which spans all pixels, and
    before ``to_q``: at 512 px a finer layer's full query costs 4 (32x32) to 16 (64x64) times the kept rows')."""
    hidden_states = hidden_states[index : index + 1]
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb if temb is None else temb[index : index + 1])
    if hidden_states.ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states if rows is None else hidden_states.index_select(1, rows))
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    else:
        encoder_hidden_states = encoder_hidden_states[index : index + 1]
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(1, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(1, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query[0], key[0]


class _CaptureProcessor:
    """A read layer's processor: the original one's output, plus the probabilities while recording.

    Display passes (no grad) and attribute layers keep the original processor's output, so an unguided run is
    exactly diffusers', and compute the probabilities of one batch element apart (for attribute layers only
    the query rows that nearest-downsampling keeps). The guidance pass of a read layer computes QK^T once,
    reads its softmax and takes the output from it, as diffusers' Attend-and-Excite processor does.
    """

    def __init__(self, capture: "AttentionCapture", layer: LayerInfo, role: str, original):
        self.capture = capture
        self.layer = layer
        self.role = role
        self.original = original

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        rec = self.capture.recording
        if rec is None or not rec.wants(self.role):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        n_query = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * hidden_states.shape[3]
        if n_query != self.layer.grid[0] * self.layer.grid[1]:
            raise RuntimeError(
                f"{self.layer.name}: {n_query} queries, expected the {self.layer.grid} grid; the capture was set up "
                "for another image size"
            )
        explicit = torch.is_grad_enabled() or rec.batch_index is None
        if self.role == "read" and explicit and hidden_states.ndim == 3 and attn.spatial_norm is None:
            return self._explicit(attn, rec, hidden_states, encoder_hidden_states, attention_mask)
        if rec.batch_index is None:
            raise RuntimeError(f"{self.layer.name}: whole-batch recording needs a read layer on 3-d hidden states")

        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        b = rec.batch_index
        rows = self.capture.kept_rows[self.layer.name] if self.role == "attribute" else None
        query, key = _query_key(attn, hidden_states, encoder_hidden_states, temb, b, rows)
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, key.shape[1], hidden_states.shape[0])
            scores = scores + mask.view(hidden_states.shape[0], attn.heads, -1, mask.shape[-1])[b].float()
        rec.add(self.role, self.layer.name, scores.softmax(dim=-1))
        return out

    def _explicit(self, attn, rec: Recording, hidden_states, encoder_hidden_states, attention_mask):
        """``AttnProcessor``'s computation (probabilities, then bmm), recording the probabilities."""
        residual = hidden_states
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)
        probs_b = probs.view(batch_size, attn.heads, *probs.shape[1:])
        rec.add("read", self.layer.name, probs_b if rec.batch_index is None else probs_b[rec.batch_index])
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class AttentionCapture:
    """Attach to a UNet for one image size; restore its processors on exit, leaving it as it was.

    ``attributes=True`` also prepares Divide & Bind's finer grids (recorded only by passes that ask for them).
    """

    def __init__(self, unet, height: int, width: int, vae_scale_factor: int, attributes: bool = False):
        self.unet = unet
        self.size = (int(height), int(width))
        self.layers = cross_attention_layers(unet, height, width, vae_scale_factor)
        self.grid = read_grid(unet, height, width, vae_scale_factor)
        area = self.grid[0] * self.grid[1]
        self.read_layers = [l for l in self.layers if l.grid == self.grid]
        self.attribute_layers = [l for l in self.layers if l.grid[0] * l.grid[1] > area] if attributes else []
        self.aggregation_order = [l for place in _AGGREGATION_ORDER for l in self.read_layers if l.place == place]
        device = next(unet.parameters()).device
        self.kept_rows = {l.name: _nearest_rows(l.grid, self.grid, device) for l in self.attribute_layers}
        self.recording: Recording | None = None
        self._saved = None

    def __enter__(self) -> "AttentionCapture":
        if self._saved is not None:
            raise RuntimeError("this AttentionCapture is already attached")
        self._saved = dict(self.unet.attn_processors)
        procs = dict(self._saved)
        for role, layers in (("read", self.read_layers), ("attribute", self.attribute_layers)):
            for l in layers:
                procs[l.name] = _CaptureProcessor(self, l, role, self._saved[l.name])
        self.unet.set_attn_processor(procs)
        return self

    def __exit__(self, *exc) -> None:
        self.unet.set_attn_processor(self._saved)
        self._saved = None
        self.recording = None

    def record(
        self, batch_index: int | None = 0, attributes: bool = False, stop_early: bool = False
    ) -> "_RecordContext":
        """Record the next UNet pass inside the ``with`` block (see the module docstring); ``batch_index=None``
        records every batch element of the read layers."""
        if batch_index is None and attributes:
            raise ValueError("whole-batch recording reads the read layers only (attributes=False)")
        if self._saved is None:
            raise RuntimeError("attach the capture (with AttentionCapture(...)) before recording")
        return _RecordContext(self, Recording(self, batch_index, attributes, stop_early))


class _RecordContext:
    def __init__(self, capture: AttentionCapture, rec: Recording):
        self.capture, self.rec = capture, rec

    def __enter__(self) -> Recording:
        self.capture.recording = self.rec
        return self.rec

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.capture.recording = None
        return exc_type is StopForward  # the early cut of a guidance pass is not an error
