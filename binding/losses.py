"""Guidance losses on cross-attention maps: SynGen, Attend-and-Excite, Divide & Bind.

Pure functions of tensors (torch only: no model, no state), differentiable w.r.t. the maps. Written from
the project's methods notes (``binding/METHODS.md``), not from the authors' code.

Conventions
-----------
* ``maps`` is the averaged cross-attention probability tensor ``(H, W, 77)`` of ``binding/METHODS.md`` (any H, W;
  the last axis is the CLIP key axis, position 0 = SOT). Positions are CLIP positions; a *word* is either one
  position or a list of positions (the word pieces that spell it).
* Computation runs in fp32: fp16/bf16 maps are upcast (fp64 stays fp64, useful for gradcheck). Logs are clamped.
* "Nothing to do" (no bindings, no subjects, no objects) gives an exact 0 that is still attached to ``maps``'
  graph, so ``torch.autograd.grad(loss, latents)`` works (zero gradient) and the guided loop needs no special case.
* Out-of-range positions raise ``ValueError`` naming the position: the SynGen original silently indexes past the
  77-token limit (or crashes with IndexError), and an off-by-one here would guide the wrong token.

API
---
SynGen (section 2)
    ``syngen_loss(maps, bindings, n_tokens, positive=True, negative=True) -> scalar``
    ``symmetric_kl_matrix(maps, rows, cols) -> (len(rows), len(cols))`` (the D(i, j) table, exposed for plots)
Attend-and-Excite (section 1)
    ``token_softmax(maps, eot_index=None) -> (H, W, T')``   channel k-1 holds token k
    ``smooth_maps(x) -> same shape``                        (H, W) or (H, W, C); reflect pad + 3x3 kernel
    ``attend_excite_loss(maps, subject_positions, smooth=True, eot_index=None) -> (loss, peaks)``
Divide & Bind (section 3)
    ``db_object_maps(maps, positions, eot_index=None) -> (H, W, K)``
    ``db_attribute_maps(maps_per_grid, positions, grid, eot_index=None) -> (h, w, J)``
    ``total_variation(x) -> scalar or (C,)``
    ``db_attendance_loss(object_maps) -> (loss_per_object (K,), tv_per_object (K,))``
    ``db_binding_jsd(object_map, attribute_map, tv) -> scalar``
    ``jensen_shannon(p, q) -> scalar``
    ``db_binding_weight(step_index) -> float``
    ``divide_bind_loss(object_maps, attribute_maps, pairs, step_index, attendance=True, binding=True)
    -> (loss, tvs)``; ``pairs`` holds ``(object_channel, attribute_channel)`` indices into the last axes of
    ``object_maps`` / ``attribute_maps`` as built by the two helpers above.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "AE_KERNEL",
    "attend_excite_loss",
    "db_attendance_loss",
    "db_attribute_maps",
    "db_binding_jsd",
    "db_binding_weight",
    "db_object_maps",
    "divide_bind_loss",
    "jensen_shannon",
    "smooth_maps",
    "symmetric_kl_matrix",
    "syngen_loss",
    "token_softmax",
    "total_variation",
]

Word = int | Sequence[int]

# The 3x3 kernel of A&E's "GaussianSmoothing(kernel_size=3, sigma=0.5)", bit-exact with the float32 weight that
# diffusers builds (1-D taps ~[0.2119, 0.5761, 0.2119]; the code divides by 2*sigma inside the square, so this is
# not a sigma-0.5 Gaussian). Stored as the 2-D kernel: outer(taps, taps) of the rounded 1-D taps differs from
# diffusers' normalised 2-D product in the last bit.
_CORNER = float.fromhex("0x1.6ffa72p-5")  # 0.044919226...
_EDGE = float.fromhex("0x1.f42268p-4")  # 0.122103125...
_CENTRE = float.fromhex("0x1.53e066p-2")  # 0.331910700...
AE_KERNEL = torch.tensor(
    [[_CORNER, _EDGE, _CORNER], [_EDGE, _CENTRE, _EDGE], [_CORNER, _EDGE, _CORNER]], dtype=torch.float32
)

# Categorical's clamp: what SynGen's torch.distributions-based KL does, in fp32.
_EPS32 = torch.finfo(torch.float32).eps


# ----------------------------------------------------------------------------------------------------------------
# shared helpers


def _compute(x: torch.Tensor) -> torch.Tensor:
    """Upcast half types: the KLs and the x100 softmax lose too much in fp16 (SynGen's original raises there)."""
    if not torch.is_floating_point(x):
        raise TypeError(f"expected a floating-point tensor, got {x.dtype}")
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _zero(x: torch.Tensor) -> torch.Tensor:
    """An exact 0 kept on x's graph, so autograd.grad on it returns zeros instead of raising."""
    z = _compute(x).sum() * 0.0
    return torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0).abs()


