"""Tensor descriptors (TMA): which layouts take them, and that they change no bit of any result.

fp16/bf16 kernels read their streamed tiles through tensor descriptors where the layout allows it and
through pointer loads elsewhere (the portable family's KernelConfig.descriptors and
plans.descriptors_fit), and only where a program's resident rows fill a tile (plans.descriptors_pay_off).
The two paths load the same numbers into the same tiles, so every output and gradient must agree
exactly, compiled and interpreted.
"""

from __future__ import annotations

import contextvars

import pytest
import torch

import core
import core.testing

from .conftest import DEVICE, ON_GPU
from .helpers import leaf_copy, make_qkv

gpu_only = pytest.mark.skipif(not ON_GPU, reason="tensor descriptors' scratch memory and graphs need CUDA")


def _dense(*shape, dtype=torch.float16):
    return torch.zeros(*shape, dtype=dtype, device=DEVICE)


def test_descriptors_fit_accepts_dense_and_model_layouts():
    assert core.testing.portable.plans.descriptors_fit(_dense(2, 4, 33, 64))
    assert core.testing.portable.plans.descriptors_fit(_dense(2, 33, 4, 64).transpose(1, 2))  # BSHD
    assert core.testing.portable.plans.descriptors_fit(_dense(2, 4, 33, 72))  # 144-byte rows
    assert core.testing.portable.plans.descriptors_fit(
        _dense(1, 4, 33, 64).expand(3, 4, 33, 64)
    )  # batch stride 0
    assert core.testing.portable.plans.descriptors_fit(_dense(2, 4, 33, 64, dtype=torch.bfloat16)[:, 1:3, 5:])


@pytest.mark.parametrize(
    "why, tensor",
    [
        ("head dim not unit-stride", _dense(2, 4, 64, 33).transpose(2, 3)),
        ("start not 16-byte aligned", _dense(2, 4, 33, 72)[..., 4:68]),
        ("row stride not a 16-byte multiple", _dense(2, 4, 33, 68)[..., :64]),
        ("head stride not a 16-byte multiple", _dense(2, 4, 33 * 64 + 4)[..., : 33 * 64].view(2, 4, 33, 64)),
        ("rows shorter than 16 bytes", _dense(2, 4, 33, 4)),
        ("rows overlap (stride 0 along N)", _dense(2, 4, 1, 64).expand(2, 4, 33, 64)),
    ],
)
def test_descriptors_fit_refuses(why, tensor):
    assert not core.testing.portable.plans.descriptors_fit(tensor), why


def test_calls_whose_queries_do_not_fill_a_tile_take_pointer_loads():
    """A decode step's few queries leave the forward's programs short: descriptors would only cost."""
    block_m = core.testing.portable.config.forward_config(64, torch.float16, not ON_GPU).block_m
    short, full = (
        make_qkv(1, 2, 2, n_queries, 300, 64, torch.float16, seed=37, requires_grad=False)
        for n_queries in (block_m - 1, block_m)
    )
    assert not core.testing.portable.plans.ForwardPlan(*short, causal=True, sm_scale=0.125).descriptors
    assert core.testing.portable.plans.ForwardPlan(*full, causal=True, sm_scale=0.125).descriptors


SHAPES = [  # (B, Hq, Hkv, Nq, Nk, D, causal)
    (2, 4, 2, 37, 53, 64, True),  # GQA, ragged, Nq < Nk
    (1, 2, 2, 50, 20, 16, True),  # Nq > Nk: rows that see no key
    (1, 2, 1, 64, 64, 72, False),  # padded head dim, MQA
]
if ON_GPU:
    SHAPES += [
        (2, 8, 2, 1000, 1337, 128, True),
        (1, 4, 4, 513, 513, 64, False),
        (1, 2, 2, 300, 300, 40, True),
        (1, 4, 2, 700, 900, 256, True),
        (1, 2, 2, 333, 333, 200, False),
    ]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}/{}-Nq{}-Nk{}-D{}-{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_descriptor_and_pointer_paths_agree_bitwise(shape, dtype, monkeypatch):
    *sizes, causal = shape
    q, k, v = make_qkv(*sizes, dtype, seed=31)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(32)).to(DEVICE, dtype)
    fits = core.testing.portable.plans.descriptors_fit
    answers = []
    monkeypatch.setattr(
        core.testing.portable.plans, "descriptors_fit", lambda *t: answers.append(fits(*t)) or answers[-1]
    )
    monkeypatch.setattr(
        core.testing.portable.plans, "descriptors_pay_off", lambda *sizes: True
    )  # small shapes too

    def run():
        qq, kk, vv = (leaf_copy(t) for t in (q, k, v))
        out, lse = core.attention(qq, kk, vv, causal=causal, return_lse=True)
        out.backward(dout)
        return out, lse, qq.grad, kk.grad, vv.grad

    with_descriptors = run()
    assert answers and all(answers), "the dense inputs should have been read through descriptors"
    monkeypatch.setattr(core.testing.portable.plans, "descriptors_fit", lambda *t: False)
    with_pointers = run()
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), with_descriptors, with_pointers):
        assert torch.equal(a, b), f"{name} differs between descriptor and pointer loads"


@gpu_only
def test_a_caller_set_triton_allocator_is_used():
    """core installs its scratch allocator only where the caller set none (in a copied context here,
    so the test's allocator never leaks into other tests)."""
    import triton

    requests = []

    def allocator(size, alignment, stream):
        requests.append(size)
        return torch.empty(size, dtype=torch.int8, device="cuda")

    def body():
        triton.set_allocator(allocator)
        q, k, v = make_qkv(1, 2, 2, 256, 256, 64, torch.float16, seed=33, requires_grad=False)
        core.attention(q, k, v)
        torch.cuda.synchronize()

    contextvars.copy_context().run(body)
    assert requests, "the kernels should have asked the caller's allocator for their descriptor scratch"


@gpu_only
def test_cuda_graph_replay_with_descriptors_survives_a_larger_eager_call():
    """A captured call keeps graph-private scratch: an eager call on a larger grid in between (which
    grows the stream's shared scratch buffer) must not disturb the replay."""
    q, k, v = make_qkv(2, 4, 4, 512, 512, 64, torch.bfloat16, seed=34, requires_grad=False)
    core.attention(q, k, v)  # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        captured = core.attention(q, k, v)
    torch.cuda.current_stream().wait_stream(stream)
    fresh = make_qkv(2, 4, 4, 512, 512, 64, torch.bfloat16, seed=35, requires_grad=False)
    for static, new in zip((q, k, v), fresh):
        static.copy_(new)
    big = make_qkv(4, 16, 16, 2048, 2048, 64, torch.bfloat16, seed=36, requires_grad=False)
    core.attention(*big)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, core.attention(*fresh))
