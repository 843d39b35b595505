"""A procedural world of flat coloured shapes, with exact ground truth, for the teaching model.

Why this world. Attribute leakage in Stable Diffusion is judged by eye; here every image a model draws can be
scored exactly (``binding.shapes.scorer`` reads the objects back), because the world is small and fully known:

- 1 to 3 objects on a plain white background, each a flat colour and one of four shapes, no two touching;
- within a scene every object has its own colour and its own shape, so "the circle" and "the red object" each
  name one object and "every object present, in its own colour" is a well-posed question;
- captions in the grammar the SynGen parser handles ("a red circle", "a red circle and a blue square",
  "a green triangle, a red circle and a yellow square"; the order of the objects in a caption is random);
- every word is a single CLIP token, and captions parse into the right bindings with ``binding.analysis.analyze``
  (checked for every two-object caption and a sample of three-object ones; "cross" and "heart" were dropped
  because the parser loses them in lists, e.g. "a red circle and a pink cross" binds only the circle, and
  "cyan" because CLIP splits it in two).

Colours are far apart in hue and saturated, so a colour survives blending with the background (a decoder's
blur) and is read back by hue alone. Shapes are drawn without antialiasing (a pixel is inside when its centre
is), so a render holds exactly the palette colours and the background.

Held-out split (fixed once, before any model was trained; not tuned to any method):

- ``HELDOUT_COMBOS``: one colour-shape combination per colour never appears in training (no training scene
  contains it). Prompts with such an object test whether a colour binds to a shape it was never seen on.
- ``HELDOUT_PROMPTS``: 28 two-object prompts. The first 14 ("unseen") each hold one withheld combination and
  one seen one; each withheld combination appears twice, once first and once second. The last 14 ("seen") hold
  two seen combinations; no training scene holds both objects of a held-out prompt, so even the seen prompts'
  pairings are new to the model.

Determinism: scenes come from ``random.Random(seed).random()`` only (Mersenne Twister, specified and stable
across Python versions and platforms) turned into integers by our own arithmetic, and rendering uses only
float64 +, -, *, / (correctly rounded everywhere; no libm calls: the star's vertices are constants), so a seed
gives the same pixels on every machine (a test pins digests of renders).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "BACKGROUND",
    "CANVAS",
    "COLOURS",
    "HELDOUT_COMBOS",
    "HELDOUT_SEED",
    "HELDOUT_PROMPTS",
    "HELDOUT_SEEN",
    "HELDOUT_UNSEEN",
    "SHAPES",
    "Obj",
    "Scene",
    "calibration_prompts",
    "caption",
    "draw_heldout_prompts",
    "in_training",
    "layout_scene",
    "object_mask",
    "parse_caption",
    "render",
    "sample_scene",
    "training_scene",
]

CANVAS = 64  # the world's coordinates are pixels of a 64x64 image; ``render`` scales to other sizes
BACKGROUND = (255, 255, 255)
# Saturated colours spread over the hue circle (HSV hue in degrees): red 0, orange 29, yellow 55, green 139,
# blue 224, purple 276, pink 328. The closest pairs (orange/yellow, red/orange, pink/red) are >= 25 deg apart.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "orange": (245, 125, 15),
    "yellow": (240, 220, 20),
    "green": (30, 160, 70),
    "blue": (35, 85, 225),
    "purple": (140, 50, 200),
    "pink": (240, 50, 150),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

SIZE_RANGE = (14, 24)  # an object's box side in canvas pixels, inclusive
MARGIN = 2  # free pixels between an object and the image border
GAP = 4  # free pixels between two objects' boxes (one latent cell at the VAE's factor 4)
N_OBJECTS_WEIGHTS = {1: 0.2, 2: 0.5, 3: 0.3}  # training scenes by number of objects

# One withheld shape per colour, shape index (colour index + 1) mod 4, so every colour and every shape is
# still seen in training with others (circle is withheld once, the others twice).
HELDOUT_COMBOS: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "square"),
        ("orange", "triangle"),
        ("yellow", "star"),
        ("green", "circle"),
        ("blue", "square"),
        ("purple", "triangle"),
        ("pink", "star"),
    }
)

# Two-object prompts; see the module docstring. Frozen output of ``draw_heldout_prompts(HELDOUT_SEED)`` (a test
# checks that they agree), written out so the list reads at a glance.
HELDOUT_SEED = 2024
HELDOUT_UNSEEN: tuple[str, ...] = (
    "a blue square and a yellow triangle",
    "a purple circle and a blue square",
    "a green circle and an orange square",
    "a blue star and a green circle",
    "an orange triangle and a green square",
    "a pink circle and an orange triangle",
    "a pink star and a red triangle",
    "an orange circle and a pink star",
    "a purple triangle and a green star",
    "a yellow square and a purple triangle",
    "a red square and a purple star",
    "a pink triangle and a red square",
    "a yellow star and a blue triangle",
    "a red circle and a yellow star",
)
HELDOUT_SEEN: tuple[str, ...] = (
    "a purple square and an orange star",
    "a green triangle and a blue circle",
    "a pink square and a red star",
    "a pink triangle and a yellow circle",
    "an orange square and a blue star",
    "a purple circle and a red triangle",
    "a yellow square and a green star",
    "a blue triangle and a pink square",
    "a purple star and an orange circle",
    "a red circle and a green triangle",
    "an orange star and a yellow circle",
    "a yellow triangle and a purple square",
    "a red star and a green square",
    "a blue triangle and a pink circle",
)
HELDOUT_PROMPTS: tuple[str, ...] = HELDOUT_UNSEEN + HELDOUT_SEEN

# A regular 5-pointed star (inner radius 0.45 of the outer, fatter than a pentagram so its points survive a
# decoder), point up, as exact constants: x = sin(36 k deg) * rho, y = -cos(36 k deg) * rho, k = 0..9.
_STAR = np.array(
    [
        (0.0, -1.0),
        (0.26450336353161627, -0.36405764746872633),
        (0.9510565162951535, -0.30901699437494745),
        (0.42797717232879345, 0.13905764746872632),
        (0.5877852522924731, 0.8090169943749475),
        (0.0, 0.45),
        (-0.5877852522924731, 0.8090169943749475),
        (-0.42797717232879345, 0.13905764746872632),
        (-0.9510565162951535, -0.30901699437494745),
        (-0.26450336353161627, -0.36405764746872633),
    ]
)
_TRIANGLE = np.array([(0.0, 0.0), (0.5, 1.0), (-0.5, 1.0)])  # apex up; fills its box's width and height


# ------------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class Obj:
    """One object: colour, shape and its box in canvas pixels (x0, y0 inclusive; x1, y1 exclusive)."""

    colour: str
    shape: str
    box: tuple[int, int, int, int]

    @property
    def size(self) -> int:
        return self.box[2] - self.box[0]

    @property
    def pair(self) -> tuple[str, str]:
        return (self.colour, self.shape)

    @property
    def phrase(self) -> str:
        return f"{_article(self.colour)} {self.colour} {self.shape}"

    def to_dict(self) -> dict:
        return {"colour": self.colour, "shape": self.shape, "box": list(self.box)}


@dataclass(frozen=True)
class Scene:
    """Objects in caption order, the seed that drew them, and the caption; ``image()`` renders it."""

    objects: tuple[Obj, ...]
    seed: int | None = None

    @property
    def caption(self) -> str:
        return caption(o.pair for o in self.objects)

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return [o.pair for o in self.objects]

    def array(self, size: int = CANVAS) -> np.ndarray:
        return render(self, size)

    def image(self, size: int = CANVAS):
        from PIL import Image

        return Image.fromarray(render(self, size), "RGB")

    def to_dict(self) -> dict:
        return {"caption": self.caption, "seed": self.seed, "objects": [o.to_dict() for o in self.objects]}


# --------------------------------------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(pairs: Iterable[tuple[str, str]]) -> str:
    """'a red circle', 'a red circle and a blue square', 'a, b and c': the grammar the parser handles."""
    phrases = [f"{_article(c)} {c} {s}" for c, s in pairs]
    if not phrases:
        raise ValueError("a caption needs at least one object")
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


_PHRASE = re.compile(r"^an? (?P<colour>\w+) (?P<shape>\w+)$")


def parse_caption(text: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs of a caption in the world's grammar; ValueError for anything else."""
    body = " ".join(str(text).strip().lower().rstrip(".").split())
    head, sep, last = body.rpartition(" and ")
    parts = ([p.strip() for p in head.split(",")] + [last.strip()]) if sep else [body]
    pairs = []
    for part in parts:
        m = _PHRASE.match(part)
        if not m or m["colour"] not in COLOURS or m["shape"] not in SHAPES or part.split()[0] != _article(m["colour"]):
            raise ValueError(
                f"{text!r} is not a caption of the shapes world: write 'a COLOUR SHAPE', joined by ', ' and "
                f"' and ' (colours: {', '.join(COLOURS)}; shapes: {', '.join(SHAPES)})"
            )
        pairs.append((m["colour"], m["shape"]))
    return pairs


