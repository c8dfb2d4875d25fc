"""The float64 truth, forward and backward, computed in query chunks so that long sequences fit.

Same semantics as `core.attention_reference` (bottom-right causal mask, GQA, rows that see no key give 0
and LSE -inf), but never holds more than `chunk` x Nk scores at once, so the GPU run can take the truth at
64k keys. Everything is float64 on the inputs' device.
"""

from __future__ import annotations

import math

import torch

from core.reference import visible_keys_mask

__all__ = ["backward", "forward"]


def _prepare(q, k, v, sm_scale):
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    q, k, v = (x.detach().double() for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = (x.repeat_interleave(group, dim=1) for x in (k, v))
    return q, k, v, scale


def _chunk_probabilities(q_chunk, k, scale, visible):
    """softmax rows of one query chunk, and their LSE; rows without a visible key get 0 and -inf."""
    scores = torch.matmul(q_chunk, k.transpose(-2, -1)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    sees = torch.isfinite(lse)
    probs = torch.exp(scores - torch.where(sees, lse, 0.0)[..., None])
    return torch.where(sees[..., None], probs, 0.0), lse


def forward(q, k, v, *, causal: bool, sm_scale: float | None = None, chunk: int = 1024):
    """(out, lse) in float64: out (B, Hq, Nq, D), lse (B, Hq, Nq) natural log."""
    q, k, v, scale = _prepare(q, k, v, sm_scale)
    n_q, n_k = q.shape[2], k.shape[2]
    mask = visible_keys_mask(n_q, n_k, causal, device=q.device)
    outs, lses = [], []
    for start in range(0, n_q, chunk):
        probs, lse = _chunk_probabilities(
            q[:, :, start : start + chunk], k, scale, mask[start : start + chunk]
        )
        outs.append(torch.matmul(probs, v))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def backward(q, k, v, dout, *, causal: bool, sm_scale: float | None = None, chunk: int = 1024):
    """(dq, dk, dv) in float64 for the loss sum(out * dout), from the float64 forward.

    dS = P * (dP - Delta) with Delta = rowsum(dO * O); dq = dS k * scale, dk = dS^T q * scale, dv = P^T dO.
    For GQA the key/value gradients of the heads that share a key/value head are summed.
    """
    out, _ = forward(q, k, v, causal=causal, sm_scale=sm_scale, chunk=chunk)
    group = q.shape[1] // k.shape[1]
    q, k, v, scale = _prepare(q, k, v, sm_scale)
    dout = dout.detach().double()
    delta = (dout * out).sum(dim=-1)
    n_q, n_k = q.shape[2], k.shape[2]
    mask = visible_keys_mask(n_q, n_k, causal, device=q.device)
    dq = torch.empty_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for start in range(0, n_q, chunk):
        rows = slice(start, start + chunk)
        probs, _ = _chunk_probabilities(q[:, :, rows], k, scale, mask[rows])
        dv += torch.matmul(probs.transpose(-2, -1), dout[:, :, rows])
        ds = probs * (torch.matmul(dout[:, :, rows], v.transpose(-2, -1)) - delta[:, :, rows, None])
        dq[:, :, rows] = torch.matmul(ds, k) * scale
        dk += torch.matmul(ds.transpose(-2, -1), q[:, :, rows]) * scale
    if group > 1:
        dk, dv = (x.unflatten(1, (-1, group)).sum(dim=2) for x in (dk, dv))
    return dq, dk, dv
