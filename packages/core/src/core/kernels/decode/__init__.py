"""The decode family: split-KV attention (flash-decoding) for few queries against many keys, the kernels
behind core.attention_with_kvcache (dense or paged caches, in-place append) and behind core.attention's
decode-shaped calls.

Kernels in forward.py (split, merge, append), tiles and the split rule in config.py, host plans in
plans.py. As a family of core.kernels it takes calls whose query rows per KV head (GQA group x Nq) fit
one row tile and whose keys are many; its backward is the portable family's.
"""

from core._runtime import is_interpreted
from core.kernels.decode import config
from core.kernels.decode.plans import AppendPlan, AttendPlan, ForwardPlan, KvCachePlan
from core.kernels.host import PLAIN, Features

NAME = "decode"


def available() -> bool:
    """Everywhere Triton runs."""
    return True


def supports(q, k, v, causal: bool, features: Features = PLAIN) -> bool:
    """Decode-shaped calls, dense (not varlen), with or without a window and softcap: at most one row
    tile of queries per KV head (group x Nq <= 64) against at least config.min_keys_for_attention keys,
    where splitting the keys over programs pays. Gradients or not: the portable backward consumes this
    family's LSE like its own."""
    if features.varlen:
        return False
    rows = (q.shape[1] // k.shape[1]) * q.shape[2]
    return rows <= config.MAX_BLOCK_M and k.shape[2] >= config.min_keys_for_attention(is_interpreted())


__all__ = ["NAME", "AppendPlan", "AttendPlan", "ForwardPlan", "KvCachePlan", "available", "supports"]
