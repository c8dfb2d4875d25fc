"""The floating-point formats the lab can store a quantity in, and how a value is rounded into each.

Every rounding here keeps the numpy dtype of its argument (the *carrier*): a bf16 value lives in a
float32 array, exactly representable there, so the arithmetic that follows runs in float32 and only the
stored value carries the format's precision. That is how the GPU treats fp16/bf16 too: values are widened
to fp32 for arithmetic and rounded when they are written back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["FORMATS", "Format", "round_bf16", "round_fp16"]


def round_bf16(x: np.ndarray) -> np.ndarray:
    """Round to bfloat16, to nearest even as CUDA and torch do, returned as float32.

    A bf16 number is the top half of a float32 bit pattern, so rounding is integer arithmetic on the bits.
    Values that arrive in float64 are first rounded to float32; that double rounding can differ from a
    direct rounding only on exact float32 half-way cases, which the lab never relies on.
    """
    x32 = np.asarray(x, dtype=np.float32)
    bits = x32.view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit carries into the kept half exactly when the dropped half is
    # above one half, or equal to it with an odd kept half: round to nearest, ties to even.
    lowest_kept = (bits >> np.uint32(16)) & np.uint32(1)
    kept = (bits + np.uint32(0x7FFF) + lowest_kept) & np.uint32(0xFFFF0000)
    rounded = kept.view(np.float32)
    return np.where(np.isnan(x32), x32, rounded)


def _to(dtype) -> Callable[[np.ndarray], np.ndarray]:
    """Rounding through a native numpy dtype (its conversions round to nearest, ties to even)."""
    return lambda x: x.astype(dtype).astype(x.dtype)


def round_fp16(x: np.ndarray) -> np.ndarray:
    """Round to fp16, to nearest even, keeping the carrier dtype.

    numpy converts float32 -> float16 in scalar software, ~10x slower than torch's vectorised F16C path;
    both round correctly (so identically), and the emulator spends much of its time here. float64
    carriers go through numpy, which rounds them once (torch would round to float32 first).
    """
    if x.dtype != np.float32:
        return x.astype(np.float16).astype(x.dtype)
    return torch.from_numpy(np.ascontiguousarray(x)).half().float().numpy().reshape(x.shape)


@dataclass(frozen=True)
class Format:
    name: str
    significand_bits: int  # precision p, counting the implicit leading bit
    round: Callable[[np.ndarray], np.ndarray]

    @property
    def unit_roundoff(self) -> float:
        """The largest relative error of one rounding to nearest: 2^-p."""
        return 2.0**-self.significand_bits


FORMATS: dict[str, Format] = {
    "fp64": Format("fp64", 53, lambda x: x),  # every carrier value is already an fp64 number
    "fp32": Format("fp32", 24, _to(np.float32)),
    "fp16": Format("fp16", 11, round_fp16),
    "bf16": Format("bf16", 8, lambda x: round_bf16(x).astype(x.dtype)),
}
