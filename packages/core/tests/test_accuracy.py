"""Output, LSE and all three gradients against float64, judged by core.tolerance's one policy."""

from __future__ import annotations

import pytest
import torch

import core
from core.tolerance import judge, largest_finite

from .conftest import ON_GPU
from .helpers import DTYPES, assert_all_within_tolerance, compare_with_reference, make_qkv

# (B, Hq, Hkv, Nq, Nk, D): odd lengths around the tile sizes, Nq < Nk and Nq > Nk, every listed head dim.
if ON_GPU:
    SHAPES = [
        (2, 4, 4, 1024, 1024, 64),
        (1, 8, 2, 4096, 4096, 128),
        (2, 2, 2, 1000, 1000, 256),
        (1, 4, 1, 129, 4000, 80),
        (1, 4, 4, 3000, 100, 40),
        (3, 2, 2, 1, 2047, 128),
        (1, 2, 2, 4096, 1, 16),
        (2, 6, 3, 777, 1025, 96),
        (1, 3, 3, 2049, 2048, 111),
    ]
else:
    SHAPES = [
        (1, 2, 2, 17, 17, 40),
        (2, 2, 1, 33, 64, 64),
        (1, 2, 2, 100, 20, 16),
        (1, 1, 1, 1, 37, 80),
        (1, 2, 2, 40, 1, 128),
        (1, 1, 1, 24, 31, 256),
        (1, 2, 2, 400, 1, 16),  # one key, many queries: P must come back as exactly 1, unbiased
    ]


def shape_id(shape):
    b, hq, hkv, nq, nk, d = shape
    return f"B{b}-H{hq}/{hkv}-Nq{nq}-Nk{nk}-D{d}"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_forward_and_backward_within_policy(shape, dtype, causal):
    q, k, v = make_qkv(*shape, dtype, seed=hash((shape, causal)) % 2**31)
    assert_all_within_tolerance(compare_with_reference(q, k, v, causal=causal))


# (B, Hq, Hkv, Nq, Nk, D): GQA, and Nk < Nq, so that under the causal rule's bottom-right alignment the
# first Nq - Nk rows see no key (their LSE is -inf, which the padded copy of the row statistics holds as
# +inf: backward.py, PADDED_STATS); Nq no multiple of any dK/dV BLOCK_M (ragged query blocks: Q and dO
# masked) and a multiple of every one (whole: unmasked, WHOLE_QUERY_BLOCKS).
if ON_GPU:
    NO_KEY_SHAPES = [(2, 8, 2, 1000, 777, 64), (1, 8, 2, 1000, 777, 128)]
    NO_KEY_SHAPES += [(2, 8, 2, 1024, 777, 64), (1, 8, 2, 1024, 777, 128)]
else:
    NO_KEY_SHAPES = [(2, 4, 2, 37, 21, 64), (1, 4, 2, 37, 21, 128)]
    NO_KEY_SHAPES += [(2, 4, 2, 48, 21, 64), (1, 4, 2, 64, 21, 128)]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", NO_KEY_SHAPES, ids=shape_id)
def test_query_blocks_with_rows_that_see_no_key(shape, dtype, causal):
    q, k, v = make_qkv(*shape, dtype, seed=sum(shape))
    assert_all_within_tolerance(compare_with_reference(q, k, v, causal=causal))
    _, lse = core.attention(q, k, v, causal=causal, return_lse=True)
    assert bool((lse == float("-inf")).any()) == causal


@pytest.mark.parametrize("head_dim", [1, 7, 16, 40, 64, 80, 96, 111, 128, 200, 256])
def test_every_head_dim(head_dim):
    n = 300 if ON_GPU else 20
    q, k, v = make_qkv(1, 2, 1, n, n + 3, head_dim, torch.float16, seed=head_dim)
    assert_all_within_tolerance(compare_with_reference(q, k, v, causal=True))


@pytest.mark.parametrize("n_queries", [1, 2, 15, 16, 17, 33, 100, 129])
def test_odd_lengths_square_causal(n_queries):
    n = n_queries * (8 if ON_GPU else 1) + (1 if ON_GPU else 0)
    q, k, v = make_qkv(1, 1, 1, n, n, 64, torch.bfloat16, seed=n)
    assert_all_within_tolerance(compare_with_reference(q, k, v, causal=True))


