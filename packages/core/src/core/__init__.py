"""Flash attention forward and backward in Triton.

    import core
    out = core.attention(q, k, v, causal=True)           # q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D)
    out, lse = core.attention(q, k, v, return_lse=True)  # lse (B, Hq, Nq) float32, natural log
    out = core.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, k=k_new, v=v_new)
    out = core.attention(q, k, v, window_size=(4096, 0), softcap=50.0)  # sliding window, softcapping
    out = core.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k)  # packed sequences, (total, H, D)
    out = core.scaled_dot_product_attention(q, k, v, is_causal=True)  # SDPA's signature and semantics

`core.attention_reference` (and `core.attention_varlen_reference`) is the float64 ground truth with the
same semantics, and `core.tolerance` is the one tolerance policy that judges the kernel against it. The
kernels are also registered as PyTorch operators (`torch.ops.core.*`, core.ops), which is what
torch.compile traces.
"""

from core import ops, tolerance
from core._runtime import is_interpreted
from core.api import attention, attention_varlen, attention_with_kvcache
from core.reference import attention_reference, attention_varlen_reference, attention_with_kvcache_reference
from core.sdpa import scaled_dot_product_attention

__all__ = [
    "attention",
    "attention_reference",
    "attention_varlen",
    "attention_varlen_reference",
    "attention_with_kvcache",
    "attention_with_kvcache_reference",
    "is_interpreted",
    "ops",
    "scaled_dot_product_attention",
    "tolerance",
]
__version__ = "0.1.0"
