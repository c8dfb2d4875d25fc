"""The dK/dV kernel's ways of loading the query rows change no bit of any gradient:

- their LSE and Delta prefetched one step ahead (the portable config's KernelConfig.prefetch_row_stats)
  or loaded in the step that uses them;
- for whole query blocks (Nq a multiple of BLOCK_M, the portable plans' whole_query_blocks), Q and dO
  loaded unmasked (backward.py, WHOLE_QUERY_BLOCKS) or masked, as every other length takes them; the
  row statistics come from the padded copy either way (backward.py, PADDED_STATS).

Each pair is the same numbers. Both of the kernel's loops are covered: the one for rows
whose LSE low parts are all 0 (typical logits), and the one that subtracts them (|LSE| beyond 2^8 in
base 2, core.kernels.portable.forward)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import core
import core.testing

from .conftest import DEVICE, ON_GPU
from .helpers import leaf_copy, make_qkv

# (B, Hq, Hkv, Nq, Nk, D, causal). Prefetching: head dims up to 64, where the table prefetches (D=128's
# tiles would run out of shared memory). Whole blocks: Nq a multiple of the dK/dV kernel's BLOCK_M (16
# under the interpreter; 32 at D <= 64 and 64 at D = 128 on the GPU), ragged Nk.
PREFETCH_SHAPES = [
    (2, 4, 2, 37, 53, 32, True),  # GQA, ragged, Nq < Nk
    (1, 2, 2, 50, 20, 16, True),  # Nq > Nk: rows that see no key
    (1, 2, 1, 45, 64, 64, False),  # MQA
    (1, 2, 1, 64, 40, 32, True),  # whole blocks
]
WHOLE_SHAPES = [  # Nq a multiple of 64: whole on either machine
    (2, 4, 2, 64, 53, 32, True),
    (1, 2, 2, 32, 20, 16, True),  # Nq > Nk: rows that see no key
    (1, 2, 1, 64, 64, 64, False),
]
if ON_GPU:
    PREFETCH_SHAPES += [
        (2, 8, 2, 1000, 1337, 64, True), (1, 4, 4, 513, 700, 64, False), (1, 2, 2, 300, 300, 40, True),
        (2, 4, 2, 1024, 1100, 64, True),
    ]  # fmt: skip
    WHOLE_SHAPES += [
        (2, 8, 2, 1024, 1337, 64, True), (1, 4, 4, 512, 700, 64, False), (2, 4, 2, 1024, 999, 128, True),
        (1, 4, 1, 256, 256, 128, False),
    ]  # fmt: skip
CASES = [("prefetch", shape) for shape in PREFETCH_SHAPES] + [
    ("whole-blocks", shape) for shape in WHOLE_SHAPES
]


def _gradients(q, k, v, dout, causal, sm_scale, monkeypatch, prefetch: bool | None, whole: bool | None):
    """(lse, dq, dk, dv), with the table's prefetch choice and the whole-block rule overridden where
    not None."""
    table = core.testing.portable.config.backward_configs
    rule = core.testing.portable.plans.whole_query_blocks

    def configs(block_d, dtype, interpreted):
        dkdv, dq = table(block_d, dtype, interpreted)
        if prefetch is not None:
            dkdv = dataclasses.replace(dkdv, prefetch_row_stats=prefetch)
        return dkdv, dq

    monkeypatch.setattr(core.testing.portable.config, "backward_configs", configs)
    monkeypatch.setattr(
        core.testing.portable.plans,
        "whole_query_blocks",
        rule if whole is None else (lambda n_queries, block_m: whole),
    )
    core.testing.clear_plans()  # a cached plan would keep the other choice
    qq, kk, vv = (leaf_copy(t) for t in (q, k, v))
    out, lse = core.attention(qq, kk, vv, causal=causal, sm_scale=sm_scale, return_lse=True)
    out.backward(dout)
    return lse, qq.grad, kk.grad, vv.grad


def _has_whole_query_blocks(q) -> bool:
    """Whether the dK/dV kernel runs q's query blocks whole (Nq a multiple of its BLOCK_M here)."""
    dkdv_block_m = core.testing.portable.config.backward_configs(
        core.testing.portable.config.padded_head_dim(q.shape[-1]), q.dtype, not ON_GPU
    )[0].block_m
    return core.testing.portable.plans.whole_query_blocks(q.shape[2], dkdv_block_m)


