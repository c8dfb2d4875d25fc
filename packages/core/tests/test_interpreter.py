"""The interpreter patches (core.testing.patch_interpreter): dots and bf16 casts as on the GPU."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import core
import core.testing

from .conftest import ON_GPU

pytestmark = pytest.mark.skipif(ON_GPU, reason="interpreter-only behaviour")


@triton.jit
def _dot_kernel(A, B, C, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(A + rm[:, None] * K + rk[None, :])
    b = tl.load(B + rk[:, None] * N + rn[None, :])
    tl.store(C + rm[:, None] * N + rn[None, :], tl.dot(a, b))


def test_patched_bf16_dot_multiplies_values_not_bit_patterns():
    core.testing.patch_interpreter()
    gen = torch.Generator().manual_seed(31)
    a = torch.randn(16, 32, generator=gen).bfloat16()
    b = torch.randn(32, 16, generator=gen).bfloat16()
    c = torch.empty(16, 16)
    _dot_kernel[(1,)](a, b, c, 16, 16, 32)
    # bf16 products are exact in fp32, so the only difference from float64 is fp32 summation.
    torch.testing.assert_close(c.double(), a.double() @ b.double(), rtol=1e-6, atol=1e-5)


def test_kernels_are_interpreted_on_cpu():
    assert core.is_interpreted()


@triton.jit
def _cast_kernel(X, Y, N: tl.constexpr):
    offsets = tl.arange(0, N)
    tl.store(Y + offsets, tl.load(X + offsets).to(tl.bfloat16))


def test_patched_float32_to_bf16_cast_rounds_to_nearest_even():
    core.testing.patch_interpreter()
    gen = torch.Generator().manual_seed(37)
    x = torch.cat([torch.randn(1022, generator=gen) * 100, torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8])])
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, y, x.numel())
    assert torch.equal(y, x.bfloat16())  # torch's cast rounds to nearest even, like the GPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_patched_dot_gives_the_same_bits_whatever_the_operand_order(dtype):
    """Element (i, j) of a @ b and element (j, i) of b^T @ a^T are the same float32 number, as on the
    GPU: the kernels' backward relies on recomputing the forward's scores exactly."""
    core.testing.patch_interpreter()
    gen = torch.Generator().manual_seed(41)
    a = (torch.randn(16, 128, generator=gen) * 10).to(dtype)
    b = (torch.randn(128, 16, generator=gen) * 10).to(dtype)
    ab, ba = torch.empty(16, 16), torch.empty(16, 16)
    _dot_kernel[(1,)](a, b, ab, 16, 16, 128)
    _dot_kernel[(1,)](b.T.contiguous(), a.T.contiguous(), ba, 16, 16, 128)
    assert torch.equal(ab, ba.T)
    # ...and that number is the exact sum rounded once.
    assert torch.equal(ab, (a.double() @ b.double()).float())