def _pieces(word: Word) -> list[int]:
    try:
        return [operator.index(word)]  # int, numpy integer, 0-d integer tensor
    except TypeError:
        pass
    out = [operator.index(p) for p in word]
    if not out:
        raise ValueError("empty word: a word needs at least one CLIP position")
    return out


def _check_position(p: int, low: int, high: int, what: str) -> None:
    if not low <= p < high:
        raise ValueError(f"{what} position {p} is out of range: valid CLIP positions here are {low}..{high - 1}")


def _check_maps(maps: torch.Tensor, name: str = "maps") -> None:
    if maps.ndim != 3:
        raise ValueError(f"{name} must be (H, W, tokens), got shape {tuple(maps.shape)}")


# ----------------------------------------------------------------------------------------------------------------
# SynGen


def symmetric_kl_matrix(maps: torch.Tensor, rows: Sequence[int], cols: Sequence[int]) -> torch.Tensor:
    """D(i, j) = (KL(P_i||P_j) + KL(P_j||P_i)) / 2 for i in rows, j in cols; P_k = token k's map over pixels.

    Uses the identity KL(p||q) + KL(q||p) = sum (p - q)(log p - log q): every term is >= 0, so there is no
    cancellation, and only the rows that a loss needs are built (the guidance loop calls this every step).
    """
    _check_maps(maps)
    rows, cols = list(rows), list(cols)
    for p in rows + cols:
        _check_position(p, 0, maps.shape[-1], "token")
    a = _compute(maps).flatten(0, 1)  # (HW, T)
    idx_r = torch.as_tensor(list(rows), dtype=torch.long, device=a.device)
    idx_c = torch.as_tensor(list(cols), dtype=torch.long, device=a.device)
    p = a.index_select(1, idx_r).T  # (R, HW)
    q = a.index_select(1, idx_c).T  # (C, HW)
    tiny = torch.finfo(a.dtype).tiny  # a token with no mass at all (fp16 underflow) must not give 0/0
    p = p / p.sum(-1, keepdim=True).clamp_min(tiny)
    q = q / q.sum(-1, keepdim=True).clamp_min(tiny)
    lp = p.clamp(_EPS32, 1 - _EPS32).log()
    lq = q.clamp(_EPS32, 1 - _EPS32).log()
    return 0.5 * ((p[:, None, :] - q[None, :, :]) * (lp[:, None, :] - lq[None, :, :])).sum(-1)


