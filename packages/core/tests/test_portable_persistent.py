"""The portable family's persistent forward (core.testing.portable_persistent, off by default): a few
programs per SM walk the tiles that the one-tile kernel gives one program each. Each tile's arithmetic
is the one-tile kernel's, so everything it returns must be the same bits: the output, the LSE and
(through the LSE the backward reads) the gradients. The same properties run interpreted on the CPU
(3 programs for the small shapes' tens of tiles) and compiled on the GPU (2 per SM, shapes with more
tiles than that)."""

from __future__ import annotations

import pytest
import torch

import core
import core.testing

from .conftest import ON_GPU
from .helpers import make_qkv

plans = core.testing.portable.plans

# ((B, Hq, Hkv, Nq, Nk, D), dtype, causal, window, softcap, layout): ragged query blocks, Nq > Nk (rows
# that see no key), GQA and MQA, a padded head dim, each dtype, a sliding window, softcapping, strided
# inputs.
if ON_GPU:
    CASES = [
        ((4, 16, 4, 1000, 1000, 64), torch.bfloat16, True, None, 0.0, "bhsd"),
        ((2, 16, 16, 777, 1500, 128), torch.float16, False, None, 0.0, "bshd"),
        ((8, 8, 1, 600, 600, 96), torch.bfloat16, True, (128, 0), 0.0, "bhsd"),
        ((4, 8, 2, 512, 512, 64), torch.float32, False, None, 30.0, "sliced"),
    ]
else:
    CASES = [
        ((2, 4, 2, 50, 70, 32), torch.bfloat16, True, None, 0.0, "bhsd"),
        ((1, 2, 2, 33, 33, 40), torch.float32, False, None, 0.0, "bshd"),
        ((2, 3, 1, 40, 64, 16), torch.float16, True, (8, 0), 0.0, "bhsd"),
        ((1, 2, 1, 40, 40, 64), torch.bfloat16, False, None, 30.0, "sliced"),
        ((1, 2, 2, 64, 20, 16), torch.float16, True, None, 0.0, "bhsd"),
    ]


@pytest.fixture(autouse=True)
def family():
    """The persistent forward belongs to the portable family: its tests run there, once."""
    with core.testing.use_family("portable"):
        yield "portable"


def run(q, k, v, causal, window, softcap, persistent):
    with core.testing.portable_persistent(persistent):
        out, lse = core.attention(
            q, k, v, causal=causal, window_size=window or (-1, -1), softcap=softcap, return_lse=True
        )
        (out.float().square().sum() + lse.float().nan_to_num(0.0).sum()).backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    return out.detach(), lse.detach(), grads


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{c[0]}-{str(c[1])[6:]}-{'causal' if c[2] else 'full'}"
)
def test_persistent_forward_gives_the_one_tile_kernels_bits(case):
    shape, dtype, causal, window, softcap, layout = case
    q, k, v = make_qkv(*shape, dtype, seed=11, layout=layout)
    one_tile = run(q, k, v, causal, window, softcap, persistent=False)
    persistent = run(q, k, v, causal, window, softcap, persistent=True)
    for name, a, b in zip(("out", "lse"), one_tile[:2], persistent[:2]):
        assert torch.equal(a, b), name
    for name, a, b in zip(("dq", "dk", "dv"), one_tile[2], persistent[2]):
        assert torch.equal(a, b), name


def test_plans_take_the_persistent_kernel_for_dense_calls_only():
    """Off a GPU too: with the switch on, a dense plan launches the persistent kernel on fewer programs
    than it has tiles (and never none); a packed plan keeps one program per tile. With it off, no plan
    does."""
    q, k, v = (torch.randn(2, 4, 100, 64).to(torch.bfloat16) for _ in range(3))
    with core.testing.portable_persistent(True):
        plan = plans.ForwardPlan(q, k, v, True, 0.125)
        tiles = 4 * 2 * -(-100 // plan.block_m)
        assert plan.persistent and plan.launch.kernel is plans.attention_forward_persistent_kernel
        assert plan.launch.grid == (min(tiles, plans.persistent_programs(q.device, False)),)
        assert plan.launch.extra[-1] == 2  # the batch, after the feature arguments
        packed = (torch.randn(300, 4, 64).to(torch.bfloat16) for _ in range(3))
        varlen = plans.ForwardPlan(*packed, True, 0.125, features=plans.Features(varlen=True))
        assert not varlen.persistent and varlen.launch.kernel is plans.attention_forward_kernel
        empty = plans.ForwardPlan(q[:, :, :0], k, v, True, 0.125)
        assert empty.launch.grid == (1,)
    with core.testing.portable_persistent(False):
        assert plans.ForwardPlan(q, k, v, True, 0.125).launch.kernel is plans.attention_forward_kernel
