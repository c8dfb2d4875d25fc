"""Strides: views are read in place and give exactly what their contiguous copies give."""

from __future__ import annotations

import pytest
import torch

import core
import core.testing

from .conftest import ON_GPU
from .helpers import assert_all_within_tolerance, compare_with_reference, leaf_copy, make_qkv

SHAPE = (2, 4, 2, 300, 257, 64) if ON_GPU else (1, 4, 2, 21, 30, 40)


@pytest.mark.parametrize("layout", ["bshd", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_views_within_policy(layout, dtype):
    q, k, v = make_qkv(*SHAPE, dtype, seed=21, layout=layout)
    assert not q.is_contiguous()
    assert_all_within_tolerance(compare_with_reference(q, k, v, causal=True))


@pytest.mark.parametrize("layout", ["bshd", "sliced"])
def test_views_match_contiguous_copies_bitwise(layout, monkeypatch):
    q, k, v = make_qkv(*SHAPE, torch.float16, seed=23, layout=layout)
    # Reading a view must not copy it: the forward kernel's launch gets the very tensors we passed.
    launched_with = []
    launch = core.testing.portable.launch.BoundLaunch.__call__

    def spy(self, device, *tensors):
        launched_with.append(tuple((t.data_ptr(), t.stride()) for t in tensors[:3]))
        return launch(self, device, *tensors)

    monkeypatch.setattr(core.testing.portable.launch.BoundLaunch, "__call__", spy)
    out = core.attention(q, k, v, causal=True)
    assert launched_with[0] == tuple((t.data_ptr(), t.stride()) for t in (q, k, v))

    qc, kc, vc = (leaf_copy(t.contiguous()) for t in (q, k, v))
    out_c = core.attention(qc, kc, vc, causal=True)
    assert torch.equal(out, out_c)
    dout = torch.randn_like(out_c)
    out.backward(dout)
    out_c.backward(dout)
    for view_grad, contiguous_grad in ((q.grad, qc.grad), (k.grad, kc.grad), (v.grad, vc.grad)):
        assert torch.equal(view_grad, contiguous_grad)


def test_output_and_grads_follow_input_layout():
    q, k, v = make_qkv(*SHAPE, torch.float16, seed=25, layout="bshd")
    out = core.attention(q, k, v)
    assert out.stride() == q.stride()  # a BSHD q gives a BSHD output
    out.sum().backward()
    assert q.grad.stride() == q.stride() and k.grad.stride() == k.stride()


def test_broadcast_gradient_with_zero_strides():
    """out.sum().backward() hands the kernel an expanded dO whose strides are all 0.

    Compiled kernels specialise on stride properties, so the expanded and the dense dO may take
    differently vectorised code with a different summation order: equal to float32 rounding, not bitwise.
    """
    q, k, v = make_qkv(*SHAPE, torch.float32, seed=27)
    q2, k2, v2 = (leaf_copy(t) for t in (q, k, v))
    core.attention(q, k, v).sum().backward()
    core.attention(q2, k2, v2).backward(torch.ones(q.shape, device=q.device))
    for a, b in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_storage_offset_and_transposed_head_dim_free_layouts():
    """k and v as two halves of one fused KV projection, q with a storage offset."""
    b, h, n, d = (2, 4, 200, 64) if ON_GPU else (1, 2, 18, 32)
    gen = torch.Generator().manual_seed(29)
    device = "cuda" if ON_GPU else "cpu"
    kv = torch.randn(b, n, 2, h, d, generator=gen).to(device, torch.float16)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    q_storage = torch.randn(b * h * n * d + 7, generator=gen).to(device, torch.float16)
    q = q_storage[7:].view(b, h, n, d)
    assert q.storage_offset() == 7
    q, k, v = (t.requires_grad_(False) for t in (q, k, v))
    assert_all_within_tolerance(compare_with_reference(q, k, v, causal=False, grads=False))
