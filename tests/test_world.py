"""The shapes world: deterministic, no overlaps, exact colours, a sealed held-out split, parseable captions."""

import hashlib
import itertools
from collections import Counter

import numpy as np
import pytest

from binding.analysis import analyze, analyze_doc, load_parser
from binding.shapes import world
from binding.shapes.world import (
    BACKGROUND,
    COLOURS,
    GAP,
    HELDOUT_COMBOS,
    HELDOUT_PROMPTS,
    HELDOUT_SEEN,
    HELDOUT_UNSEEN,
    MARGIN,
    SHAPES,
    caption,
    in_training,
    layout_scene,
    object_mask,
    parse_caption,
    sample_scene,
    training_scene,
)
from binding.tokenizer import load_tokenizer

SCENES = [training_scene(i) for i in range(1500)]


def test_same_seed_same_pixels_on_every_machine():
    assert sample_scene(7) == sample_scene(7) and sample_scene(7) != sample_scene(8)
    assert np.array_equal(training_scene(3).array(), training_scene(3).array())
    # Golden digests: a change here means the world (and every model trained on it) changed.
    h = hashlib.sha256()
    for s in SCENES[:50]:
        h.update(s.array().tobytes())
    assert h.hexdigest() == "d83831e43cfa8a53cce8ee544e60207878a11079d0373dd8f4858de65607376d"
    h = hashlib.sha256()
    for i in range(20):
        h.update(sample_scene(i, split="any").array(96).tobytes())
    assert h.hexdigest() == "debf4a6d7af628b86a9e7e7af2d6bc9aea96c91336aca184a00ac6c8643e5cd1"
    assert training_scene(0).to_dict()["objects"][0] == {"colour": "purple", "shape": "star", "box": [13, 29, 36, 52]}


def test_objects_are_apart_inside_the_canvas_and_distinct():
    for scene in SCENES:
        objs = scene.objects
        assert 1 <= len(objs) <= 3
        assert len({o.colour for o in objs}) == len(objs) and len({o.shape for o in objs}) == len(objs)
        for o in objs:
            x0, y0, x1, y1 = o.box
            assert x1 - x0 == y1 - y0 and world.SIZE_RANGE[0] <= x1 - x0 <= world.SIZE_RANGE[1]
            assert MARGIN <= x0 and x1 <= world.CANVAS - MARGIN and MARGIN <= y0 and y1 <= world.CANVAS - MARGIN
        for a, b in itertools.combinations(objs, 2):
            apart_x = a.box[2] + GAP <= b.box[0] or b.box[2] + GAP <= a.box[0]
            apart_y = a.box[3] + GAP <= b.box[1] or b.box[3] + GAP <= a.box[1]
            assert apart_x or apart_y


def test_render_holds_exact_colours_where_the_masks_are():
    for scene in SCENES[:300]:
        img = scene.array()
        covered = np.zeros(img.shape[:2], dtype=bool)
        for o in scene.objects:
            m = object_mask(o)
            assert m.sum() > 40 and not (m & covered).any()
            covered |= m
            assert (img[m] == COLOURS[o.colour]).all()
            ys, xs = np.nonzero(m)  # the shape fills its box (pixel centres miss a star's sharp tips)
            assert xs.min() >= o.box[0] and xs.max() < o.box[2] and ys.min() >= o.box[1] and ys.max() < o.box[3]
            assert xs.max() + 1 - xs.min() >= o.size - 2 and ys.max() + 1 - ys.min() >= o.size - 3
        assert (img[~covered] == BACKGROUND).all()
    big = SCENES[0].image(256)
    assert big.size == (256, 256) and len(big.getcolors()) == len(SCENES[0].objects) + 1


def test_object_counts_follow_the_weights():
    counts = Counter(len(s.objects) for s in SCENES)
    for n, w in world.N_OBJECTS_WEIGHTS.items():
        assert abs(counts[n] / len(SCENES) - w) < 0.04