@pytest.mark.parametrize("sm_scale", [0.0, 0.05, 1.0, -0.3])
def test_explicit_softmax_scale(sm_scale):
    q, k, v = make_qkv(1, 2, 2, 40, 50, 32, torch.float16, seed=7)
    assert_all_within_tolerance(compare_with_reference(q, k, v, causal=True, sm_scale=sm_scale))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_rows_tied_between_two_keys_at_logits_beyond_2_pow_24(dtype):
    """Each query's largest score is shared by two identical keys (with identical values), and sm_scale
    puts every logit near 1e9: the softmax gives exactly 1/2 to each. The saved LSE m + log(2) rounds to
    m at that magnitude, so without its low part the backward recomputed P = 1 for both keys and
    doubled their gradients (the GPU fuzzer found dk at 47x the bound in bfloat16); and float32, whose
    low parts once went into one float (fl(m_low + log 2), rounded at |m_low| ~ 1e2), gave dv 1.2x the
    bound until the backward rebuilt the forward's exponent from them apart. float16 is left out
    because its eager reference overflows at such logits and the policy has no bound to judge by."""
    q, k, v = make_qkv(1, 2, 2, 24, 40, 32, dtype, seed=11)
    q, k, v = q.detach().abs(), k.detach().clone(), v.detach().clone()
    k[:, :, 7] = 3.0  # q > 0: q . k_7 = 3 sum(q), far above every random key's score
    k[:, :, 23], v[:, :, 23] = k[:, :, 7], v[:, :, 7]
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    assert_all_within_tolerance(compare_with_reference(q, k, v, causal=False, sm_scale=1e8))


def _dq_over_equal_keys(q, k, v, dout, sm_scale):
    """(true dq, eager same-dtype dq, the gradient family's scale, core's dq verdict) for the gradients
    of sum(out * dout); the family's scale is the largest true gradient (dv in these cases)."""

    def gradients(attend, dtype=None):
        leaves = [x.detach().to(dtype or x.dtype).requires_grad_() for x in (q, k, v)]
        attend(*leaves, causal=False, sm_scale=sm_scale).backward(dout.to(dtype or dout.dtype))
        return [leaf.grad for leaf in leaves]

    truth = gradients(core.attention_reference, torch.float64)
    eager = gradients(lambda *args, **kw: core.attention_reference(*args, **kw, compute_dtype=None))
    family = largest_finite(*truth)
    verdict = judge("dq", gradients(core.attention)[0], truth[0], eager[0], family_scale=family)
    return truth[0], eager[0], family, verdict


@pytest.mark.parametrize("sm_scale", [None, 3851.8], ids=["default-scale", "scale-3852"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_a_zero_query_over_equal_keys_gets_the_true_zero_dq(dtype, sm_scale):
    """q = 0 and two equal keys: both logits are 0, P = 1/2 each, and dq = sm_scale k (dS_0 + dS_1) = 0
    exactly, since a row's dS sums to 0 without a gradient on the LSE. Eager attention gets that 0; a
    backward whose Delta is dO . O, with O rounded to the input dtype, sums dS to dO . (O - O rounded)
    instead and puts sm_scale k times that into dq: 1.4-1.9x the policy's bound at the default
    sm_scale, 4e4x at 3852 (the GPU fuzzer, float16). fp16/bf16 now sum Delta from P and dP
    (core.kernels.portable.plans.PreciseDelta)."""
    q, k, v = make_qkv(3, 2, 2, 1, 2, 64, dtype, seed=1270, requires_grad=False)
    q = torch.zeros_like(q)
    k[:, :, 1] = k[:, :, 0]
    dout = torch.ones_like(q)
    truth, eager, _family, verdict = _dq_over_equal_keys(q, k, v, dout, sm_scale)
    assert torch.all(truth == 0) and torch.all(eager == 0)
    # One ulp of the largest true gradient (dv here: half of dO per key) is the whole bound.
    assert_all_within_tolerance([verdict])


@pytest.mark.parametrize(
    "dtype, seed", [(torch.float16, 225), (torch.float16, 477), (torch.bfloat16, 225)], ids=str
)
def test_a_tiny_query_over_equal_keys_gets_the_true_zero_dq(dtype, seed):
    """Two equal keys and a tiny q (its logits ~1e-3 at sm_scale 2330): both keys get the same P, not
    exactly 1/2 (the LSE rounds), their dP - Delta are exactly opposite and so are their dS, and dq is
    exactly 0, as eager attention gets it. With Delta = sum P dP / sum P rounded to float32 (not the
    pair's exact midpoint), one of the two dS could round to float16 differently from the other, and
    sm_scale carried that ulp into dq: 1502x (seed 225) and 1102x (477) the bound, 8 of 600 seeds
    (found by numerics' emulator, docs/numerics-policy.md, "Delta"). The dQ kernel now keeps Delta in two
    parts and rounds dP - Delta once (core.kernels.portable.backward._dp_minus_delta)."""
    sm_scale, head_dim = 2329.93, 16
    q, k, v = make_qkv(4, 2, 2, 8, 2, head_dim, dtype, seed=seed, requires_grad=False)
    q = (q.double() / (sm_scale * head_dim**0.5)).to(dtype)
    k[:, :, 1] = k[:, :, 0]
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed)).to(q.device, dtype)
    truth, _eager, family, verdict = _dq_over_equal_keys(q, k, v, dout, sm_scale)
    # 0 up to float64's own rounding (on the GPU the float64 reference leaves ~1e-14).
    assert truth.abs().max() <= 1e-12 * family
    assert_all_within_tolerance([verdict])