def _ids(case):
    variant, shape = case
    return variant + "-B{}-H{}/{}-Nq{}-Nk{}-D{}-{}".format(*shape)


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sm_scale", [None, 40.0], ids=["typical-logits", "lse-low-parts"])
def test_row_statistics_loads_give_the_same_bits(case, dtype, sm_scale, monkeypatch):
    variant, (*sizes, causal) = case
    q, k, v = make_qkv(*sizes, dtype, seed=41)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(42)).to(DEVICE, dtype)
    if variant == "prefetch":
        lse, *tested = _gradients(q, k, v, dout, causal, sm_scale, monkeypatch, prefetch=True, whole=None)
        _, *plain = _gradients(q, k, v, dout, causal, sm_scale, monkeypatch, prefetch=False, whole=None)
    else:
        assert _has_whole_query_blocks(q), "the shape must have whole blocks"
        lse, *tested = _gradients(q, k, v, dout, causal, sm_scale, monkeypatch, prefetch=None, whole=None)
        _, *plain = _gradients(q, k, v, dout, causal, sm_scale, monkeypatch, prefetch=None, whole=False)
    if sm_scale is not None:  # the case is meant to take the subtracting loop: some |LSE2| >= 2^8
        assert bool((lse.abs() >= 256).any())
    for name, a, b in zip(("dq", "dk", "dv"), tested, plain):
        assert not torch.isnan(a).any(), f"{name} has unwritten (NaN) elements"
        assert torch.equal(a, b), f"{name} differs between the two ways of loading ({variant})"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_rows_whose_scores_all_overflow_add_nothing_in_whole_query_blocks(dtype, monkeypatch):
    """Rows that see every key but whose every score overflows to -inf have LSE -inf, and the dK/dV
    kernel visits them in its unmasked loop (unlike rows that see no key, which only masked blocks
    reach), where it reads the LSE without mapping -inf: the preprocess must have copied it into the
    padded statistics as +inf, for P = 0 (a -inf there would make P NaN). Nq is a multiple of BLOCK_M:
    Q and dO load whole, or masked with the rule overridden, for the same bits; those rows' dQ is 0 and
    their dO changes no bit of dK and dV."""
    q, k, v = make_qkv(1, 2, 1, 64, 40, 16, dtype, seed=43)
    assert _has_whole_query_blocks(q)
    huge = 1e30 if dtype == torch.bfloat16 else 1e20  # q . k = -16 huge^2: beyond float32
    overflowing = slice(0, 24)
    with torch.no_grad():
        q[:, :, overflowing] = huge
        k.fill_(-huge)  # equal keys: the other rows' finite scores tie, P = 1 / Nk
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(44)).to(DEVICE, dtype)
    other_dout = dout.clone()
    other_dout[:, :, overflowing] = 1.0
    lse, *whole = _gradients(q, k, v, dout, False, None, monkeypatch, prefetch=None, whole=None)
    _, *masked = _gradients(q, k, v, dout, False, None, monkeypatch, prefetch=None, whole=False)
    _, *other = _gradients(q, k, v, other_dout, False, None, monkeypatch, prefetch=None, whole=None)
    assert torch.all(lse[:, :, overflowing] == float("-inf")) and torch.all(lse[:, :, 24:].isfinite())
    for name, a, b in zip(("dq", "dk", "dv"), whole, masked):
        assert not torch.isnan(a).any(), f"{name} has NaN elements"
        assert torch.equal(a, b), f"{name} differs between whole and masked query blocks"
    assert torch.all(whole[0][:, :, overflowing] == 0)
    for name, a, b in zip(("dk", "dv"), whole[1:], other[1:]):
        assert torch.equal(a, b), f"{name} depends on the dO of rows whose P is 0"