def test_held_out_split_is_sealed():
    assert len(HELDOUT_COMBOS) == len(COLOURS)
    assert {c for c, _ in HELDOUT_COMBOS} == set(COLOURS) and {s for _, s in HELDOUT_COMBOS} == set(SHAPES)
    held_pairs = [frozenset(parse_caption(p)) for p in HELDOUT_PROMPTS]
    for scene in SCENES:
        pairs = set(scene.pairs)
        assert not pairs & HELDOUT_COMBOS
        assert not any(h <= pairs for h in held_pairs)
    trained = {pair for s in SCENES for pair in s.pairs}
    assert len(trained) == len(COLOURS) * len(SHAPES) - len(HELDOUT_COMBOS)  # every other combination is trained
    assert len({frozenset(s.pairs) for s in SCENES}) > 300  # in many different company
    # the "any" split does contain held-out material
    assert any(set(sample_scene(i, split="any").pairs) & HELDOUT_COMBOS for i in range(100))
    assert not in_training([("red", "square")]) and in_training([("red", "circle")])


def test_held_out_prompts_follow_their_rules():
    assert world.draw_heldout_prompts(world.HELDOUT_SEED) == (HELDOUT_UNSEEN, HELDOUT_SEEN)
    assert len(HELDOUT_UNSEEN) == len(HELDOUT_SEEN) == 14 and len(set(HELDOUT_PROMPTS)) == 28
    assert len({frozenset(parse_caption(p)) for p in HELDOUT_PROMPTS}) == 28
    firsts = Counter()
    for p in HELDOUT_UNSEEN:
        pairs = parse_caption(p)
        withheld = [i for i, pr in enumerate(pairs) if pr in HELDOUT_COMBOS]
        assert len(pairs) == 2 and len(withheld) == 1
        firsts[pairs[withheld[0]], withheld[0]] += 1
    assert all(firsts[c, 0] == 1 and firsts[c, 1] == 1 for c in HELDOUT_COMBOS)
    for p in HELDOUT_SEEN:
        pairs = parse_caption(p)
        assert len(pairs) == 2 and not set(pairs) & HELDOUT_COMBOS
    for p in HELDOUT_PROMPTS:
        (c1, s1), (c2, s2) = parse_caption(p)
        assert c1 != c2 and s1 != s2


def test_captions_round_trip():
    assert caption([("red", "circle")]) == "a red circle"
    assert caption([("red", "circle"), ("orange", "square")]) == "a red circle and an orange square"
    three = caption([("green", "triangle"), ("red", "circle"), ("yellow", "square")])
    assert three == "a green triangle, a red circle and a yellow square"
    for scene in SCENES[:200]:
        assert parse_caption(scene.caption) == scene.pairs
    for bad in ("a red dog", "a orange circle", "red circle", "a red circle or a blue square", ""):
        with pytest.raises(ValueError):
            parse_caption(bad)
    s = layout_scene([("blue", "star"), ("pink", "circle")], seed=3)
    assert s.caption == "a blue star and a pink circle" and s == layout_scene(s.pairs, 3)


def _bindings(a):
    return sorted((" ".join(m.text for m in b.modifiers), b.noun.text) for b in a.bindings), sorted(
        n.text for n in a.nouns
    )


def test_every_caption_parses_into_its_bindings():
    """The SynGen parser binds each colour to its own shape, and the shapes are the subjects (A&E, D&B)."""
    a = analyze("a red circle and a blue square")
    assert [(tuple(m.text for m in b.modifiers), b.noun.text) for b in a.bindings] == [
        (("red",), "circle"),
        (("blue",), "square"),
    ]
    assert [w.token_indices for w in a.nouns] == [(3,), (7,)]  # one CLIP token per word
    prompts = [caption([pair]) for pair in itertools.product(COLOURS, SHAPES)]
    prompts += list(HELDOUT_PROMPTS) + [s.caption for s in SCENES[:60] if len(s.objects) > 1]
    nlp, tokenizer = load_parser(), load_tokenizer()
    for p, doc in zip(prompts, nlp.pipe(prompts)):
        pairs = parse_caption(p)
        assert _bindings(analyze_doc(doc, tokenizer)) == (sorted(pairs), sorted(s for _, s in pairs)), p
