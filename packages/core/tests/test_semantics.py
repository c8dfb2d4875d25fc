"""What the numbers mean: masking convention, rows without keys, GQA, LSE and its gradient."""

from __future__ import annotations

import math

import pytest
import torch

import core
from core.tolerance import judge

from .conftest import DEVICE, ON_GPU
from .helpers import DTYPES, assert_all_within_tolerance, compare_with_reference, leaf_copy, make_qkv


def test_reference_matches_torch_sdpa_in_float64():
    """The ground truth itself is checked: for Nq == Nk both mask conventions coincide."""
    q, k, v = make_qkv(2, 3, 3, 19, 19, 24, torch.float64, seed=1, requires_grad=False)
    for causal in (False, True):
        expected = torch.nn.functional.scaled_dot_product_attention(
            q.cpu(), k.cpu(), v.cpu(), is_causal=causal
        )
        got = core.attention_reference(q, k, v, causal=causal).cpu()
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_reference_lse_gradient_is_the_softmax_at_any_logit():
    """Two keys tie at logit 1e18, where float64's rounded LSE has lost log 2: the gradient of the LSE
    is still P = 1/2 per key (torch.logsumexp's backward, exp(s - lse), gives 1 each)."""
    q = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    k = torch.ones(1, 1, 2, 1, dtype=torch.float64, requires_grad=True)
    v = torch.zeros(1, 1, 2, 1, dtype=torch.float64)
    _, lse = core.attention_reference(q, k, v, causal=False, sm_scale=1e18, return_lse=True)
    lse.sum().backward()
    assert k.grad.flatten().tolist() == [0.5e18, 0.5e18]


def test_causal_mask_is_bottom_right_aligned():
    """Query i sees key j iff j <= i + Nk - Nq: a 2-query, 5-key problem by hand."""
    mask = core.reference.visible_keys_mask(2, 5, causal=True)
    assert mask.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    mask = core.reference.visible_keys_mask(4, 2, causal=True)
    assert mask.tolist() == [[False, False], [False, False], [True, False], [True, True]]


def test_causal_kernel_matches_explicit_bottom_right_mask():
    q, k, v = make_qkv(1, 2, 2, 23, 41, 32, torch.float32, seed=3, requires_grad=False)
    mask = core.reference.visible_keys_mask(23, 41, causal=True, device=DEVICE)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=mask
    )
    torch.testing.assert_close(core.attention(q, k, v, causal=True).double(), expected, rtol=0, atol=2e-6)


def test_rows_that_see_no_key_give_zero_output_minus_inf_lse_and_zero_grads():
    n_queries, n_keys = (300, 100) if ON_GPU else (40, 9)
    q, k, v = make_qkv(1, 2, 2, n_queries, n_keys, 32, torch.float16, seed=5)
    out, lse = core.attention(q, k, v, causal=True, return_lse=True)
    empty = n_queries - n_keys  # rows 0 .. Nq-Nk-1 see nothing
    assert torch.all(out[:, :, :empty] == 0)
    assert torch.all(lse[:, :, :empty] == float("-inf"))
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, empty:]).all()
    (out.float().sum() + lse[:, :, empty:].sum()).backward()
    assert torch.all(q.grad[:, :, :empty] == 0)
    for g in (q.grad, k.grad, v.grad):
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_queries", [2, 20])
def test_an_infinite_or_nan_key_spoils_only_the_rows_whose_truth_it_spoils(dtype, n_queries):
    """Key 3 scores -inf for every query (P = 0, every row's truth finite); the last key holds a NaN and
    is hidden by the causal mask from every row but the last. Rows that do not see it must match the
    float64 truth. The GPU fuzzer found float32 rows output 0 with LSE -inf: the low part of a -inf
    score (-inf - -inf) and of a hidden NaN key was NaN (core.kernels.shared._low_part)."""
    n_keys = 2048 if ON_GPU else 40  # enough for the decode family to take the call too
    q, k, v = make_qkv(1, 2, 1, n_queries, n_keys, 16, dtype, seed=13, requires_grad=False)
    q[..., 5] = q[..., 5].abs() + 0.5
    k[:, :, 3, 5] = float("-inf")
    k[:, :, n_keys - 1, 2] = float("nan")
    out, lse = core.attention(q, k, v, causal=True, return_lse=True)
    truth = core.attention_reference(q, k, v, causal=True, return_lse=True, compute_dtype=torch.float64)
    eager = core.attention_reference(q, k, v, causal=True, return_lse=True, compute_dtype=None)
    clean = truth[0].isfinite().all(-1)
    assert int(clean.sum()) == 2 * (n_queries - 1), "only the last row of each head sees the NaN key"
    verdicts = [
        judge("out", out[clean], truth[0][clean], eager[0][clean]),
        judge("lse", lse[clean], truth[1][clean], eager[1][clean], input_dtype=dtype),
    ]
    assert_all_within_tolerance(verdicts)