# ------------------------------------------------------------------------------------------- sampling


def _randint(rng: random.Random, lo: int, hi: int) -> int:
    """Uniform in lo..hi inclusive, from ``rng.random()`` only (see the module docstring)."""
    return lo + min(int(rng.random() * (hi - lo + 1)), hi - lo)


def _sample(rng: random.Random, items: Sequence, k: int) -> list:
    pool = list(items)
    for i in range(k):  # partial Fisher-Yates
        j = _randint(rng, i, len(pool) - 1)
        pool[i], pool[j] = pool[j], pool[i]
    return pool[:k]


def _separated(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


def _layout(rng: random.Random, n: int) -> list[tuple[int, int, int, int]]:
    """n boxes of random sizes at random places, ``GAP`` apart and ``MARGIN`` from the border."""
    while True:  # a full restart (new sizes) when the objects do not fit; rare for 3 objects
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(n):
            s = _randint(rng, *SIZE_RANGE)
            for _try in range(200):
                x0 = _randint(rng, MARGIN, CANVAS - MARGIN - s)
                y0 = _randint(rng, MARGIN, CANVAS - MARGIN - s)
                box = (x0, y0, x0 + s, y0 + s)
                if all(_separated(box, b) for b in boxes):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == n:
            return boxes


def layout_scene(pairs: Sequence[tuple[str, str]], seed: int) -> Scene:
    """The given (colour, shape) objects, in this caption order, at sizes and places drawn from ``seed``."""
    for c, s in pairs:
        if c not in COLOURS or s not in SHAPES:
            raise ValueError(f"unknown colour or shape: {c!r} {s!r}")
    rng = random.Random(int(seed))
    boxes = _layout(rng, len(pairs))
    return Scene(tuple(Obj(c, s, b) for (c, s), b in zip(pairs, boxes)), int(seed))


def _draw_pairs(rng: random.Random, n: int) -> list[tuple[str, str]]:
    colours = _sample(rng, list(COLOURS), n)
    shapes = _sample(rng, SHAPES, n)
    return list(zip(colours, shapes))


def _n_objects(rng: random.Random) -> int:
    u, acc = rng.random(), 0.0
    for n, w in N_OBJECTS_WEIGHTS.items():
        acc += w
        if u < acc:
            return n
    return max(N_OBJECTS_WEIGHTS)


_HELDOUT_PAIR_SETS = tuple(frozenset(parse_caption(p)) for p in HELDOUT_PROMPTS)


def in_training(pairs: Iterable[tuple[str, str]]) -> bool:
    """Whether a scene with these objects may appear in training (see the held-out split above)."""
    pairs = frozenset(pairs)
    if pairs & HELDOUT_COMBOS:
        return False
    return not any(held <= pairs for held in _HELDOUT_PAIR_SETS)


def draw_heldout_prompts(seed: int = 2024) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The procedure that drew ``HELDOUT_UNSEEN`` and ``HELDOUT_SEEN`` (kept so the split can be audited).

    Unseen: for each withheld combination (in sorted order) two prompts, the withheld object first in one and
    second in the other, its partner a seen combination of another colour and shape. Seen: as many prompts of
    two seen combinations. Partners are drawn at random among the candidates that keep colours, shapes and
    combinations most evenly used; no two prompts hold the same pair of objects.
    """
    from collections import Counter

    rng = random.Random(int(seed))
    seen = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT_COMBOS]
    uses: Counter = Counter()
    taken: set[frozenset] = set()

    def cost(objs) -> int:
        return sum(uses[o[0]] + uses[o[1]] + uses[o] for o in objs)

    def pick(candidates):
        best = min(cost(c) for c in candidates)
        chosen = [c for c in candidates if cost(c) == best]
        pair = chosen[_randint(rng, 0, len(chosen) - 1)]
        taken.add(frozenset(pair))
        for o in pair:
            uses.update([o[0], o[1], o])
        return pair

    def compatible(a, b) -> bool:
        return a[0] != b[0] and a[1] != b[1] and frozenset((a, b)) not in taken

    unseen = []
    for w in sorted(HELDOUT_COMBOS):
        for first in (True, False):
            (partner,) = pick([(o,) for o in seen if compatible(w, o)])
            unseen.append(caption([w, partner] if first else [partner, w]))
    both = []
    while len(both) < len(unseen):
        pairs = [(a, b) for a in seen for b in seen if compatible(a, b)]
        both.append(caption(pick(pairs)))
    return tuple(unseen), tuple(both)


CALIBRATION_SEED = 77


def calibration_prompts(n: int = 28, seed: int = CALIBRATION_SEED) -> tuple[str, ...]:
    """Two-object captions for setting a method's step size apart from the held-out test: every object a seen
    combination and no pair of a held-out prompt (so each may occur in training), drawn from ``seed``."""
    rng = random.Random(int(seed))
    held = {frozenset(parse_caption(p)) for p in HELDOUT_PROMPTS}
    out: list[str] = []
    taken: set[frozenset] = set()
    while len(out) < n:
        pairs = _draw_pairs(rng, 2)
        key = frozenset(pairs)
        if in_training(pairs) and key not in held and key not in taken:
            taken.add(key)
            out.append(caption(pairs))
    return tuple(out)


def sample_scene(seed: int, n_objects: int | None = None, split: str = "train") -> Scene:
    """A random scene from ``seed``: 1-3 objects (or ``n_objects``) with distinct colours and shapes.

    ``split="train"`` redraws (from the same generator) until the scene is allowed in training; ``"any"``
    draws from the whole world, held-out combinations included.
    """
    if split not in ("train", "any"):
        raise ValueError(f"split must be 'train' or 'any', not {split!r}")
    if n_objects is not None and not 1 <= n_objects <= len(SHAPES):
        raise ValueError(f"a scene holds 1 to {len(SHAPES)} objects, not {n_objects}")
    rng = random.Random(int(seed))
    n = n_objects or _n_objects(rng)
    while True:  # the number of objects is drawn once, so the split leaves N_OBJECTS_WEIGHTS as they are
        pairs = _draw_pairs(rng, n)
        if split == "any" or in_training(pairs):
            break
    boxes = _layout(rng, n)
    return Scene(tuple(Obj(c, s, b) for (c, s), b in zip(pairs, boxes)), int(seed))


def training_scene(index: int, data_seed: int = 0) -> Scene:
    """The ``index``-th training scene of the stream ``data_seed`` (a pure function: resumable anywhere)."""
    return sample_scene((int(data_seed) << 40) + int(index), split="train")


# ------------------------------------------------------------------------------------------- rendering


def _inside_polygon(px: np.ndarray, py: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule, vectorised over pixel centres."""
    inside = np.zeros(px.shape, dtype=bool)
    x, y = poly[:, 0], poly[:, 1]
    for i in range(len(poly)):
        x1, y1, x2, y2 = x[i - 1], y[i - 1], x[i], y[i]
        if y1 == y2:
            continue
        crosses = (y1 > py) != (y2 > py)
        xc = x1 + (py - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (px < xc)
    return inside


def _unit_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test in box coordinates: u, v in [0, 1] across the box (pixel centres)."""
    if shape == "square":
        return (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "triangle":
        return _inside_polygon(u - 0.5, v, _TRIANGLE)
    if shape == "star":
        # Scale the star so its extent (1.902 x 1.809 outer radii) fills the box, centred.
        w, top, bottom = 2 * 0.9510565162951535, -1.0, 0.8090169943749475
        scale = max(w, bottom - top)
        return _inside_polygon((u - 0.5) * scale, (v - 0.5) * scale + (top + bottom) / 2, _STAR)
    raise ValueError(f"unknown shape {shape!r}")


def object_mask(obj: Obj, size: int = CANVAS) -> np.ndarray:
    """(size, size) bool: the pixels whose centres lie inside the object."""
    k = size / CANVAS
    x0, y0, x1, y1 = obj.box
    xs = np.arange(max(0, int(x0 * k) - 1), min(size, int(np.ceil(x1 * k)) + 1))
    ys = np.arange(max(0, int(y0 * k) - 1), min(size, int(np.ceil(y1 * k)) + 1))
    u = ((xs + 0.5) / k - x0) / (x1 - x0)
    v = ((ys + 0.5) / k - y0) / (y1 - y0)
    uu, vv = np.meshgrid(u, v)
    inside = _unit_mask(obj.shape, uu, vv) & (uu >= 0) & (uu <= 1) & (vv >= 0) & (vv <= 1)
    mask = np.zeros((size, size), dtype=bool)
    mask[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1] = inside
    return mask


def render(scene: Scene, size: int = CANVAS) -> np.ndarray:
    """(size, size, 3) uint8: the background and the objects' exact colours, no antialiasing."""
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for obj in scene.objects:
        img[object_mask(obj, size)] = COLOURS[obj.colour]
    return img
