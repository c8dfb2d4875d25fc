"""Tests of the lab's instruments: the rounding functions, the emulator (against the float64 truth and,
under the Triton interpreter, against the kernel bit for bit), the standalone P.V kernel and the fits.

    PYTHONPATH=.:packages/core/src python -m pytest numerics/test_emulator.py -q
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

# Without a GPU the kernel comparisons run under the interpreter, chosen before core is imported.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import core
from numerics import emulator, inputs, kernel, pv_kernel, truth
from numerics.experiments.e9_closing_the_gap import EMULATED
from numerics.fit import power_law
from numerics.formats import FORMATS, round_bf16, round_fp16
from numerics.metrics import relative_rmse, ulp_distance
from numerics.tensors import to_numpy, to_torch

interpreted = pytest.mark.skipif(
    not core.is_interpreted(), reason="bit-exactness holds against the interpreter"
)
# Every quantity in fp64: the online softmax with rounding taken out.
EXACT = emulator.Arithmetic(
    **{q: "fp64" for q in ("wide", "scores", "m", "l", "alpha", "p", "p_cast", "acc", "out", "ds_cast")},
    block_m=16,
    block_n=16,
)


def awkward_floats(n=200_000, seed=0) -> np.ndarray:
    """float32 values over the whole range, plus the cases rounding gets wrong: ties, overflow, NaN."""
    gen = np.random.default_rng(seed)
    with np.errstate(over="ignore"):
        x = (gen.standard_normal(n) * np.exp2(gen.uniform(-140, 128, n))).astype(np.float32)
    ties = (gen.integers(0, 0x7F7F, 1000).astype(np.uint32) << 16 | 0x8000).view(
        np.float32
    )  # exactly half-way
    specials = np.array(
        [0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65520, 3.3895314e38, 1e-45], dtype=np.float32
    )
    return np.concatenate([x, ties, specials])


def test_bf16_rounding_matches_torch():
    x = awkward_floats()
    expected = torch.from_numpy(x).bfloat16().float().numpy()
    np.testing.assert_array_equal(round_bf16(x), expected)


def test_fp16_rounding_matches_numpy():
    x = awkward_floats()
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(round_fp16(x), x.astype(np.float16).astype(np.float32))


def test_ulp_distance_counts_representable_numbers():
    one = np.float16(1.0)
    assert ulp_distance(
        [1.0, 1.0, -0.0], [1.0, float(np.nextafter(one, np.float16(2))), 0.0], "fp16"
    ).tolist() == [0, 1, 0]
    assert ulp_distance([-1.0], [1.0], "bf16")[0] == 2 * 0x3F80


@pytest.mark.parametrize(
    "causal, shape",
    [(False, (1, 2, 2, 37, 53, 24)), (True, (2, 4, 2, 70, 45, 64)), (True, (1, 2, 2, 20, 90, 40))],
)
def test_exact_arithmetic_is_the_float64_truth(causal, shape):
    """With every quantity in fp64 the online softmax must equal attention to rounding (1e-12)."""
    b, hq, hkv, nq, nk, d = shape
    gen = inputs.rng(1)
    q, k, v = (gen.standard_normal((b, h, n, d)) for h, n in ((hq, nq), (hkv, nk), (hkv, nk)))
    got = emulator.forward(q, k, v, "fp64", EXACT, causal=causal)
    out, lse = truth.forward(*(torch.from_numpy(x) for x in (q, k, v)), causal=causal)
    np.testing.assert_allclose(got.out, out.numpy(), atol=1e-12)
    np.testing.assert_allclose(got.lse, lse.numpy(), atol=1e-12)


def test_exact_backward_is_the_float64_truth():
    gen = inputs.rng(2)
    q, k, v, dout = (gen.standard_normal((1, 2, n, 32)) for n in (40, 50, 50, 40))
    fwd = emulator.forward(q, k, v, "fp64", EXACT, causal=True)
    got = emulator.backward(q, k, v, fwd.out, dout, fwd.saved_lse, "fp64", EXACT, causal=True)
    expected = truth.backward(*(torch.from_numpy(x) for x in (q, k, v, dout)), causal=True)
    for name, want in zip(("dq", "dk", "dv"), expected, strict=True):
        np.testing.assert_allclose(getattr(got, name), want.numpy(), atol=1e-11)


def test_key_order_does_not_change_exact_attention():
    gen = inputs.rng(3)
    q, k, v = inputs.qkv(gen, 1, 1, 16, 64, 16)
    order = gen.permutation(64)
    a = emulator.forward(q, k, v, "fp64", EXACT).out
    b = emulator.forward(q, k, v, "fp64", EXACT, key_order=order).out
    np.testing.assert_allclose(a, b, atol=1e-13)


def _fp16_case(n=512, d=64, seed=4):
    q, k, v = (to_torch(x, "fp16") for x in inputs.qkv(inputs.rng(seed), 1, 2, n, n, d))
    return [to_numpy(x) for x in (q, k, v)], truth.forward(q, k, v, causal=False)[0]


def test_kernel_arithmetic_error_is_a_few_roundings():
    """fp16: output rounding plus the P cast, each about u / sqrt(3) relative: between 0.5 u and 2 u."""
    arrays, true = _fp16_case()
    error = relative_rmse(emulator.forward(*arrays, "fp16").out, true)
    u = FORMATS["fp16"].unit_roundoff
    assert 0.5 * u < error < 2 * u


def test_each_switch_does_what_it_says():
    arrays, true = _fp16_case()
    err = {
        name: relative_rmse(emulator.forward(*arrays, "fp16", emulator.KERNEL.with_(**changes)).out, true)
        for name, changes in {
            "kernel": {},
            "no P cast": {"p_cast": "fp32"},
            "compensated": {"pv_split": True},
            "P in bf16": {"p_cast": "bf16"},
            "l in bf16": {"l": "bf16", "l_kahan": False},
        }.items()
    }
    assert err["no P cast"] < 0.9 * err["kernel"]
    assert abs(err["compensated"] - err["no P cast"]) < 0.01 * err["no P cast"]
    assert err["P in bf16"] > 2 * err["kernel"]
    assert err["l in bf16"] > 5 * err["kernel"]


def _running_sum_errors(**changes) -> list[float]:
    errors = []
    for n in (256, 4096):
        q, k, v = (to_torch(x, "bf16") for x in inputs.qkv(inputs.rng(n), 1, 1, 64, n, 64))
        got = emulator.forward(*(to_numpy(x) for x in (q, k, v)), "bf16", emulator.KERNEL.with_(**changes))
        errors.append(relative_rmse(got.out, truth.forward(q, k, v, causal=False)[0]))
    return errors


def test_low_precision_running_sum_grows_with_n():
    errors = _running_sum_errors(m="bf16", l="bf16", l_kahan=False)
    assert errors[1] > 2 * errors[0]


def test_compensated_running_sum_does_not_grow_with_n():
    """Kahan's compensation keeps even a bf16 running sum (and its bf16 compensation) from growing."""
    errors = _running_sum_errors(l="bf16")
    plain = _running_sum_errors(l="bf16", l_kahan=False)
    assert errors[1] < 1.5 * errors[0] and errors[1] < 0.5 * plain[1]