def syngen_loss(
    maps: torch.Tensor,
    bindings: Sequence[tuple[Sequence[Word], Word]],
    n_tokens: int,
    positive: bool = True,
    negative: bool = True,
) -> torch.Tensor:
    """SynGen's binding loss: pull each modifier's map towards its noun's, push both away from the rest.

    ``bindings``: ``(modifiers, noun)`` per set; each modifier and the noun are a position or a list of
    positions. ``n_tokens`` = CLIP length incl. SOT/EOT after truncation; the "rest" U(S) is every position
    1..n_tokens-2 outside the set (function words and other sets included, as the authors do). Multi-piece words
    use the worst (max) piece pair. A set without modifiers contributes only ``neg(noun)``. Word positions must lie
    in 1..n_tokens-2: SOT, EOT and padding are not words.
    """
    _check_maps(maps)
    n_keys = maps.shape[-1]
    if not 2 <= n_tokens <= n_keys:
        raise ValueError(f"n_tokens={n_tokens} must be in 2..{n_keys} (maps have {n_keys} keys)")

    sets: list[tuple[list[list[int]], list[int]]] = []
    for modifiers, noun in bindings:
        mods = [_pieces(m) for m in modifiers]
        nn_ = _pieces(noun)
        for p in [q for m in mods for q in m] + nn_:
            _check_position(p, 1, n_tokens - 1, "SynGen word")
        sets.append((mods, nn_))
    if not sets or not (positive or negative):
        return _zero(maps)

    words = sorted({p for mods, n in sets for p in [q for m in mods for q in m] + n})
    universe = list(range(1, n_tokens - 1))
    d = symmetric_kl_matrix(maps, words, universe)  # (len(words), len(universe))
    row = {p: i for i, p in enumerate(words)}

    def dist(x: list[int], y: list[int]) -> torch.Tensor:
        return d[[row[i] for i in x]][:, [j - 1 for j in y]].max()

    terms: list[torch.Tensor] = []
    for mods, noun in sets:
        inside = {q for m in mods for q in m} | set(noun)
        outside = [u - 1 for u in universe if u not in inside]

        def neg(x: list[int], outside: list[int] = outside) -> torch.Tensor:
            if not outside:
                return d.new_zeros(())
            # D(x, u) per outside position u: max over x's pieces, then the mean over u, negated.
            return -d[[row[i] for i in x]][:, outside].amax(0).mean()

        if not mods:
            if negative:
                terms.append(neg(noun))
            continue
        neg_noun = neg(noun) if negative else None
        for m in mods:
            if positive:
                terms.append(dist(m, noun))
            if negative:
                terms.append((neg(m) + neg_noun) / 2)
    if not terms:
        return _zero(maps)
    return torch.stack(terms).sum()


# ----------------------------------------------------------------------------------------------------------------
# Attend-and-Excite


def token_softmax(maps: torch.Tensor, eot_index: int | None = None) -> torch.Tensor:
    """A&E's renormalisation: x100 then softmax over the text tokens (SOT dropped), so tokens compete per pixel.

    Channel k-1 holds token k. By default the last key is dropped too (``[1:-1]``, as A&E on SD 1.x);
    ``eot_index`` slices ``[1:eot_index]`` so EOT and padding leave the softmax (the SD 2.1 option).
    """
    _check_maps(maps)
    a = _compute(maps)
    if eot_index is None:
        text = a[..., 1:-1]
    else:
        if not 2 <= eot_index <= a.shape[-1]:
            raise ValueError(f"eot_index={eot_index} out of range 2..{a.shape[-1]}")
        text = a[..., 1:eot_index]
    return F.softmax(text * 100, dim=-1)


def smooth_maps(x: torch.Tensor) -> torch.Tensor:
    """A&E's 3x3 smoothing (reflect pad 1, same kernel as diffusers) so one hot pixel cannot satisfy the loss.

    ``x`` is (H, W) or (H, W, C); each channel is filtered on its own in the same op order as diffusers (reflect
    pad of a (1, 1, H, W) image, then conv2d with a (1, 1, 3, 3) weight) so results match it bit for bit.
    """
    if x.ndim not in (2, 3):
        raise ValueError(f"smooth_maps expects (H, W) or (H, W, C), got shape {tuple(x.shape)}")
    y = _compute(x)
    single = y.ndim == 2
    if single:
        y = y[..., None]
    weight = AE_KERNEL.to(device=y.device, dtype=y.dtype).view(1, 1, 3, 3)
    # One conv per channel, not one batched conv: a batch can pick another conv algorithm and drift from
    # diffusers in the last bit. Channels are few here (subjects / objects).
    out = [
        F.conv2d(F.pad(y[..., c][None, None], (1, 1, 1, 1), mode="reflect"), weight)[0, 0] for c in range(y.shape[-1])
    ]
    res = torch.stack(out, dim=-1) if out else y.clone()
    return res[..., 0] if single else res


