"""The Hopper family's two forward kernels: its rule (hopper.persistent_pays) or its switch
(core.testing.hopper_persistent) picks the kernel and the grid of a plan made under it, on any machine;
on a GPU they agree bit for bit (one program per tile, and persistent) on ragged lengths, causal calls
with fewer and more queries than keys, GQA, and tile counts below the SM count, above it and not a
multiple of it. (The rest of the suite runs each of them against the truth: conftest's `family` takes
both.)"""

from __future__ import annotations

import pytest
import torch

import core.testing

from .helpers import make_qkv

on_gpu = pytest.mark.skipif(
    "hopper" not in core.testing.families(), reason="the Hopper family does not run on this machine"
)

# (B, Hq, Hkv, Nq, Nk, D): 2 tiles; 64; 432 (Nq > Nk); 384 with every head's tiles whole; 24 and 48
# at D 64 (which the family takes only where the persistent kernel pays; the kernels run it everywhere).
SHAPES = [
    (1, 2, 2, 128, 128, 128),
    (2, 4, 2, 1000, 1537, 128),
    (3, 16, 4, 1100, 1000, 128),
    (4, 8, 8, 1536, 1536, 64),
    (2, 6, 3, 129, 257, 64),
    (2, 8, 1, 300, 200, 64),
]


@pytest.fixture(autouse=True)
def family():
    """Each test picks its kernels itself: one run, not one per family."""
    yield "hopper"


@pytest.mark.parametrize("persistent", [False, True, None])
def test_the_switch_picks_the_kernel_and_the_grid(persistent):
    hopper = core.testing.family("hopper")
    q = torch.randn(3, 4, 300, 128).to(torch.bfloat16)  # 3 tiles a head, 36 in all
    k, v = (torch.randn(3, 2, 333, 128).to(torch.bfloat16) for _ in range(2))
    previous = hopper.PERSISTENT
    with core.testing.hopper_persistent(persistent):
        assert persistent == hopper.PERSISTENT
        plan = hopper.ForwardPlan(q, k, v, True, 0.1)
    assert previous == hopper.PERSISTENT
    chosen = bool(persistent)  # None: the rule, which keeps causal calls on the one-tile kernel
    assert plan.persistent == chosen and plan.kernel is hopper.kernel(chosen)
    # Off a GPU the persistent grid is never launched; on one it is min(SMs, tiles).
    assert plan.grid == (36,)
    lse = torch.empty(plan.lse_shape)
    arguments = plan.arguments(q, k, v, torch.empty_like(q), lse, lse[None])
    assert sorted(arguments) == sorted(plan.kernel.arg_names)
    if chosen:
        assert arguments["n_batch_heads"] == 12


@pytest.mark.parametrize(
    "causal, n_keys, head_dim, persistent, taken",
    [
        (False, 4096, 64, True, True),
        (False, 333, 128, True, True),
        (False, 4097, 64, False, False),
        (False, 16384, 128, False, True),
        (True, 1024, 64, False, False),
        (True, 1024, 128, False, True),
        (False, 1024, 32, True, False),
    ],
)
def test_the_rule_takes_the_persistent_kernel_for_short_non_causal_calls(
    causal, n_keys, head_dim, persistent, taken
):
    hopper = core.testing.family("hopper")
    assert hopper.persistent_pays(causal, n_keys) == persistent
    assert hopper.faster_than_portable(head_dim, causal, n_keys) == taken
    if head_dim in hopper.KERNEL_HEAD_DIMS:
        q = torch.randn(1, 2, 256, head_dim).to(torch.float16)
        k = v = torch.randn(1, 2, n_keys, head_dim).to(torch.float16)
        with core.testing.hopper_persistent(None):
            plan = hopper.ForwardPlan(q, k, v, causal, 0.1)
        assert plan.persistent == persistent and plan.kernel is hopper.kernel(persistent)


@on_gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-Hq{}-Hkv{}-Nq{}-Nk{}-D{}".format(*s))
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_persistent_forward_is_bitwise_the_one_tile_forward(shape, causal, dtype):
    hopper = core.testing.family("hopper")
    q, k, v = make_qkv(*shape, dtype, seed=11, requires_grad=False)
    assert hopper.supports(q, k, v, causal, head_dims=(64, 128))
    results = []
    for persistent in (False, True):
        with core.testing.hopper_persistent(persistent):
            plan = hopper.ForwardPlan(q, k, v, causal, shape[-1] ** -0.5)
        assert plan.persistent == persistent
        results.append(plan(q, k, v))
    for name, one_tile, persistent in zip(("out", "lse", "lse_low"), *results, strict=True):
        # Outputs start as NaN (conftest): a row either kernel left unwritten differs here.
        assert torch.equal(one_tile, persistent), f"{name} differs between the two kernels"
