"""Bound launches (core.kernels.launch): a relaunch that skips Triton's argument binding must run the
very kernel that the binding would have picked, with the same arguments.

Each case runs forward and backward three times: with the host cache switched off (every launch through
`kernel[grid]`), then with it on: a first call binds each launch, a second relaunches through the
bound launches (addresses as integers). All three must agree bit for bit. The cases vary what Triton
specialises on: pointer alignment (a storage offset of one element), strides (BSHD views), integers
equal to 1 (one query, one head) and GQA.
"""

from __future__ import annotations

import pytest
import torch

import core
import core.testing

from .conftest import DEVICE, ON_GPU

plans = core.testing.portable.plans
gpu_only = pytest.mark.skipif(not ON_GPU, reason="bound launches only serve compiled kernels")


def _views(case: str, dtype=torch.float16):
    """(q, k, v) leaves for one specialisation case."""
    generator = torch.Generator(device=DEVICE).manual_seed(0)

    def draw(*shape):
        return torch.randn(*shape, generator=generator, device=DEVICE, dtype=torch.float32).to(dtype)

    if case == "contiguous":
        q, k, v = draw(2, 4, 200, 64), draw(2, 4, 180, 64), draw(2, 4, 180, 64)
    elif case == "bshd":
        q, k, v = (draw(2, 150, 4, 64).transpose(1, 2) for _ in range(3))
    elif case == "misaligned":  # one element into the storage: data_ptr % 16 == 2
        q, k, v = (draw(2 * 4 * 130 * 64 + 1)[1:].view(2, 4, 130, 64) for _ in range(3))
    elif case == "ones":  # Nq = 1, one head: integers Triton turns into constants
        q, k, v = draw(1, 1, 1, 64), draw(1, 1, 300, 64), draw(1, 1, 300, 64)
    elif case == "gqa":
        q, k, v = draw(1, 8, 96, 128), draw(1, 2, 96, 128), draw(1, 2, 96, 128)
    else:
        raise ValueError(case)
    return tuple(x.detach().requires_grad_() for x in (q, k, v))


def _run(q, k, v):
    for x in (q, k, v):
        x.grad = None
    out, lse = core.attention(q, k, v, causal=True, return_lse=True)
    (out.float().sum() + lse.sum()).backward()
    return [out, lse, q.grad, k.grad, v.grad]


@gpu_only
@pytest.mark.parametrize("case", ["contiguous", "bshd", "misaligned", "ones", "gqa"])
def test_bound_relaunch_equals_kernel_grid(case):
    q, k, v = _views(case)
    with core.testing.host_cache(False):
        unbound = _run(q, k, v)
    core.testing.clear_plans()
    binding = _run(q, k, v)
    plan = core.testing.cached_plans()[0]
    assert plan.launch.entry is not None, "the forward's launch should now be bound"
    bound = _run(q, k, v)
    for name, expected, *cached in zip(("out", "lse", "dq", "dk", "dv"), unbound, binding, bound):
        for how, got in zip(("binding call", "bound relaunch"), cached):
            assert torch.equal(got, expected), f"{name}: {how} differs from kernel[grid]"


@gpu_only
def test_bound_launch_recompiles_for_another_alignment(monkeypatch):
    """A bound launch compiled for 16-byte aligned tensors, handed misaligned ones (same shapes and
    strides), must go back to Triton's specialisation, not reuse the aligned kernel. (Pointer loads
    here: a plan that chose descriptors is only valid for aligned inputs, and the plan cache keys on the
    alignment; the bound launch's own check guards the outputs, whose alignment is the allocator's.)"""
    monkeypatch.setattr(plans, "descriptors_fit", lambda *t: False)
    shape = (1, 2, 130, 64)
    storages = [
        torch.randn(torch.Size(shape).numel() + 1, device=DEVICE, dtype=torch.float16) for _ in range(3)
    ]
    aligned = [storage[:-1].view(shape) for storage in storages]
    misaligned = [storage[1:].view(shape) for storage in storages]  # data_ptr % 16 == 2
    plan = plans.ForwardPlan(*aligned, causal=True, sm_scale=0.125)
    plan(*aligned)
    plan(*aligned)  # now a bound-launch hit
    got = plan(*misaligned)
    assert plan.launch.compiled_for[2][:3] == [2, 2, 2], "the bound launch should now serve misaligned inputs"
    expected = plans.ForwardPlan(*misaligned, causal=True, sm_scale=0.125)(*misaligned)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@gpu_only
def test_profiler_hooks_still_see_every_launch():
    """With a launch hook installed (as profilers install one), launches take Triton's own path."""
    from triton import knobs

    q = torch.randn(1, 2, 64, 64, device=DEVICE, dtype=torch.float16)
    core.attention(q, q, q)  # compiled and cached
    seen = []

    def hook(metadata):
        seen.append(metadata.get()["name"])

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        core.attention(q, q, q)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert seen == ["attention_forward_kernel"]


def test_constexprs_out_of_signature_order_are_refused():
    """A bound relaunch passes constexprs by position, so one that names them out of order must fail."""
    in_order = ["HEAD_DIM", "CAUSAL", "BLOCK_M", "BLOCK_N", "BLOCK_D"]
    in_order += ["DOT_PRECISION", "BASE_2", "PRECISE_EXP", "TENSOR_DESCRIPTORS"]
    in_order += ["WINDOW", "SOFTCAP", "VARLEN"]
    kernel = core.testing.portable.forward.attention_forward_kernel
    bind = core.testing.portable.launch.BoundLaunch
    bind(kernel, (1, 1, 1), (), (), tuple((name, None) for name in in_order), ())
    swapped = [in_order[1], in_order[0], *in_order[2:]]
    with pytest.raises(TypeError, match="in this order"):
        bind(kernel, (1, 1, 1), (), (), tuple((name, None) for name in swapped), ())
