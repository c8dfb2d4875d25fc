"""`torch.nn.functional.scaled_dot_product_attention`'s signature over core.attention, so that code written
for SDPA switches by changing one name:

    from core import scaled_dot_product_attention
    out = scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

Everything SDPA would compute is computed with SDPA's meaning, or refused with a ValueError before
anything runs; nothing is reinterpreted silently:

- is_causal follows SDPA's alignment, top-left (query i sees keys 0..i), which is core's bottom-right
  rule when Nq == Nk, and a window's right edge when Nq > Nk. With Nq < Nk (queries at the end of a KV
  cache) top-left hides the keys such queries usually need; core refuses that case and names
  core.attention(causal=True), whose bottom-right rule is the usual intent.
- attn_mask: None only (core takes no mask tensor; causal, windows and packed sequences have their own
  arguments in core.attention and core.attention_varlen). dropout_p: 0 only.
- GQA (Hq a multiple of Hkv, Hq != Hkv) needs enable_gqa=True, as SDPA requires.
- Inputs are (B, H, N, D), or (H, N, D) read as one batch; q, k and v share D (SDPA also allows a value
  head dim of its own).
"""

from __future__ import annotations

import torch

from core.api import attention

__all__ = ["scaled_dot_product_attention"]


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """SDPA's arguments and result (see the module docstring for what is refused): core.attention with
    causal=is_causal and sm_scale=scale, differentiable, traceable by torch.compile."""
    if attn_mask is not None:
        raise ValueError(
            "attn_mask is not supported: core takes no mask tensor. Use is_causal, or core.attention's "
            "window_size, or core.attention_varlen for packed sequences and padding"
        )
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p={dropout_p}: core has no dropout (use 0.0, as SDPA gets in eval mode)")
    if not (query.dim() == key.dim() == value.dim() and query.dim() in (3, 4)):
        raise ValueError(
            "query, key and value must all be (B, H, N, D) or all (H, N, D); got shapes "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if query.dim() == 3:
        return scaled_dot_product_attention(
            query[None], key[None], value[None], None, 0.0, is_causal, scale, enable_gqa
        )[0]
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(
            f"{query.shape[1]} query heads over {key.shape[1]} key/value heads: pass enable_gqa=True, as "
            "SDPA requires for grouped-query attention"
        )
    n_queries, n_keys = query.shape[2], key.shape[2]
    if not is_causal or n_queries == n_keys:
        return attention(query, key, value, causal=is_causal, sm_scale=scale)
    if n_queries < n_keys:
        raise ValueError(
            f"is_causal with {n_queries} queries over {n_keys} keys: SDPA aligns its causal mask top-left "
            "(query i sees keys 0..i), which hides the keys that queries at the end of a KV cache need. "
            "core.attention(q, k, v, causal=True) aligns it bottom-right (the last query sees every key), "
            "as FlashAttention does; call it for that"
        )
    # More queries than keys: top-left is bottom-right shifted right by Nq - Nk (query i sees j <= i).
    return attention(query, key, value, causal=False, sm_scale=scale, window_size=(-1, n_queries - n_keys))
