"""The scorer reads ground-truth renders back near perfectly, clean and degraded, before it judges any model."""

from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFilter

from binding import world
from binding.scorer import classify, detect, score_image, shape_features
from binding.world import COLOURS, SHAPES, layout_scene, object_mask, sample_scene


def _degrade(arr: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """What a decoder does to a render, roughly: blur, grain, detail lost through a coarser grid."""
    img = Image.fromarray(arr)
    if kind.startswith("blur"):
        img = img.filter(ImageFilter.GaussianBlur(float(kind[4:])))
    elif kind == "resample":
        img = img.resize((32, 32), Image.BILINEAR).resize((64, 64), Image.BICUBIC)
    out = np.asarray(img).astype(np.float64)
    if kind != "clean":
        out = out + rng.normal(0.0, 10.0 if kind == "noise" else 6.0, out.shape)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _accuracy(n: int, kind: str, seed: int) -> tuple[float, float, Counter]:
    """(objects read right, images read exactly right, the errors) over n scenes of the whole world."""
    rng = np.random.default_rng(seed)
    right = total = exact = 0
    errors: Counter = Counter()
    for i in range(n):
        scene = sample_scene((7 << 40) + seed * 100_000 + i, split="any")
        found = Counter(d.pair for d in detect(_degrade(scene.array(), kind, rng)))
        wanted = Counter(scene.pairs)
        hits = sum((found & wanted).values())
        right += hits
        total += len(scene.objects)
        exact += hits == len(scene.objects) and sum(found.values()) == len(scene.objects)
        errors.update({(k, "missed"): v for k, v in (wanted - found).items()})
        errors.update({(k, "spurious"): v for k, v in (found - wanted).items()})
    return right / total, exact / n, errors


def test_clean_renders_are_read_perfectly():
    objects, images, errors = _accuracy(1000, "clean", 0)
    assert objects == 1.0 and images == 1.0, errors.most_common(5)


@pytest.mark.parametrize("kind", ["noise", "blur1.0", "resample"])
def test_degraded_renders_are_read_near_perfectly(kind):
    objects, images, errors = _accuracy(300, kind, 1)
    assert objects >= 0.99 and images >= 0.98, errors.most_common(5)


def test_heavy_blur_costs_only_some_small_stars():
    """Gaussian blur of 1.5 px (a 14 px star's points melt): still >= 95%, the errors are stars read as circles."""
    objects, _, errors = _accuracy(200, "blur1.5", 2)
    assert objects >= 0.95
    assert all(pair[1] == "star" for (pair, what) in errors if what == "missed")


def test_shape_features_are_scale_free():
    for shape in SHAPES:
        for size in (14, 24):
            obj = world.Obj("red", shape, (10, 10, 10 + size, 10 + size))
            assert classify(shape_features(object_mask(obj)))[0] == shape
            # the same shape rendered four times larger
            assert classify(shape_features(object_mask(obj, 256)))[0] == shape


def test_inputs_pil_or_arrays():
    scene = sample_scene(3, n_objects=2, split="any")
    arr = scene.array()
    expected = sorted(scene.pairs)
    assert sorted(d.pair for d in detect(arr)) == expected
    assert sorted(d.pair for d in detect(scene.image())) == expected
    assert sorted(d.pair for d in detect(arr.astype(np.float32) / 255.0)) == expected
    blank = np.full((64, 64, 3), 255, np.uint8)
    assert detect(blank) == [] and detect(blank // 2) == []  # grey is nobody's colour
    assert detect(arr)[0].to_dict()["colour"] in COLOURS


def test_score_image_presence_binding_and_leaks():
    cap = "a red circle and a blue square"
    right = layout_scene([("red", "circle"), ("blue", "square")], 1).array()
    s = score_image(right, cap)
    assert s["present_all"] and s["bound_all"] and not s["leak_any"] and s["extra"] == 0
    # the colours swapped: both objects there, neither in its own colour, each in the other's: leaks
    swapped = layout_scene([("blue", "circle"), ("red", "square")], 1).array()
    s = score_image(swapped, cap)
    assert s["present_all"] and not s["bound_all"] and s["leaked"] == [True, True]
    # one colour taken by both objects: the circle is bound, the square leaked the red
    both_red = layout_scene([("red", "circle"), ("red", "square")], 1).array()
    s = score_image(both_red, cap)
    assert s["bound"] == [True, False] and s["leaked"] == [False, True] and s["present_all"]
    # an object missing, another in a colour of no object: present but neither bound nor leaked
    s = score_image(layout_scene([("red", "circle")], 1).array(), cap)
    assert s["present"] == [True, False] and not s["present_all"]
    s = score_image(layout_scene([("red", "circle"), ("green", "square")], 1).array(), cap)
    assert s["present_all"] and s["bound"] == [True, False] and s["leaked"] == [False, False]
    # an extra object is reported, not penalised
    s = score_image(layout_scene([("red", "circle"), ("blue", "square"), ("pink", "star")], 1).array(), cap)
    assert s["bound_all"] and s["extra"] == 1
    assert score_image(right, [("red", "circle"), ("blue", "square")])["bound_all"]
