"""Flash attention forward and backward in Triton.

    import core
    out = core.attention(q, k, v, causal=True)           # q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D)
    out, lse = core.attention(q, k, v, return_lse=True)  # lse (B, Hq, Nq) float32, natural log

`core.attention_reference` is the float64 ground truth with the same semantics, and `core.tolerance`
is the one tolerance policy that judges the kernel against it.
"""

from core import tolerance
from core._api import attention
from core._runtime import is_interpreted
from core.reference import attention_reference

__all__ = ["attention", "attention_reference", "is_interpreted", "tolerance"]
__version__ = "0.1.0"
