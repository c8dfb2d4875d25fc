"""The input distributions of the experiments. Every draw comes from a numpy Generator seeded by the
experiment (never the global RNG), in float64; callers round to the dtype under test."""

from __future__ import annotations

import numpy as np

__all__ = ["fa3_outliers", "normal", "qkv", "rng"]


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def normal(gen: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return gen.standard_normal(shape)


def fa3_outliers(gen: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """FlashAttention-3's accuracy inputs (arXiv 2407.08608): N(0, 1) + N(0, 100) * Bernoulli(0.001), i.e.
    one entry in a thousand carries an extra outlier of standard deviation 10, as activations of large
    language models do."""
    outliers = gen.standard_normal(shape) * 10.0 * (gen.random(shape) < 0.001)
    return gen.standard_normal(shape) + outliers


DISTRIBUTIONS = {"normal": normal, "fa3_outliers": fa3_outliers}


def qkv(
    gen: np.random.Generator,
    batch: int,
    heads: int,
    n_queries: int,
    n_keys: int,
    head_dim: int,
    dist: str = "normal",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q (B, H, Nq, D) and k, v (B, H, Nk, D), float64."""
    draw = DISTRIBUTIONS[dist]
    return (
        draw(gen, (batch, heads, n_queries, head_dim)),
        draw(gen, (batch, heads, n_keys, head_dim)),
        draw(gen, (batch, heads, n_keys, head_dim)),
    )
