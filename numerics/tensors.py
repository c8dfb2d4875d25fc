"""Moving values between torch tensors (what the kernel takes) and numpy arrays (what the emulator takes).

The lab names dtypes by format name ("fp16", "bf16", "fp32", "fp64", as in numerics.formats). numpy has
no bfloat16, so bf16 values travel as float32 arrays holding exactly representable values.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["TORCH_DTYPES", "format_of", "to_numpy", "to_torch"]

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
_NUMPY_CARRIERS = {"fp16": np.float16, "bf16": np.float32, "fp32": np.float32, "fp64": np.float64}


def format_of(dtype: torch.dtype) -> str:
    return next(name for name, t in TORCH_DTYPES.items() if t == dtype)


def to_torch(x: np.ndarray, fmt: str, device: str | torch.device = "cpu") -> torch.Tensor:
    """Round a (float64) array to `fmt` and put it on `device`."""
    return torch.from_numpy(np.ascontiguousarray(x)).to(device=device, dtype=TORCH_DTYPES[fmt])


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """The values of a tensor, exactly, in the numpy carrier of its format."""
    fmt = format_of(t.dtype)
    wide = t.detach().cpu()
    if fmt == "bf16":
        wide = wide.float()
    return wide.numpy().astype(_NUMPY_CARRIERS[fmt], copy=False)