def test_gqa_equals_attention_with_repeated_kv():
    q, k, v = make_qkv(2, 6, 2, 33, 47, 64, torch.float16, seed=9)
    out = core.attention(q, k, v, causal=True)
    k_rep, v_rep = (leaf_copy(t.repeat_interleave(3, dim=1)) for t in (k, v))
    q2 = leaf_copy(q)
    out_rep = core.attention(q2, k_rep, v_rep, causal=True)
    assert torch.equal(out, out_rep)  # same programs, same keys, same order: bitwise equal
    dout = torch.randn_like(out)
    (out * dout).sum().backward()
    (out_rep * dout).sum().backward()
    assert torch.equal(q.grad, q2.grad)
    # the grouped dK/dV is the sum over each group's query heads of the repeated one (fp32 sums of
    # fp16 values can round differently, so this one is a close comparison)
    torch.testing.assert_close(
        k.grad.float(), k_rep.grad.float().unflatten(1, (2, 3)).sum(2), rtol=2e-3, atol=2e-3
    )
    torch.testing.assert_close(
        v.grad.float(), v_rep.grad.float().unflatten(1, (2, 3)).sum(2), rtol=2e-3, atol=2e-3
    )


@pytest.mark.parametrize("n_queries", [4, 16])
def test_gqa_equals_repeated_kv_on_the_grouped_calls_plan(family, n_queries):
    """The decode family plans by rows per KV head: grouped k/v put a group's query heads in one row tile
    and split the keys for that grid; repeated k/v make a tile per head, smaller (at Nq 16, 16 rows
    where the group of 4 fills 64, and the two tiles multiply on different tensor-core instructions),
    and split the keys for a grid as many times larger. Planned like the grouped call
    (core.testing.plan_like), the repeated one takes the grouped one's splits and row tile, and every
    output is bitwise equal, in every family. (The fuzzer's GQA, permutation and linearity properties
    compare their two runs this way.)"""
    # Shapes where the split rule splits the two calls' keys differently: the interpreter plans for 4
    # SMs, a GPU for its own (an H100's 132 take 8 KV heads x 8 sequences in fewer splits).
    batch, kv_heads, n_keys = (8, 8, 2048) if ON_GPU else (1, 1, 256)
    q, k, v = make_qkv(batch, 4 * kv_heads, kv_heads, n_queries, n_keys, 64, torch.float16, seed=21)
    k_rep, v_rep = (leaf_copy(t.repeat_interleave(4, dim=1)) for t in (k, v))
    q_rep = leaf_copy(q)
    grouped_plan = core.testing.plan_for(q, k, v, causal=True)
    if family == "decode":
        repeated_plan = core.testing.plan_for(q_rep, k_rep, v_rep, causal=True).attend
        assert repeated_plan.splits != grouped_plan.attend.splits
        assert (repeated_plan.row_tile != grouped_plan.attend.row_tile) == (n_queries == 16)
    out, lse = core.attention(q, k, v, causal=True, return_lse=True)
    with core.testing.plan_like(grouped_plan):
        if family == "decode":
            replanned = core.testing.plan_for(q_rep, k_rep, v_rep, causal=True).attend
            assert (replanned.splits, replanned.row_tile) == (
                grouped_plan.attend.splits,
                grouped_plan.attend.row_tile,
            )
        out_rep, lse_rep = core.attention(q_rep, k_rep, v_rep, causal=True, return_lse=True)
    assert torch.equal(out, out_rep) and torch.equal(lse, lse_rep)


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = make_qkv(1, 1, 1, 20, 20, 48, torch.float32, seed=11, requires_grad=False)
    default = core.attention(q, k, v)
    explicit = core.attention(q, k, v, sm_scale=1 / math.sqrt(48))
    assert torch.equal(default, explicit)


