"""Intervals for the scores: proportions (Wilson, Newcombe's paired difference) and prompt-clustered bootstrap.

One place for them: the teaching model's scoring and the evaluation report use the same statistics.
"""

from __future__ import annotations

import math

import numpy as np

N_BOOT = 2000
BOOT_SEED = 0
Z95 = 1.959963984540054


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion (good coverage at small n and near 0 or 1, unlike Wald)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def newcombe_paired(a: int, b: int, c: int, d: int, z: float = Z95) -> tuple[float, float, float]:
    """Difference p1 - p2 of paired proportions and its interval (Newcombe 1998, method 10).

    a: both succeed, b: only the first, c: only the second, d: neither. Combines the two Wilson intervals with
    the correlation phi of the pairs (corrected as Newcombe does: phi = 0 for 0 <= ad - bc <= n/2).
    """
    n = a + b + c + d
    if n == 0:
        return (0.0, -1.0, 1.0)
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson(a + b, n, z)
    l2, u2 = wilson(a + c, n, z)
    denom = (a + b) * (c + d) * (a + c) * (b + d)
    num = a * d - b * c
    num = num - n / 2 if num > n / 2 else (num if num < 0 else 0.0)
    phi = num / math.sqrt(denom) if denom > 0 else 0.0
    diff = p1 - p2
    lo = diff - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = diff + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return (diff, max(-1.0, lo), min(1.0, hi))


def bootstrap_ci(
    values: np.ndarray, clusters: np.ndarray | None = None, n_boot: int = N_BOOT, seed: int = BOOT_SEED
) -> tuple[float, float]:
    """95% percentile interval of the mean of ``values``, resampling whole clusters (prompts) with replacement.

    Images of one prompt share its difficulty, so they are not independent; resampling prompts keeps that.
    For a paired difference pass ``guided - vanilla`` (paired by prompt and seed).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return (float("nan"), float("nan"))
    clusters = np.arange(v.size) if clusters is None else np.asarray(clusters)
    keys, inv = np.unique(clusters, return_inverse=True)
    sums = np.bincount(inv, weights=v, minlength=len(keys))
    counts = np.bincount(inv, minlength=len(keys)).astype(np.float64)
    picks = np.random.default_rng(seed).integers(0, len(keys), size=(n_boot, len(keys)))
    means = sums[picks].sum(1) / counts[picks].sum(1)
    return (float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)))


def bootstrap_paired(
    guided: np.ndarray, vanilla: np.ndarray, clusters: np.ndarray, n_boot: int = N_BOOT, seed: int = BOOT_SEED
) -> tuple[float, float]:
    """95% interval of mean(guided - vanilla), resampling whole prompts (clusters)."""
    return bootstrap_ci(np.asarray(guided, np.float64) - np.asarray(vanilla, np.float64), clusters, n_boot, seed)
