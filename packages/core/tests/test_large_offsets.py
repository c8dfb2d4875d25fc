"""Tensors of more than 2^31 elements: every offset past int32 must be computed in 64 bits.

GPU only (a 4.3 GB key tensor). Few queries against 2^23 + 3 keys of head dim 256 keep the arithmetic
small while key offsets run past 2^31 elements. The float64 truth is computed in key chunks (a float64
flash pass) so no float64 copy of k or v is needed.
"""

from __future__ import annotations

import pytest
import torch

import core
from core.tolerance import judge

from .conftest import ON_GPU

pytestmark = pytest.mark.skipif(not ON_GPU, reason="needs > 17 GB of GPU memory")

N_KEYS, HEAD_DIM, N_QUERIES = 2**23 + 3, 256, 16
CHUNK = 2**20


def float64_truth(q, k, v, dout, scale):
    """(out, lse, dv of the last CHUNK keys) in float64, streaming over key chunks."""
    q64 = q[0, 0].double()
    lse = torch.full((N_QUERIES,), float("-inf"), dtype=torch.float64, device=q.device)
    for start in range(0, N_KEYS, CHUNK):
        scores = q64 @ k[0, 0, start : start + CHUNK].double().T * scale
        lse = torch.logaddexp(lse, torch.logsumexp(scores, dim=-1))
    out = torch.zeros(N_QUERIES, HEAD_DIM, dtype=torch.float64, device=q.device)
    for start in range(0, N_KEYS, CHUNK):
        probs = torch.exp(q64 @ k[0, 0, start : start + CHUNK].double().T * scale - lse[:, None])
        out += probs @ v[0, 0, start : start + CHUNK].double()
    tail_probs = torch.exp(q64 @ k[0, 0, -CHUNK:].double().T * scale - lse[:, None])
    return out, lse, tail_probs.T @ dout[0, 0].double()


def test_key_offsets_past_int32():
    gen = torch.Generator(device="cuda").manual_seed(41)
    q = torch.randn(1, 1, N_QUERIES, HEAD_DIM, device="cuda", generator=gen, dtype=torch.float16)
    k = torch.randn(1, 1, N_KEYS, HEAD_DIM, device="cuda", generator=gen, dtype=torch.float16)
    v = torch.randn(1, 1, N_KEYS, HEAD_DIM, device="cuda", generator=gen, dtype=torch.float16)
    assert k.numel() > 2**31
    dout = torch.randn_like(q)
    scale = HEAD_DIM**-0.5
    v.requires_grad_(True)

    out, lse = core.attention(q, k, v, causal=False, return_lse=True)
    out.backward(dout)
    true_out, true_lse, true_dv_tail = float64_truth(q, k, v.detach(), dout, scale)

    # The eager same-dtype yardstick, on the same full problem (fp16 scores and probabilities).
    eager_probs = torch.softmax(q[0, 0] @ k[0, 0].T * scale, dim=-1)
    eager_out = eager_probs @ v[0, 0].detach()
    eager_lse = torch.logsumexp((q[0, 0] @ k[0, 0].T * scale).float(), dim=-1)
    eager_dv_tail = eager_probs[:, -CHUNK:].T @ dout[0, 0]

    verdicts = [
        judge("out", out[0, 0], true_out, eager_out),
        judge("lse", lse[0, 0], true_lse, eager_lse, input_dtype=torch.float16),
        judge("dv", v.grad[0, 0, -CHUNK:], true_dv_tail, eager_dv_tail),
    ]
    failed = [str(verdict) for verdict in verdicts if not verdict.ok]
    assert not failed, "\n".join(failed)
