"""Error measures. Each takes torch tensors or numpy arrays and compares in float64."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["relative_rmse", "rmse", "ulp_distance"]


def as_f64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().double().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def rmse(x, truth) -> float:
    """Root mean square error over all elements: FlashAttention-3's Table 3 measure."""
    return float(np.sqrt(np.mean((as_f64(x) - as_f64(truth)) ** 2)))


def relative_rmse(x, truth) -> float:
    """RMSE divided by the RMS of the truth, so that outputs of different magnitude compare."""
    t = as_f64(truth)
    return rmse(x, t) / float(np.sqrt(np.mean(t**2)))


def ulp_distance(a, b, fmt: str) -> np.ndarray:
    """How many representable `fmt` numbers lie between a and b (0 = bit-identical), elementwise.

    Maps each value to its position on the number line of the format (sign-magnitude bits turned into a
    monotone integer), so the distance is exact, across zero and binades alike.
    """
    a, b = as_f64(a), as_f64(b)
    if fmt == "fp16":
        bits_a, bits_b = (x.astype(np.float16).view(np.int16).astype(np.int64) for x in (a, b))
    elif fmt == "fp32":
        bits_a, bits_b = (x.astype(np.float32).view(np.int32).astype(np.int64) for x in (a, b))
    elif fmt == "bf16":
        bits_a, bits_b = (x.astype(np.float32).view(np.int32).astype(np.int64) >> 16 for x in (a, b))
    else:
        raise ValueError(fmt)
    sign = 1 << (15 if fmt != "fp32" else 31)

    def ordinal(bits):
        # Negative numbers count down from zero: magnitude bits, negated.
        return np.where(bits < 0, -(bits & (sign - 1)), bits)

    return np.abs(ordinal(bits_a) - ordinal(bits_b))
