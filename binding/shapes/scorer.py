"""Read the objects back from a shapes-world image, and score it against its caption.

Why this design. The world's colours are saturated and far apart in hue and its background is white, so a
pixel's colour is told by its hue alone, and blending with the background (a decoder's blur at edges) keeps
the hue while it lowers the saturation. Detection is therefore:

1. each pixel with some saturation takes the palette colour of nearest hue, and its coverage ``alpha`` (how far
   it lies from white towards that colour, 0 to 1, as if the colour were blended with the background); the
   foreground is alpha >= 0.5, the half-coverage contour, which a symmetric blur leaves where the true edge was
   (a saturation threshold would not: under blur it shrinks dark colours' shapes and grows bright ones');
2. connected components per colour (8-connected), so objects of different colours that touch stay apart; blobs
   smaller than ``min_area`` are ignored (decoder speckle);
3. each blob's shape from scale-free numbers: extent (area / bounding-box area: square 1, circle 0.79,
   triangle and star ~0.5), solidity (area / convex-hull area: star 0.6, the others > 0.9) and the 3-, 4- and
   5-fold harmonics of the blob's outline radius around its centroid (triangle, square, star; ~0 for a circle),
   which blur weakens but does not move. The most likely shape under one diagonal Gaussian per shape wins, or
   "other" for a blob far from every shape. All of the numbers ignore position and size, the harmonics also
   rotation.

The scorer is measured on ground-truth renders, clean and degraded (blur, noise, resampling through 32x32), in
``tests/test_scorer.py``: every object of 1000 clean renders, >= 99% under each mild degradation. Training
also measures it on the trained VAE's round trips (``binding.shapes``), the ceiling of any model's score.

``score_image`` matches the caption's objects to the detections: an object is *present* when a blob of its
shape exists, *bound* when a blob of its shape exists in its colour (one blob serves one object). A present but
unbound object is *leaked* when its shape appears in the colour of another object of the caption: the
attribute went to the wrong object, the failure the guidance methods target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from binding.shapes.world import COLOURS, SHAPES, parse_caption

__all__ = [
    "DEGRADATIONS", "Detection", "STATES", "UNCLEAR", "accuracy", "classify", "colour_labels", "degrade", "detect",
    "object_states", "reading", "score_image", "shape_features", "vae_reader",
]

MIN_SATURATION = 0.12  # below this the hue is noise (the white background's grain)
MIN_VALUE = 0.2
MIN_ALPHA = 0.5
MIN_AREA_FRACTION = 0.005  # of the image: 20 pixels at 64x64 (the smallest object, a 14 px star, has ~80)
N_ANGLES = 36  # angular bins of the outline radius

FEATURES = ("extent", "solidity", "harmonic3", "harmonic4", "harmonic5")
# Each shape's features as a diagonal Gaussian: mean and spread over renders of every size, clean and degraded
# (noise, Gaussian blur of 1 and 1.5 px, resampling through 32x32), fitted once (tests/test_scorer.py measures
# the result on other scenes). Spreads are floored at ``MIN_SPREAD`` so no feature is trusted beyond what a
# model's imperfect drawings allow.
PROTOTYPES: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "circle": ((0.791, 0.948, 0.001, 0.006, 0.001), (0.012, 0.007, 0.001, 0.005, 0.001)),
    "square": ((0.994, 0.997, 0.001, 0.076, 0.001), (0.007, 0.003, 0.001, 0.004, 0.001)),
    "triangle": ((0.568, 0.916, 0.153, 0.013, 0.017), (0.047, 0.013, 0.018, 0.011, 0.007)),
    "star": ((0.521, 0.689, 0.017, 0.024, 0.144), (0.088, 0.093, 0.011, 0.023, 0.040)),
}
MIN_SPREAD = 0.02
MAX_DISTANCE = 4.0  # RMS z-score beyond which a blob is no shape of the world ("other")
UNCLEAR_DISTANCE = 3.0  # beyond this the shape is a guess: said to be unclear
COLOUR_SHARE = 0.7  # an object whose commonest colour covers less of it is two-coloured: unclear
assert tuple(PROTOTYPES) == SHAPES


def _hues() -> np.ndarray:
    rgb = np.array(list(COLOURS.values()), dtype=np.float64)[None] / 255.0
    return _hsv(rgb)[0][0]


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees, saturation and value of an (..., 3) float array in [0, 1]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    d = mx - mn
    safe = np.where(d > 0, d, 1.0)
    h = np.where(mx == r, (g - b) / safe % 6.0, np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h = np.where(d > 0, h * 60.0, 0.0)
    s = np.where(mx > 0, d / np.where(mx > 0, mx, 1.0), 0.0)
    return h, s, mx


PALETTE_HUES = _hues()
PALETTE_RGB = np.array(list(COLOURS.values()), dtype=np.float64)
COLOUR_NAMES = tuple(COLOURS)


@dataclass(frozen=True)
class Detection:
    """One blob: its colour, shape, bounding box (x0, y0, x1, y1; x1, y1 exclusive), area and features."""

    colour: str
    shape: str
    box: tuple[int, int, int, int]
    area: int
    features: tuple[float, ...]  # FEATURES
    distance: float  # to the chosen prototype, in feature scales (large: an odd shape)
    colour_share: float = 1.0  # of the blob's pixels in its colour
    unclear: str = ""  # "", "colour" (several colours) or "shape" (no clear shape)

    @property
    def pair(self) -> tuple[str, str]:
        return (self.colour, self.shape)

    def to_dict(self) -> dict:
        return {
            "colour": self.colour,
            "shape": self.shape,
            "box": list(self.box),
            "area": self.area,
            "features": [round(f, 4) for f in self.features],
            "distance": round(self.distance, 3),
            "colour_share": round(self.colour_share, 3),
            "unclear": self.unclear,
        }


def _as_array(image) -> np.ndarray:
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an RGB image, got an array of shape {arr.shape}")
    if arr.dtype != np.uint8:  # floats in [0, 1]
        arr = np.clip(np.round(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return arr


def colour_labels(image) -> np.ndarray:
    """(H, W) int: each foreground pixel's palette index (nearest hue, coverage >= 0.5), -1 for background."""
    arr = _as_array(image)
    labels = np.full(arr.shape[:2], -1, dtype=np.int64)
    flat = arr.reshape(-1, 3).astype(np.float64)
    mx, mn = flat.max(-1), flat.min(-1)
    idx = np.flatnonzero((mx - mn >= MIN_SATURATION * mx) & (mx >= MIN_VALUE * 255.0))  # hue is meaningful
    if not len(idx):
        return labels
    px = flat[idx]
    h = _hsv(px / 255.0)[0]
    diff = np.abs(h[:, None] - PALETTE_HUES)
    nearest = np.minimum(diff, 360.0 - diff).argmin(-1)
    towards = 255.0 - PALETTE_RGB[nearest]  # from white to the colour
    alpha = ((255.0 - px) * towards).sum(-1) / (towards * towards).sum(-1)
    keep = alpha >= MIN_ALPHA
    labels.reshape(-1)[idx[keep]] = nearest[keep]
    return labels


