"""The dK/dV kernel's prefetched row statistics (core._config.KernelConfig.prefetch_row_stats) change no
bit of any gradient: the same loads of the same LSE and Delta, one step earlier. Both of the kernel's
loops are covered: the one for rows whose LSE low parts are all 0 (typical logits), and the one that
subtracts them (|LSE| beyond 2^8 in base 2, core._fwd_kernel)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import core
import core._config
import core._plans

from .conftest import DEVICE, ON_GPU
from .helpers import leaf_copy, make_qkv

SHAPES = [  # (B, Hq, Hkv, Nq, Nk, D, causal)
    (2, 4, 2, 37, 53, 32, True),  # GQA, ragged, Nq < Nk
    (1, 2, 2, 50, 20, 16, True),  # Nq > Nk: rows that see no key
    (1, 2, 1, 45, 64, 64, False),  # MQA
]
if ON_GPU:  # head dims up to 64, where the table prefetches: D=128's tiles would run out of shared memory
    SHAPES += [(2, 8, 2, 1000, 1337, 64, True), (1, 4, 4, 513, 700, 64, False), (1, 2, 2, 300, 300, 40, True)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}/{}-Nq{}-Nk{}-D{}-{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sm_scale", [None, 40.0], ids=["typical-logits", "lse-low-parts"])
def test_prefetched_row_statistics_give_the_same_bits(shape, dtype, sm_scale, monkeypatch):
    *sizes, causal = shape
    q, k, v = make_qkv(*sizes, dtype, seed=41)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(42)).to(DEVICE, dtype)
    table = core._config.backward_configs

    def gradients(prefetch: bool):
        def configs(block_d, dtype, interpreted):
            dkdv, dq = table(block_d, dtype, interpreted)
            return dataclasses.replace(dkdv, prefetch_row_stats=prefetch), dq

        monkeypatch.setattr(core._config, "backward_configs", configs)
        core._plans.clear()  # a cached plan would keep the other choice
        qq, kk, vv = (leaf_copy(t) for t in (q, k, v))
        out, lse = core.attention(qq, kk, vv, causal=causal, sm_scale=sm_scale, return_lse=True)
        out.backward(dout)
        return lse, qq.grad, kk.grad, vv.grad

    lse, *prefetched = gradients(True)
    if sm_scale is not None:  # the case is meant to take the subtracting loop: some |LSE2| >= 2^8
        assert bool((lse.abs() >= 256).any())
    _, *plain = gradients(False)
    for name, a, b in zip(("dq", "dk", "dv"), prefetched, plain):
        assert not torch.isnan(a).any(), f"{name} has unwritten (NaN) elements"
        assert torch.equal(a, b), f"{name} differs with the row statistics prefetched"