def test_power_law_recovers_a_known_exponent():
    gen = np.random.default_rng(0)
    x = np.repeat(2.0 ** np.arange(6, 16), 3)
    law = power_law(x, 3e-4 * x**0.5 * np.exp(gen.normal(0, 0.05, x.size)))
    assert law.low < 0.5 < law.high and law.high - law.low < 0.05


@interpreted
@pytest.mark.parametrize(
    "dtype, causal, shape, tiles, sm_scale",
    [("fp16", True, (1, 2, 2, 70, 100, 80), (32, 16), None),
     ("bf16", False, (1, 4, 2, 64, 64, 64), (16, 32), None),
     ("bf16", True, (1, 2, 1, 70, 300, 40), (16, 32), None),
     # Rows on both sides of |LSE2| = 2^8, below which fp16/bf16 save no low part for the LSE.
     ("fp16", True, (1, 2, 2, 70, 100, 80), (32, 16), 8.0),
     ("fp32", True, (1, 1, 1, 50, 40, 32), (16, 16), None),
     # Large logits, where fp32's two-part scores, running max and LSE change the result's bits.
     ("fp32", True, (1, 1, 1, 50, 40, 32), (16, 16), 30.0),
     ("fp32", False, (1, 2, 1, 37, 53, 24), (16, 32), 50.0),
     ("fp32", True, (1, 2, 2, 45, 70, 32), (16, 16), 100.0),
     # Head dims past 32 (BLOCK_D 64, 128, 256), whose fp32 score dots are float64 dots rounded once.
     ("fp32", True, (1, 2, 1, 37, 45, 40), (16, 16), None),
     ("fp32", False, (1, 1, 1, 30, 40, 100), (16, 32), 0.3),
     ("fp32", True, (1, 1, 1, 33, 40, 200), (16, 16), None)],
)  # fmt: skip
def test_emulator_is_the_interpreted_kernel_bit_for_bit(dtype, causal, shape, tiles, sm_scale):
    kernel.load("cpu")
    b, hq, hkv, nq, nk, d = shape
    gen = inputs.rng(5)
    q, k, v = (
        to_torch(gen.standard_normal((b, h, n, d)), dtype) for h, n in ((hq, nq), (hkv, nk), (hkv, nk))
    )
    config = kernel.block_config(*tiles, d)
    out, lse, lse_low = kernel.forward(q, k, v, causal=causal, sm_scale=sm_scale, config=config)
    arrays = [to_numpy(x) for x in (q, k, v)]
    arith = kernel.arithmetic(dtype, *tiles)
    got = emulator.forward(*arrays, dtype, arith, causal=causal, sm_scale=sm_scale)
    np.testing.assert_array_equal(to_numpy(out), got.out)
    np.testing.assert_array_equal(to_numpy(lse), got.saved_lse)
    # The two-part LSE (every dtype): the low part bit for bit.
    np.testing.assert_array_equal(to_numpy(lse_low), got.lse_low)
    if dtype != "fp32" and sm_scale is not None:
        dropped = np.abs(got.saved_lse) < 256
        assert dropped.any() and (~dropped).any() and (got.lse_low[0][~dropped] != 0).any()
    if dtype == "fp32":
        # The case exercises the two-part scores: without them the emulator is not the kernel.
        plain = emulator.forward(
            *arrays, dtype, arith.with_(two_part_scores=False), causal=causal, sm_scale=sm_scale
        )
        assert not np.array_equal(to_numpy(out), plain.out)


