"""Numbers read off attention maps: how much a modifier's map sits on its own noun versus on the others.

This is the figure a teacher points at: in a leaking image "red" lights up the banana as much as the
apple; after guidance it should sit on the apple. Pure functions of numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from binding.analysis import Binding, Word


def word_map(maps: np.ndarray, word: Word) -> np.ndarray:
    """A word's (H, W) map: the mean over the CLIP pieces that spell it."""
    idx = [i for i in word.token_indices if i < maps.shape[-1]]
    if not idx:
        return np.zeros(maps.shape[:2], dtype=np.float32)
    return np.asarray(maps[..., idx], dtype=np.float32).mean(axis=-1)


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Histogram intersection of two maps, each normalised to sum 1: 1 = same place, 0 = disjoint."""
    a = np.clip(np.nan_to_num(np.asarray(a, dtype=np.float64)), 0, None)
    b = np.clip(np.nan_to_num(np.asarray(b, dtype=np.float64)), 0, None)
    sa, sb = a.sum(), b.sum()
    if sa <= 0 or sb <= 0:
        return 0.0
    return float(np.minimum(a / sa, b / sb).sum())


@dataclass(frozen=True)
class PairOverlap:
    modifier: str
    noun: str
    own: float  # overlap of the modifier's map with its own noun's map
    other: float  # the largest overlap with any other noun's map (0 when there is no other noun)
    other_noun: str  # which noun that was ("" if none)

    @property
    def margin(self) -> float:
        """own - other: positive when the modifier sits on its noun rather than elsewhere."""
        return self.own - self.other


def binding_overlaps(maps: np.ndarray, bindings: Sequence[Binding], nouns: Sequence[Word]) -> list[PairOverlap]:
    """For each (modifier, noun) pair: overlap with its noun and with the closest other noun."""
    out = []
    noun_maps = {(n.start, n.text): word_map(maps, n) for n in list(nouns) + [b.noun for b in bindings]}
    for b in bindings:
        own_map = noun_maps[(b.noun.start, b.noun.text)]
        for m in b.modifiers:
            mod = word_map(maps, m)
            others = [(overlap(mod, nm), key[1]) for key, nm in noun_maps.items() if key != (b.noun.start, b.noun.text)]
            best = max(others) if others else (0.0, "")
            out.append(PairOverlap(m.text, b.noun.text, overlap(mod, own_map), best[0], best[1]))
    return out
