"""Call plans (core._plans): a repeated call skips validation and launch setup, so the cache must key on
everything those read, never serve a call that validation would refuse, and change no result."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import core
import core.testing

from .conftest import DEVICE, ON_GPU
from .helpers import leaf_copy, make_qkv


def _qkv(**kwargs):
    return make_qkv(1, 2, 2, 40, 40, 32, torch.float16, seed=41, requires_grad=False, **kwargs)


def test_a_repeated_call_reuses_its_plan_and_gives_the_same_bits():
    q, k, v = _qkv()
    first = core.attention(q, k, v, return_lse=True)
    plan = next(iter(core.testing.cached_plans()))
    second = core.attention(q.clone(), k.clone(), v.clone(), return_lse=True)  # new storage, same layout
    assert list(core.testing.cached_plans()) == [plan]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_layout_dtype_and_options_each_get_their_own_plan():
    q, k, v = _qkv()
    bshd = _qkv(layout="bshd")
    core.attention(q, k, v)
    core.attention(*bshd)  # other strides
    core.attention(q.float(), k.float(), v.float())  # other dtype
    core.attention(q, k, v, causal=False)
    core.attention(q, k, v, sm_scale=0.5)
    core.attention(q, k, v, return_lse=True)  # the same plan: the LSE is always computed
    assert len(core.testing.cached_plans()) == 5


@pytest.mark.parametrize(
    "options, error",
    [
        ({"causal": 1}, TypeError),
        ({"return_lse": 1}, TypeError),
        ({"sm_scale": True}, TypeError),
        ({"sm_scale": float("nan")}, ValueError),
        ({"sm_scale": 1e39}, ValueError),
    ],
)
def test_a_cached_signature_never_lets_invalid_options_through(options, error):
    """1 == True == 1.0 as dict keys: the cache must not mistake causal=1 or sm_scale=True for a call
    it has seen."""
    q, k, v = _qkv()
    core.attention(q, k, v, causal=True, sm_scale=1.0)
    core.attention(q, k, v, causal=True, sm_scale=1.0, return_lse=True)
    with pytest.raises(error):
        core.attention(q, k, v, **{"causal": True, "sm_scale": 1.0, **options})


def test_a_cached_signature_never_lets_invalid_tensors_through():
    q, k, v = _qkv()
    core.attention(q, k, v)
    with pytest.raises(TypeError, match="share one dtype"):
        core.attention(q, k.float(), v)
    with pytest.raises(TypeError, match=r"must be a torch\.Tensor"):
        core.attention(q, k.tolist(), v)
    with pytest.raises(TypeError, match="sparse"):  # same shape, dtype and device, no storage
        core.attention(q, k.to_sparse(), v)


def test_uncached_calls_give_the_cached_result():
    """An int sm_scale and a tensor subclass are validated and planned afresh each call, same result."""
    q, k, v = _qkv()
    keyed = core.attention(q, k, v, sm_scale=1.0)
    assert torch.equal(core.attention(q, k, v, sm_scale=1), keyed)

    class Marked(torch.Tensor):
        pass

    assert torch.equal(core.attention(q.as_subclass(Marked), k, v, sm_scale=1.0), keyed)
    assert len(core.testing.cached_plans()) == 1


def test_plans_hold_no_tensors():
    """A cached plan must not keep its first call's inputs (or outputs) alive."""
    q, k, v = make_qkv(1, 2, 2, 40, 40, 32, torch.float16, seed=42)
    out = core.attention(q, k, v)
    out.sum().backward()
    alive = [weakref.ref(t) for t in (q, k, v, out)]
    del q, k, v, out
    gc.collect()
    assert core.testing.cached_plans() and all(ref() is None for ref in alive)


def test_gradients_through_a_cached_plan_match_a_fresh_one():
    q, k, v = make_qkv(1, 4, 2, 50, 70, 64, torch.bfloat16, seed=43, layout="bshd")
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(44)).to(DEVICE, q.dtype)

    def grads():
        qq, kk, vv = (leaf_copy(t) for t in (q, k, v))
        core.attention(qq, kk, vv).backward(dout)
        return qq.grad, kk.grad, vv.grad

    fresh = grads()
    cached = grads()
    plan = next(iter(core.testing.cached_plans()))
    assert len(plan.backward_plans) == 1
    for a, b in zip(fresh, cached):
        assert torch.equal(a, b)


@pytest.mark.skipif(not ON_GPU or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_inputs_on_another_device_than_the_current_one():
    """Triton launches on the current device; core must launch on the inputs' device instead, forward
    and backward, and leave the current device as it found it."""
    q, k, v = make_qkv(1, 2, 2, 300, 300, 64, torch.float16, seed=45, requires_grad=False)
    dout = torch.randn_like(q)

    def run(device):
        qq, kk, vv = (t.to(device).requires_grad_() for t in (q, k, v))
        out = core.attention(qq, kk, vv)
        out.backward(dout.to(device))
        return [t.cpu() for t in (out, qq.grad, kk.grad, vv.grad)]

    torch.cuda.set_device(0)
    on_current = run("cuda:0")
    for _ in range(2):  # a first call and a cached one
        on_other = run("cuda:1")
        assert torch.cuda.current_device() == 0
        for a, b in zip(on_current, on_other):
            assert torch.equal(a, b)
