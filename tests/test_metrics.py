"""Attention-map numbers: overlap of a modifier's map with its own noun versus the others."""

from __future__ import annotations

import numpy as np
import pytest

from binding.analysis import Binding, Word
from binding.metrics import binding_overlaps, overlap, word_map


def test_overlap_values():
    a = np.array([[1.0, 0.0], [0.0, 0.0]])
    b = np.array([[0.0, 2.0], [0.0, 0.0]])
    assert overlap(a, a * 5) == pytest.approx(1.0)
    assert overlap(a, b) == 0.0
    c = np.array([[1.0, 1.0], [0.0, 0.0]])  # half of c's mass is where a is
    assert overlap(a, c) == pytest.approx(0.5)
    assert overlap(np.zeros((2, 2)), a) == 0.0
    assert overlap(np.full((2, 2), np.nan), a) == 0.0


def test_word_map_averages_pieces():
    maps = np.zeros((2, 2, 5), dtype=np.float32)
    maps[..., 2] = 1.0
    maps[..., 3] = 3.0
    assert np.allclose(word_map(maps, Word("checkered", 2, 11, (2, 3))), 2.0)
    assert np.allclose(word_map(maps, Word("gone", 0, 4, ())), 0.0)


def test_binding_overlaps_own_versus_other():
    # 1x3 image: apple on the left pixel, banana on the right; "red" sits mostly on the banana (leak)
    maps = np.zeros((1, 3, 8), dtype=np.float32)
    maps[0, :, 3] = [1, 0, 0]  # apple
    maps[0, :, 7] = [0, 0, 1]  # banana
    maps[0, :, 2] = [0.25, 0, 0.75]  # red
    red, apple, banana = Word("red", 2, 5, (2,)), Word("apple", 6, 11, (3,)), Word("banana", 20, 26, (7,))
    (pair,) = binding_overlaps(maps, [Binding(apple, (red,))], [apple, banana])
    assert (pair.modifier, pair.noun, pair.other_noun) == ("red", "apple", "banana")
    assert pair.own == pytest.approx(0.25) and pair.other == pytest.approx(0.75)
    assert pair.margin == pytest.approx(-0.5)
    (alone,) = binding_overlaps(maps, [Binding(apple, (red,))], [apple])
    assert alone.other == 0.0 and alone.other_noun == ""