def _select(text: torch.Tensor, positions: Sequence[Word], what: str) -> torch.Tensor:
    """Channels of token-softmaxed maps for CLIP positions; a multi-piece word gets the sum of its pieces'
    probability (the token softmax splits a word's mass among its pieces)."""
    chans = []
    for w in positions:
        ps = _pieces(w)
        for p in ps:
            _check_position(p, 1, text.shape[-1] + 1, what)
        chans.append(text[..., ps[0] - 1] if len(ps) == 1 else text[..., [p - 1 for p in ps]].sum(-1))
    return torch.stack(chans, dim=-1)


def attend_excite_loss(
    maps: torch.Tensor,
    subject_positions: Sequence[Word],
    smooth: bool = True,
    eot_index: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A&E: 1 - the peak attention of the most neglected subject token (0 once every peak reaches 1).

    Returns ``(loss, peaks)`` with one peak per subject, in order. Only the weakest subject gets gradient, as in
    the original. Subject positions are CLIP positions (1-based; a list of positions sums the pieces' maps).
    """
    _check_maps(maps)
    if len(subject_positions) == 0:
        return _zero(maps), _compute(maps).new_zeros((0,))
    text = token_softmax(maps, eot_index)
    sel = _select(text, subject_positions, "A&E subject")
    if smooth:
        sel = smooth_maps(sel)
    peaks = sel.amax(dim=(0, 1))
    loss = torch.clamp(1.0 - peaks, min=0.0).max()
    return loss, peaks


# ----------------------------------------------------------------------------------------------------------------
# Divide & Bind


def db_object_maps(maps: torch.Tensor, positions: Sequence[Word], eot_index: int | None = None) -> torch.Tensor:
    """Object maps of D&B: exactly A&E's token softmax + smoothing, one channel per object, in order."""
    if len(positions) == 0:
        _check_maps(maps)
        return _compute(maps).new_zeros((*maps.shape[:2], 0))
    return smooth_maps(_select(token_softmax(maps, eot_index), positions, "D&B object"))


def _grid_hw(grid: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(grid, int):
        return grid, grid
    h, w = (int(v) for v in grid)
    return h, w


def db_attribute_maps(
    maps_per_grid: Mapping[object, torch.Tensor] | Sequence[torch.Tensor],
    positions: Sequence[Word],
    grid: int | Sequence[int],
    eot_index: int | None = None,
) -> torch.Tensor:
    """Attribute maps of D&B: finer-grid attention carries shape/colour detail the object grid blurs away.

    ``maps_per_grid``: tensors of shape (h, w, T) or (N, h, w, T) (a mapping's values are used), at grids at
    least as large as ``grid`` (the object grid side, or (h, w)). Each of the N maps is nearest-downsampled to
    ``grid`` and all are averaged with equal weight; then A&E's token softmax and smoothing. Pass one tensor per
    layer/head, or per-grid averages when each grid holds equally many maps (SD 1.x: 40 at 64x64, 40 at 32x32).
    """
    gh, gw = _grid_hw(grid)
    tensors = list(maps_per_grid.values()) if isinstance(maps_per_grid, Mapping) else list(maps_per_grid)
    if not tensors:
        raise ValueError("db_attribute_maps needs at least one attention tensor")
    total, count = None, 0
    for t in tensors:
        t = _compute(t)
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4:
            raise ValueError(f"attribute attention must be (h, w, T) or (N, h, w, T), got {tuple(t.shape)}")
        if t.shape[1] < gh or t.shape[2] < gw:
            raise ValueError(f"attention grid {tuple(t.shape[1:3])} is smaller than the object grid {(gh, gw)}")
        small = F.interpolate(t.permute(0, 3, 1, 2), size=(gh, gw), mode="nearest")  # (N, T, gh, gw)
        s = small.sum(0)
        total = s if total is None else total + s
        count += t.shape[0]
    avg = (total / count).permute(1, 2, 0)  # (gh, gw, T)
    return db_object_maps(avg, positions, eot_index)


TV_MODES = ("true", "original")


def total_variation(x: torch.Tensor, mode: str = "true") -> torch.Tensor:
    """Total variation: mean |horizontal neighbour diff| + mean |vertical neighbour diff|.

    (H, W) -> scalar; (H, W, C) -> (C,), one per channel. D&B maximises it so an object map splits into separate
    peaks (several instances). ``mode="true"`` compares each row with the next. ``mode="original"`` reproduces
    the authors' code, whose vertical term broadcasts the last row against rows 1..H-1 (``|x[-1] - x[h]|``,
    row 0 never compared; see ``binding/METHODS.md``).
    """
    if x.ndim not in (2, 3):
        raise ValueError(f"total_variation expects (H, W) or (H, W, C), got shape {tuple(x.shape)}")
    if mode not in TV_MODES:
        raise ValueError(f"unknown total-variation mode {mode!r} ({', '.join(TV_MODES)})")
    y = _compute(x)
    dh = (y[:, 1:] - y[:, :-1]).abs()
    dv = (y[1:, :] - y[:-1, :]).abs() if mode == "true" else _original_vertical(y)
    th = dh.mean(dim=(0, 1)) if dh.numel() else dh.new_zeros(dh.shape[2:])
    tv = dv.mean(dim=(0, 1)) if dv.numel() else dv.new_zeros(dv.shape[2:])
    return th + tv


def _original_vertical(y: torch.Tensor) -> torch.Tensor:
    """The authors' vertical term: an L1 loss of ``x[-1:]`` against ``x[1:]``, whose shapes broadcast."""
    return (y[-1:, :] - y[1:, :]).abs()


def db_attendance_loss(object_maps: torch.Tensor, tv: str = "true") -> tuple[torch.Tensor, torch.Tensor]:
    """D&B attendance: -TV of each smoothed object map (lower loss = a more divided, more present object)."""
    _check_maps(object_maps, "object_maps")
    tvs = total_variation(object_maps, tv)
    return -tvs, tvs


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    tiny = torch.finfo(p.dtype).tiny
    return (p * (p.clamp_min(tiny).log() - q.clamp_min(tiny).log())).sum()


def jensen_shannon(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(KL(p||m) + KL(q||m)) / 2 with m = (p + q) / 2, summed over all elements; bounded, unlike KL, so a
    near-empty attribute map cannot blow up D&B's loss. Inputs are used as given (not renormalised)."""
    if p.shape != q.shape:
        raise ValueError(f"shapes differ: {tuple(p.shape)} vs {tuple(q.shape)}")
    p, q = _compute(p), _compute(q)
    m = (p + q) / 2
    return (_kl(p, m) + _kl(q, m)) / 2


def db_binding_jsd(object_map: torch.Tensor, attribute_map: torch.Tensor, tv: torch.Tensor | float) -> torch.Tensor:
    """D&B binding: Jensen-Shannon divergence between an object's and its attribute's pixel distributions.

    The attribute map is first rescaled to the object's peak so only its shape counts; both softmaxed
    distributions are cut at ``qt * max(p)`` (qt = 0.3 when the object is still flat, tv < 0.1, else 0.2) so
    only the high-attention regions are compared, then ``relu + 1e-5`` keeps the logs finite. As in ``binding/METHODS.md``,
    both are cut at the *object's* threshold and not renormalised afterwards.
    """
    if object_map.ndim != 2 or attribute_map.shape != object_map.shape:
        raise ValueError(
            f"object_map and attribute_map must be the same (H, W) shape, got "
            f"{tuple(object_map.shape)} and {tuple(attribute_map.shape)}"
        )
    s = _compute(object_map)
    c = _compute(attribute_map).to(s.dtype)
    c = c / c.max().clamp_min(torch.finfo(c.dtype).tiny) * s.max()
    p = F.softmax(s.flatten(), dim=0)
    q = F.softmax(c.flatten(), dim=0)
    tv_t = torch.as_tensor(tv, device=p.device).detach()
    p_max = p.max()
    thr = torch.where(tv_t < 0.1, 0.3 * p_max, 0.2 * p_max)
    p = F.relu(p - thr) + 1e-5
    q = F.relu(q - thr) + 1e-5
    return jensen_shannon(p, q)


def db_binding_weight(step_index: int) -> float:
    """D&B's binding weight: binding matters more once the layout has formed (1, then 5 from i=10, 10 from 20)."""
    if step_index < 10:
        return 1.0
    if step_index < 20:
        return 5.0
    return 10.0


def divide_bind_loss(
    object_maps: torch.Tensor,
    attribute_maps: torch.Tensor | None,
    pairs: Sequence[tuple[int, int]],
    step_index: int,
    attendance: bool = True,
    binding: bool = True,
    tv: str = "true",
) -> tuple[torch.Tensor, torch.Tensor]:
    """D&B: max over objects of (-TV_k + w_i * JSD_k); only the worst object is optimised, as in the paper.

    ``object_maps`` (H, W, K) from ``db_object_maps``; ``attribute_maps`` (H, W, J) from ``db_attribute_maps``
    (may be None when there are no pairs); ``pairs``: ``(k, j)`` = object channel k is bound to attribute
    channel j. Objects without a pair use -TV_k; an object with several attributes takes its largest JSD (an
    extension: the original binds one colour per object). With ``attendance=False`` the -TV term is dropped,
    with ``binding=False`` the JSD term; ``tv`` is ``total_variation``'s mode. Returns ``(loss, tvs)``; ``tvs``
    (K,) drive D&B's refinement (``min(tvs)`` against its thresholds) whatever the switches.
    """
    _check_maps(object_maps, "object_maps")
    n_obj = object_maps.shape[-1]
    _, tvs = db_attendance_loss(object_maps, tv)
    if n_obj == 0:
        return _zero(object_maps), tvs
    pairs = [(int(k), int(j)) for k, j in pairs]
    if pairs:
        if attribute_maps is None:
            raise ValueError("pairs given but attribute_maps is None")
        _check_maps(attribute_maps, "attribute_maps")
        if attribute_maps.shape[:2] != object_maps.shape[:2]:
            raise ValueError(
                f"attribute_maps grid {tuple(attribute_maps.shape[:2])} != object grid {tuple(object_maps.shape[:2])}"
            )
    for k, j in pairs:
        if not 0 <= k < n_obj:
            raise ValueError(f"D&B pair object index {k} out of range 0..{n_obj - 1}")
        if not 0 <= j < attribute_maps.shape[-1]:
            raise ValueError(f"D&B pair attribute index {j} out of range 0..{attribute_maps.shape[-1] - 1}")
    if not (attendance or binding):
        return _zero(object_maps), tvs

    zero = tvs.new_zeros(())
    w = db_binding_weight(step_index)
    per_object = []
    for k in range(n_obj):
        term = -tvs[k] if attendance else zero
        if binding:
            jsds = [db_binding_jsd(object_maps[..., k], attribute_maps[..., j], tvs[k]) for kk, j in pairs if kk == k]
            if jsds:
                term = term + w * torch.stack(jsds).max()
        per_object.append(term)
    return torch.stack(per_object).max(), tvs