def test_lse_gradient_and_lse_only_use():
    """d(LSE)/dS = P: the kernel folds dLSE into Delta; using only the LSE works too."""
    q, k, v = make_qkv(1, 2, 2, 29, 37, 32, torch.float32, seed=13)
    q64, k64, v64 = (leaf_copy(t, torch.float64) for t in (q, k, v))
    _, lse = core.attention(q, k, v, causal=True, return_lse=True)
    _, lse64 = core.attention_reference(q64, k64, v64, causal=True, return_lse=True)
    weights = torch.randn(lse.shape, dtype=torch.float64).to(lse.device)
    (lse * weights.float()).sum().backward()
    (lse64 * weights).sum().backward()
    for got, expected in ((q.grad, q64.grad), (k.grad, k64.grad)):
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
    assert torch.all(v.grad == 0)  # the LSE does not depend on v


def test_backward_is_bitwise_deterministic():
    shape = (2, 4, 2, 1500, 1500, 128) if ON_GPU else (1, 2, 1, 50, 50, 64)
    q, k, v = make_qkv(*shape, torch.bfloat16, seed=17)
    dout = torch.randn(q.shape, dtype=q.dtype, device=q.device)

    def grads():
        for t in (q, k, v):
            t.grad = None
        core.attention(q, k, v, causal=True).backward(dout)
        return [t.grad.clone() for t in (q, k, v)]

    first = grads()
    for _ in range(3 if ON_GPU else 1):
        assert all(torch.equal(a, b) for a, b in zip(first, grads()))


def test_double_backward_is_refused_clearly():
    q, k, v = make_qkv(1, 1, 1, 8, 8, 16, torch.float32, seed=19)
    out = core.attention(q, k, v)
    dout = torch.randn_like(out, requires_grad=True)
    (grad_q,) = torch.autograd.grad(out, q, dout, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        grad_q.sum().backward()


def test_lse_gradient_in_any_layout():
    """dLSE arrives in whatever layout the caller's graph gives it (found by the fuzzer: it was read
    as if contiguous)."""
    q, k, v = make_qkv(2, 3, 3, 21, 26, 32, torch.float32, seed=43)
    q64, k64, v64 = (leaf_copy(t, torch.float64) for t in (q, k, v))
    _, lse = core.attention(q, k, v, causal=True, return_lse=True)
    _, lse64 = core.attention_reference(q64, k64, v64, causal=True, return_lse=True)
    weights = torch.randn(2, 21, 3, dtype=torch.float64).to(lse.device)  # (B, N, H) order
    (lse.transpose(1, 2) * weights.float()).sum().backward()
    (lse64.transpose(1, 2) * weights).sum().backward()
    for got, expected in ((q.grad, q64.grad), (k.grad, k64.grad)):
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


def test_very_negative_logits_with_ragged_keys():
    """LSE2 < -128 made exp2(0 - LSE2) overflow for the zero-loaded keys past Nk in the dQ kernel
    (inf * 0 = NaN; found by the fuzzer). Every score here is about -1300."""
    n_keys = 100 if ON_GPU else 20  # not a multiple of any key tile
    q, k, v = make_qkv(1, 2, 2, 24, n_keys, 32, torch.float16, seed=47, requires_grad=False)
    q, k = (0.05 * t + 2 for t in (q, k))
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    assert_all_within_tolerance(compare_with_reference(q, k, v, causal=False, sm_scale=-10.0))