@interpreted
@pytest.mark.parametrize(
    "dtype, sm_scale, d",
    [("fp16", None, 64), ("bf16", None, 64), ("fp32", None, 64), ("fp32", 50.0, 64), ("bf16", 50.0, 64),
     # Head dims past 32 (BLOCK_D 64, 128, 256), whose fp32 score dots are float64 dots rounded once.
     ("fp32", None, 40), ("fp32", 20.0, 100), ("fp32", None, 200)],
)  # fmt: skip
def test_emulated_backward_is_the_interpreted_kernel_bit_for_bit(dtype, sm_scale, d):
    kernel.load("cpu")
    gen = inputs.rng(6)
    q, k, v = (to_torch(x, dtype) for x in inputs.qkv(gen, 1, 2, 40, 56, d))
    dout = to_torch(inputs.normal(gen, (1, 2, 40, d)), dtype)
    got = kernel.forward_backward(q, k, v, dout, causal=True, sm_scale=sm_scale)
    arrays = [to_numpy(x) for x in (q, k, v, got["out"], dout)]
    lse_low = None if got["lse_low"] is None else to_numpy(got["lse_low"])
    arith = kernel.arithmetic(dtype, 16, 16)

    def emulated(arith):
        return emulator.backward(
            *arrays, to_numpy(got["lse"]), dtype, arith, lse_low=lse_low, causal=True, sm_scale=sm_scale
        )

    emu = emulated(arith)
    for name in ("dq", "dk", "dv"):
        np.testing.assert_array_equal(to_numpy(got[name]), getattr(emu, name))
    if dtype == "fp32" and sm_scale is not None:
        # At large logits P needs the scores' low parts (at 1/sqrt(64) the scale is exact and they are 0).
        plain = emulated(arith.with_(two_part_scores=False))
        assert not all(
            np.array_equal(to_numpy(got[name]), getattr(plain, name)) for name in ("dq", "dk", "dv")
        )


@interpreted
@pytest.mark.parametrize(
    "variant, dtype",
    [(v, d) for v in pv_kernel.VARIANTS for d in ("fp16", "bf16") if d == "bf16" or "bf16 inputs" not in v],
)
def test_pv_kernel_variant_is_its_emulation(variant, dtype):
    q, k, v = (to_torch(x, dtype) for x in inputs.qkv(inputs.rng(7), 1, 2, 64, 64, 32))
    out = pv_kernel.attention(q, k, v, variant, block_m=32, block_n=16, num_warps=1, num_stages=1)
    arith = emulator.KERNEL.with_(block_m=32, block_n=16, **EMULATED[variant])
    np.testing.assert_array_equal(
        to_numpy(out), emulator.forward(*(to_numpy(x) for x in (q, k, v)), dtype, arith).out
    )