def _components(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels (0 = not in mask): min-label propagation with pointer jumping, on the
    mask's bounding box; vectorised, no scipy."""
    out = np.zeros(mask.shape, dtype=np.int64)
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return out
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    m = mask[y0:y1, x0:x1]
    h, w = m.shape
    big = h * w
    lab = np.where(m, np.arange(h * w).reshape(h, w), big)
    pad = np.full((h + 2, w + 2), big)
    while True:
        pad[1:-1, 1:-1] = lab
        nb = lab.copy()
        for dy in range(3):
            for dx in range(3):
                np.minimum(nb, pad[dy : dy + h, dx : dx + w], out=nb)
        nb = np.where(m, nb, big)
        flat = np.append(nb.ravel(), big)
        nb = np.where(m, flat[nb], big)  # jump: a pixel takes its label's label
        if np.array_equal(nb, lab):
            break
        lab = nb
    out[y0:y1, x0:x1] = np.where(m, lab + 1, 0)
    return out


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of (N, 2) points (Andrew's monotone chain + shoelace)."""
    pts = points[np.lexsort((points[:, 1], points[:, 0]))].tolist()
    if len(pts) < 3:
        return 0.0

    def half(seq):
        out: list = []
        for p in seq:
            while len(out) >= 2:
                (ax, ay), (bx, by) = out[-2], out[-1]
                if (bx - ax) * (p[1] - ay) - (by - ay) * (p[0] - ax) <= 0:
                    out.pop()
                else:
                    break
            out.append(p)
        return out

    lower, upper = half(pts), half(pts[::-1])
    hull = np.array(lower[:-1] + upper[:-1])
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def shape_features(mask: np.ndarray) -> tuple[float, ...]:
    """``FEATURES`` of a blob mask. Hull and outline use pixel corners, so a square's solidity is exactly 1."""
    ys, xs = np.nonzero(mask)
    area = len(xs)
    extent = area / float((xs.max() + 1 - xs.min()) * (ys.max() + 1 - ys.min()))
    corners_x = np.concatenate([xs, xs + 1, xs, xs + 1]).astype(np.float64)
    corners_y = np.concatenate([ys, ys, ys + 1, ys + 1]).astype(np.float64)
    # The hull needs only each row's outermost corners.
    order = np.lexsort((corners_x, corners_y))
    cy, cx = corners_y[order], corners_x[order]
    first = np.r_[True, cy[1:] != cy[:-1]]
    last = np.r_[cy[1:] != cy[:-1], True]
    edge = first | last
    solidity = min(area / max(_hull_area(np.stack([cx[edge], cy[edge]], 1)), 1.0), 1.0)
    # Outline radius per angle around the centroid (the farthest corner in each bin), and its harmonics.
    dx, dy = corners_x - (xs.mean() + 0.5), corners_y - (ys.mean() + 0.5)
    bins = ((np.arctan2(dy, dx) + np.pi) * (N_ANGLES / (2 * np.pi))).astype(np.int64) % N_ANGLES
    radius = np.zeros(N_ANGLES)
    np.maximum.at(radius, bins, np.hypot(dx, dy))
    spectrum = np.abs(np.fft.rfft(radius)) / (N_ANGLES * max(radius.mean(), 1e-9))
    return (float(extent), float(solidity), float(spectrum[3]), float(spectrum[4]), float(spectrum[5]))


def classify(features: Sequence[float]) -> tuple[str, float]:
    """The most likely shape (diagonal Gaussians) and its RMS z-score; "other" when that exceeds MAX_DISTANCE."""
    f = np.asarray(features, dtype=np.float64)
    best, best_ll, best_z = "other", -np.inf, np.inf
    for shape, (mean, spread) in PROTOTYPES.items():
        sd = np.maximum(np.asarray(spread), MIN_SPREAD)
        z2 = ((f - np.asarray(mean)) / sd) ** 2
        ll = -0.5 * z2.sum() - np.log(sd).sum()
        if ll > best_ll:
            best, best_ll, best_z = shape, ll, float(np.sqrt(z2.mean()))
    return (best if best_z <= MAX_DISTANCE else "other"), best_z


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with its holes filled: background not connected to the border becomes inside (the world's
    shapes have no holes; a decoder's pale patch inside an object is not a hole of its shape)."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    sub = np.pad(mask[y0:y1, x0:x1], 1)
    outside = _components(~sub)
    border = set(np.unique(np.concatenate([outside[0], outside[-1], outside[:, 0], outside[:, -1]]))) - {0}
    filled = ~np.isin(outside, list(border))
    out = mask.copy()
    out[y0:y1, x0:x1] = filled[1:-1, 1:-1]
    return out


def detect(image, min_area: int | None = None) -> list[Detection]:
    """The objects in an RGB image (PIL or uint8/float array), largest first.

    An object is a connected blob of foreground of any colours (so one object drawn in two colours stays one
    object), with its holes filled for its shape; its colour is its commonest palette colour. A blob whose
    commonest colour covers less than ``COLOUR_SHARE`` of it, or whose outline is far from every shape, is
    *unclear*: the scorer says so instead of guessing.
    """
    labels = colour_labels(image)
    h, w = labels.shape
    min_area = int(round(MIN_AREA_FRACTION * h * w)) if min_area is None else int(min_area)
    comp = _components(labels >= 0)
    found: list[Detection] = []
    ids, counts = np.unique(comp[comp > 0], return_counts=True)
    for i, n in zip(ids, counts):
        if n < min_area:
            continue
        mask = comp == i
        colours = np.bincount(labels[mask], minlength=len(COLOUR_NAMES))
        k = int(colours.argmax())
        share = float(colours[k] / n)
        solid = _fill_holes(mask)
        ys, xs = np.nonzero(solid)
        feats = shape_features(solid)
        shape, dist = classify(feats)
        unclear = "colour" if share < COLOUR_SHARE else "shape" if shape == "other" or dist > UNCLEAR_DISTANCE else ""
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        found.append(Detection(COLOUR_NAMES[k], shape, box, int(n), feats, dist, share, unclear))
    found.sort(key=lambda d: (-d.area, d.box))
    return found


UNCLEAR = "?"
STATES = ("bound", "leak", "wrong", "unclear", "missing")


def object_states(objects, seen) -> list[str]:
    """Each caption object's state from what is seen, ``(colour, shape)`` pairs where either may be ``UNCLEAR``:
    *bound* (its shape in its colour), *leak* (its shape in another caption object's colour), *wrong* (its shape
    in a colour of no object), *unclear* (its shape in no clear colour, or a blob of no clear shape left for it),
    *missing*. Exact matches claim their blobs first; one blob serves one object. The same rules read a
    person's labels (``tests/data/scorer_audit``), so the two can be compared."""
    seen = [tuple(x) for x in seen]
    free = list(range(len(seen)))
    out: list[str | None] = [None] * len(objects)
    colours = [c for c, _ in objects]
    for j, (c, sh) in enumerate(objects):
        for i in free:
            if seen[i] == (c, sh):
                out[j] = "bound"
                free.remove(i)
                break
    for j, (c, sh) in enumerate(objects):
        if out[j]:
            continue
        same = [i for i in free if seen[i][1] == sh]
        if same:
            others = [i for i in same if seen[i][0] in colours and seen[i][0] != c]
            unclear = [i for i in same if seen[i][0] == UNCLEAR]
            i = (others or unclear or same)[0]
            out[j] = "leak" if others else "unclear" if unclear else "wrong"
            free.remove(i)
            continue
        shapeless = [i for i in free if seen[i][1] == UNCLEAR]
        if shapeless:
            out[j] = "unclear"
            free.remove(shapeless[0])
            continue
        out[j] = "missing"
    return out  # type: ignore[return-value]


def reading(d: Detection) -> tuple[str, str]:
    """What a detection says, with ``UNCLEAR`` where the scorer will not guess."""
    return (UNCLEAR if d.unclear == "colour" else d.colour,
            UNCLEAR if d.unclear == "shape" or d.shape == "other" else d.shape)


def score_image(image, caption_objects, detections: list[Detection] | None = None) -> dict:
    """How an image renders its caption: each object's state (``object_states``) and the image's verdicts.

    ``caption_objects``: a caption of the world's grammar or a list of (colour, shape). Returns ``present_all``
    (every object's shape is there), ``bound_all`` (every object clearly there in its own colour), per-object
    ``states`` and ``present``/``bound``/``leaked``/``unclear`` lists, ``leak_any``, ``unclear_any``, ``extra``
    (blobs no object claimed) and the detections.
    """
    if isinstance(caption_objects, str):
        objects = parse_caption(caption_objects)
    else:
        objects = [tuple(o) for o in caption_objects]
    dets = detect(image) if detections is None else detections
    states = object_states(objects, [reading(d) for d in dets])
    claimed = sum(st != "missing" for st in states)
    return {
        "objects": [list(o) for o in objects],
        "states": states,
        "present": [st != "missing" for st in states],
        "bound": [st == "bound" for st in states],
        "leaked": [st == "leak" for st in states],
        "unclear": [st == "unclear" for st in states],
        "present_all": all(st != "missing" for st in states),
        "bound_all": all(st == "bound" for st in states),
        "leak_any": any(st == "leak" for st in states),
        "unclear_any": any(st == "unclear" for st in states),
        "n_detected": len(dets),
        "extra": max(0, len(dets) - claimed),
        "detections": [d.to_dict() for d in dets],
    }


# ------------------------------------------------------------------------------- the scorer's own accuracy

DEGRADATIONS = ("clean", "noise", "blur1.0", "blur1.5", "resample")


def degrade(arr: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """What a decoder does to a render, roughly: grain, blur (``blur<px>``), detail lost through a 32x32 grid."""
    from PIL import Image, ImageFilter

    if kind not in DEGRADATIONS and not kind.startswith("blur"):
        raise ValueError(f"unknown degradation {kind!r}; one of {', '.join(DEGRADATIONS)}")
    img = Image.fromarray(arr)
    if kind.startswith("blur"):
        img = img.filter(ImageFilter.GaussianBlur(float(kind[4:])))
    elif kind == "resample":
        img = img.resize((32, 32), Image.BILINEAR).resize((64, 64), Image.BICUBIC)
    out = np.asarray(img).astype(np.float64)
    if kind != "clean":
        out = out + rng.normal(0.0, 10.0 if kind == "noise" else 6.0, out.shape)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def vae_reader(vae):
    """A ``reader`` for ``accuracy``: a render's round trip through ``vae`` (encode the mean, decode), so the
    scorer's accuracy on it is the ceiling of any score a model on that VAE can get."""
    import torch

    vae = vae.eval()

    @torch.no_grad()
    def roundtrip(arr: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1)[None].to(vae.device, vae.dtype) / 127.5 - 1.0
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        return ((rec[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()

    return roundtrip


def accuracy(n: int, kind: str = "clean", seed: int = 0, reader=None) -> dict:
    """How well the scorer reads ``n`` ground-truth scenes of the whole world (1-4 objects, every colour-shape
    combination): objects read right, images read exactly right, and the errors. ``reader`` maps a render to
    the image the scorer sees (default: ``degrade(kind)``; ``teach check-scorer`` passes a VAE round trip)."""
    from collections import Counter

    from binding.shapes.world import sample_scene

    rng = np.random.default_rng(seed)
    right = total = exact = 0
    errors: Counter = Counter()
    for i in range(n):
        scene = sample_scene((7 << 40) + seed * 100_000 + i, split="any")
        img = reader(scene.array()) if reader is not None else degrade(scene.array(), kind, rng)
        found = Counter(d.pair for d in detect(img))
        wanted = Counter(scene.pairs)
        hits = sum((found & wanted).values())
        right += hits
        total += len(scene.objects)
        exact += hits == len(scene.objects) and sum(found.values()) == len(scene.objects)
        errors.update({(k, "missed"): v for k, v in (wanted - found).items()})
        errors.update({(k, "spurious"): v for k, v in (found - wanted).items()})
    return {"kind": kind, "scenes": n, "objects": total, "objects_right": right, "object_accuracy": right / total,
            "image_accuracy": exact / n, "errors": errors}
