"""core.scaled_dot_product_attention: SDPA's signature with SDPA's meaning. torch's own SDPA in float64 is
the truth here (it is SDPA's semantics, top-left causal included), its same-dtype result the tolerance
policy's yardstick; everything core refuses raises before anything runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import core
from core.tolerance import judge

from .conftest import DEVICE

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def inputs(q_heads, kv_heads, n_queries, n_keys, dtype, *, head_dim=32, seed=0, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(2, q_heads, n_queries, head_dim)] + 2 * [(2, kv_heads, n_keys, head_dim)]
    tensors = [torch.randn(shape, generator=generator).to(DEVICE, dtype) for shape in shapes]
    return [t.requires_grad_(requires_grad) for t in tensors]


def sdpa(q, k, v, dtype=None, **options):
    """torch's SDPA, in `dtype` (float64: the truth) on copies of the inputs."""
    q, k, v = (t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, **options), (q, k, v)


SHAPES = {  # (Hq, Hkv, Nq, Nk)
    "mha": (4, 4, 48, 48),
    "gqa": (4, 2, 48, 48),
    "mqa-more-queries": (4, 1, 80, 33),
    "more-keys": (2, 2, 17, 70),
}
# Causal over more keys than queries is refused (test_top_left_causal_over_more_keys_is_refused).
CASES = [(name, "causal") for name in SHAPES if name != "more-keys"] + [(name, "full") for name in SHAPES]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_forward_and_backward_are_sdpas_within_the_policy(dtype, case):
    name, mask = case
    shape, is_causal = SHAPES[name], mask == "causal"
    q_heads, kv_heads = shape[:2]
    q, k, v = inputs(*shape, dtype, requires_grad=True)
    options = dict(is_causal=is_causal, scale=0.3, enable_gqa=q_heads != kv_heads)
    out = core.scaled_dot_product_attention(q, k, v, **options)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    truth, truth_inputs = sdpa(q, k, v, torch.float64, **options)
    eager, eager_inputs = sdpa(q, k, v, torch.float32 if dtype == torch.float32 else dtype, **options)
    true_grads = torch.autograd.grad(truth, truth_inputs, dout.double())
    eager_grads = torch.autograd.grad(eager, eager_inputs, dout.to(eager.dtype))
    scale = max(g.abs().max().item() for g in true_grads)
    verdicts = [judge("out", out, truth, eager)]
    for name, grad, true, yardstick in zip(("dq", "dk", "dv"), grads, true_grads, eager_grads):
        verdicts.append(judge(name, grad, true, yardstick.to(grad.dtype), family_scale=scale))
    failed = [str(v) for v in verdicts if not v.ok]
    assert not failed, "\n".join(failed)


def test_it_is_core_attention_bitwise_where_the_alignments_agree():
    q, k, v = inputs(4, 2, 40, 40, torch.float16)
    assert torch.equal(
        core.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        core.attention(q, k, v, causal=True),
    )
    q, k, v = inputs(4, 4, 24, 56, torch.float16)
    assert torch.equal(core.scaled_dot_product_attention(q, k, v), core.attention(q, k, v, causal=False))


def test_three_dimensional_inputs_are_one_batch():
    q, k, v = (t[0] for t in inputs(2, 2, 24, 24, torch.float32))
    out = core.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.shape == q.shape
    assert torch.equal(out, core.attention(q[None], k[None], v[None], causal=True)[0])


def test_top_left_causal_over_more_keys_is_refused():
    q, k, v = inputs(2, 2, 4, 16, torch.float16)
    with pytest.raises(ValueError, match=r"top-left.*core.attention\(q, k, v, causal=True\)"):
        core.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"attn_mask": "mask"}, "attn_mask is not supported"),
        ({"dropout_p": 0.1}, "dropout_p=0.1"),
        ({"grouped": True}, "enable_gqa=True"),
        ({"rank": 5}, r"\(B, H, N, D\) or all \(H, N, D\)"),
    ],
    ids=["mask", "dropout", "gqa without enable_gqa", "five dims"],
)
def test_what_core_cannot_honour_is_refused_before_anything_runs(arguments, message):
    arguments = dict(arguments)
    q, k, v = inputs(4, 2 if arguments.pop("grouped", False) else 4, 8, 8, torch.float16)
    if arguments.pop("rank", 4) == 5:
        q, k, v = (t[None] for t in (q, k, v))
    if arguments.get("attn_mask") == "mask":
        arguments["attn_mask"] = torch.ones(8, 8, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        core.scaled_dot_product_attention(q, k, v, **arguments)


@pytest.mark.parametrize("n_keys", [40, 24], ids=["square", "more-queries"])
def test_it_traces_with_fullgraph_and_gives_eager_bits(n_keys):
    q, k, v = inputs(4, 2, 40, n_keys, torch.float16)

    def call():
        return core.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    torch._dynamo.reset()
    assert torch.equal(torch.compile(call, fullgraph=True, backend="aot_eager")(), call())
    torch._dynamo.reset()
