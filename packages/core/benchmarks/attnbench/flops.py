"""How much work one attention call does: the counts behind every TFLOP/s and GB/s in the report.

A forward pass is two matmuls per head, Q K^T and P V, each 2 x (pairs scored) x D flops, so
4 x B x Hq x pairs x D. The backward pass does five such matmuls (S = Q K^T again, dP, dV, dQ, dK):
2.5x the forward, the convention of FlashAttention's and Triton's benchmarks, so fwd+bwd is 3.5x.
"""

from __future__ import annotations

PASS_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def visible_pairs(q_len: int, kv_len: int, causal: bool) -> float:
    """(query, key) pairs one head scores.

    Causal masks are bottom-right aligned: query i sees keys 0 .. i + (kv_len - q_len). For the square
    case we count half the matrix, N^2 / 2, as every published flash-attention benchmark does (the
    diagonal's extra N / 2 pairs are below 0.1% from N = 512 on). For q_len != kv_len the count is
    exact: row i sees i + kv_len - q_len + 1 keys (none when that is negative), so the rows form the
    triangle 1 + 2 + ... + kv_len minus the part above the first query, 1 + ... + hidden, where
    hidden = kv_len - q_len keys are seen by every query when the query block is shorter.
    """
    if not causal:
        return float(q_len * kv_len)
    if q_len == kv_len:
        return q_len * kv_len / 2
    hidden = max(kv_len - q_len, 0)
    return float(kv_len * (kv_len + 1) // 2 - hidden * (hidden + 1) // 2)


def forward_flops(batch: int, q_heads: int, q_len: int, kv_len: int, head_dim: int, causal: bool) -> float:
    """Flops of one forward call (both matmuls, 2 flops per multiply-add)."""
    return 4.0 * batch * q_heads * visible_pairs(q_len, kv_len, causal) * head_dim


def forward_bytes(
    batch: int, q_heads: int, kv_heads: int, q_len: int, kv_len: int, head_dim: int, element_size: int
) -> int:
    """Bytes a forward call must move at least: read q, k, v once and write the output once.

    This is the floor that decode-like shapes (a few queries against a long KV cache) are bound by.
    """
    query_and_output = 2 * batch * q_heads * q_len * head_dim
    keys_and_values = 2 * batch * kv_heads * kv_len * head_dim
    return (query_and_output + keys_and_values) * element_size