def test_float32_logits_near_the_row_max_keep_the_dots_rounding_error():
    """Keys 1 and 0 of every row differ by a few units of logit at logits ~1e5 (sm_scale 1e4), so both
    carry weight. Once the dot q . k is rounded to float32, such a logit is only good to about
    eps32 * 1e5 ~ 1e-2: the kernel once lost that much in the gap between the two keys, and the output up
    to 1.7x float32 eager attention's bound (GPU fuzzer, sm_scale -9880). The scores now carry the dot's
    rounding error with the scale's (core.kernels.shared._scores): the output is as close to the float64
    truth as float32 can hold it, a few ulps, where eager float32 attention is ~1e4x further off."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(1, 2, 2, 48, 16, 64, torch.float32, seed=12, requires_grad=False)
    k[:, :, 1] = k[:, :, 0] + 1e-4 * torch.randn(k[:, :, 0].shape, generator=gen).to(k.device)
    k[:, :, 2:] *= 0.1  # far below keys 0 and 1 at this scale: every row is a mix of those two
    q = q * torch.sign(q @ k[:, :, :1].transpose(-1, -2))  # q . k_0 > 0: keys 0 and 1 lead every row
    sm_scale = 1e4
    out = core.attention(q, k, v, causal=False, sm_scale=sm_scale)
    truth = core.attention_reference(q, k, v, causal=False, sm_scale=sm_scale)
    eps32 = torch.finfo(torch.float32).eps
    assert (out.double() - truth).abs().max() <= 4 * eps32 * v.abs().max()
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    assert_all_within_tolerance(compare_with_reference(q, k, v, causal=False, sm_scale=sm_scale))


def test_float32_gradients_of_nearly_one_hot_rows_keep_float32_precision():
    """At sm_scale 100 most rows give their largest key all but ~1e-6 of their weight, and that key's
    dS = P (dP - Delta) is a tiny difference of two numbers ~1: a rounding of Delta, of dP, of O or of
    that key's P (whose 1 - P is the row's whole remaining weight) was a large part of it, and sm_scale
    multiplied it into dq and dk (GPU fuzzer, sm_scale 295: dk 2.1x the bound). float32's backward now
    sums Delta = sum P dP / sum P in float64 and takes dP - Delta in two parts (the portable backward): dq
    and dk are within a few ulps of the float64 truth's largest element (float32 eager attention is
    ~1000 ulps off here, the kernel before this fix 8-11)."""
    q, k, v = make_qkv(1, 2, 1, 32, 512, 64, torch.float32, seed=3)
    sm_scale = 100.0
    core.attention(q, k, v, causal=False, sm_scale=sm_scale).sum().backward()
    exact = [x.detach().double().requires_grad_() for x in (q, k, v)]
    core.attention_reference(*exact, causal=False, sm_scale=sm_scale).sum().backward()
    eps32 = torch.finfo(torch.float32).eps
    for name, got, truth in (("dq", q.grad, exact[0].grad), ("dk", k.grad, exact[1].grad)):
        error = (got.double() - truth).abs().max().item()
        assert error <= 4 * eps32 * truth.abs().max().item(), f"{name}: {error:.3e}"
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    assert_all_within_tolerance(compare_with_reference(q, k, v, causal=False, sm_scale=sm_scale))


def test_policy_counts_a_correctly_rounded_overflow_as_exact():
    """A float16 inf where the true value is beyond 65504 is the correctly rounded result, not an
    infinite error; a finite value there is off by at least the distance to the truth."""
    truth = torch.tensor([1.0, 7e4, -1e5], dtype=torch.float64)
    rounded = truth.to(torch.float16)
    saturated = torch.tensor([1.0, 65504.0, -65504.0], dtype=torch.float16)
    verdict = core.tolerance.judge("dk", rounded, truth, saturated, family_scale=1.0)
    assert verdict.error == 0.0 and verdict.eager_error == 1e5 - 65504.0
    wrong_sign = torch.tensor([1.0, -float("inf"), -float("inf")], dtype=torch.float16)
    assert core.tolerance.judge("dk", wrong_sign, truth, saturated, family_scale=1.0).error == float("inf")


def test_the_elementwise_allowance_is_the_bound_at_the_largest_eager_error():
    """core.tolerance.allowance, element by element, is judge's bound with each element's own eager
    error: its largest element is the bound, and each one is factor x that error + the floor."""
    truth = torch.tensor([1.0, -2.0, 3.0, 100.0], dtype=torch.float64)
    eager = torch.tensor([1.0, -2.5, 3.0, 100.25], dtype=torch.float16)
    actual = truth.to(torch.float16)
    bound = core.tolerance.judge("dq", actual, truth, eager, family_scale=200.0).bound
    allowed = core.tolerance.allowance("dq", truth, eager, family_scale=200.0)
    floor = torch.finfo(torch.float16).eps * 200.0
    assert allowed.max().item() == bound
    assert torch.equal(allowed, 3.0 * torch.tensor([0.0, 0.5, 0.0, 0.25], dtype=torch.float64) + floor)
