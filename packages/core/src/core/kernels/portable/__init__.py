"""The portable family: `tl` kernels that run wherever Triton does (the CPU interpreter, any CUDA GPU),
for every dtype (float32 with its exactness path), head dim, layout and length, with every feature
(sliding windows, logit softcapping, packed variable-length sequences). Forward: one program
per query tile streams the keys it sees (forward.py). Backward: three launches, free of atomics
(backward.py). Tile shapes come from one table (config.py); plans bind them to a call (plans.py)."""

from core.kernels.host import PLAIN, Features
from core.kernels.portable.plans import BackwardPlan, ForwardPlan

NAME = "portable"


def available() -> bool:
    """Everywhere Triton runs."""
    return True


def supports(q, k, v, causal: bool, features: Features = PLAIN) -> bool:
    """Every input that passed validation."""
    return True


__all__ = ["NAME", "BackwardPlan", "ForwardPlan", "available", "supports"]
