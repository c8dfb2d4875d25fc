"""Sliding windows and logit softcapping, FlashAttention's `window_size` and `softcap`: the masking rule,
forward and backward against float64 within the tolerance policy, rows a window leaves without keys,
blocks outside every window never read, and bad options refused before any launch. (torch.compile and
opcheck of the extended ops: tests/test_ops.py.)"""

from __future__ import annotations

import math

import pytest
import torch

import core
import core.testing

from .conftest import DEVICE, ON_GPU
from .helpers import DTYPES, assert_all_within_tolerance, compare_with_reference, leaf_copy, make_qkv

# (causal, window_size, Nq, Nk): each side bounded or not, Nq < Nk and Nq > Nk, windows narrower than a
# tile and wider than the sequence, and a causal call whose right side FlashAttention's rule sets to 0.
if ON_GPU:
    HEADS, HEAD_DIM = (2, 8, 2), 128
    WINDOWS = [
        (True, (256, -1), 1000, 1000),  # Mistral's causal sliding window
        (True, (0, -1), 700, 1300),  # the diagonal alone
        (False, (100, 37), 1000, 1337),  # two-sided, Nq < Nk
        (False, (-1, 61), 1300, 700),  # right side only, Nq > Nk
        (False, (300, -1), 513, 1025),  # left side only
        (False, (0, 0), 777, 777),
        (True, (64, 500), 600, 1100),  # causal: the right side is 0 whatever it says
        (False, (4000, 4000), 1000, 1000),  # wider than the sequence: full attention
    ]
else:
    HEADS, HEAD_DIM = (1, 4, 2), 16
    WINDOWS = [
        (True, (4, -1), 40, 40),
        (True, (0, -1), 24, 40),
        (False, (3, 5), 40, 56),
        (False, (-1, 2), 40, 24),
        (False, (7, -1), 24, 40),
        (False, (0, 0), 33, 33),
        (True, (20, 9), 24, 56),
        (False, (200, 200), 33, 20),
    ]


def _window_id(case):
    causal, (left, right), n_queries, n_keys = case
    return f"{'causal' if causal else 'full'}-w{left},{right}-Nq{n_queries}-Nk{n_keys}"


def test_visible_keys_mask_follows_flash_attention():
    """i + Nk - Nq - left <= j <= i + Nk - Nq + right, -1 unbounded; causal sets right to 0."""
    mask = core.reference.visible_keys_mask(3, 5, causal=False, window_size=(1, 0))
    assert mask.int().tolist() == [[0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]
    mask = core.reference.visible_keys_mask(3, 5, causal=False, window_size=(-1, 1))
    assert mask.int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    causal_window = core.reference.visible_keys_mask(4, 4, causal=True, window_size=(1, 3))
    assert torch.equal(
        causal_window, core.reference.visible_keys_mask(4, 4, causal=False, window_size=(1, 0))
    )
    # A non-causal window (-1, 0) is the bottom-right causal mask, and (-1, -1) no mask at all.
    for n_queries, n_keys in ((5, 3), (3, 5)):
        causal = core.reference.visible_keys_mask(n_queries, n_keys, causal=True)
        window = core.reference.visible_keys_mask(n_queries, n_keys, causal=False, window_size=(-1, 0))
        assert torch.equal(causal, window)
        assert core.reference.visible_keys_mask(n_queries, n_keys, causal=False, window_size=(-1, -1)).all()


def test_reference_window_and_softcap_match_their_definitions():
    """The float64 truth itself: a window is SDPA with the window's mask, a softcap is tanh on the
    scaled scores."""
    q, k, v = make_qkv(1, 2, 2, 11, 13, 8, torch.float64, seed=1, requires_grad=False)
    mask = core.reference.visible_keys_mask(11, 13, causal=False, window_size=(2, 3), device=DEVICE)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = core.attention_reference(q, k, v, causal=False, window_size=(2, 3))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    scale, cap = 0.7, 1.5
    scores = cap * torch.tanh(q @ k.transpose(-1, -2) * scale / cap)
    expected = torch.softmax(scores, dim=-1) @ v
    got, lse = core.attention_reference(q, k, v, causal=False, sm_scale=scale, softcap=cap, return_lse=True)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", WINDOWS, ids=_window_id)
def test_windows_within_policy(case, dtype):
    causal, window, n_queries, n_keys = case
    batch, q_heads, kv_heads = HEADS
    q, k, v = make_qkv(batch, q_heads, kv_heads, n_queries, n_keys, HEAD_DIM, dtype, seed=n_queries + n_keys)
    assert_all_within_tolerance(compare_with_reference(q, k, v, causal=causal, window_size=window))


def test_rows_a_window_leaves_without_keys():
    """Rows whose window holds no key output 0, with LSE -inf and zero gradients; the others are within
    the policy. Nq > Nk with a narrow window: row i sees keys i - (Nq - Nk) +- 2."""
    n_queries, n_keys = (600, 100) if ON_GPU else (40, 10)
    empty = n_queries - n_keys - 2  # rows 0 .. empty - 1 see no key
    q, k, v = make_qkv(1, 2, 1, n_queries, n_keys, 32, torch.float16, seed=5)
    out, lse = core.attention(q, k, v, causal=False, window_size=(2, 2), return_lse=True)
    assert torch.all(out[:, :, :empty] == 0) and torch.all(lse[:, :, :empty] == float("-inf"))
    assert torch.isfinite(lse[:, :, empty:]).all()
    (out.float().sum() + lse[:, :, empty:].sum()).backward()
    assert torch.all(q.grad[:, :, :empty] == 0)
    for grad in (q.grad, k.grad, v.grad):
        assert torch.isfinite(grad).all()
    q, k, v = (leaf_copy(t) for t in (q, k, v))
    assert_all_within_tolerance(compare_with_reference(q, k, v, causal=False, window_size=(2, 2)))


def _run(q, k, v, dout, **options):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = core.attention(*leaves, **options, return_lse=True)
    out.backward(dout)
    return [out, lse, *(t.grad for t in leaves)]


@pytest.mark.parametrize("side", ["keys", "queries"])
def test_blocks_outside_every_window_are_never_read(side):
    """Skipped, not masked: NaN in keys and values (or queries and upstream gradients) that no window
    reaches, at least two tiles away from every window, changes no bit of any result. A masked block
    would have been read: its NaN values would reach the output through P V (0 * NaN)."""
    if side == "keys":  # few queries at the end of many keys: keys below the window are never seen
        n_queries, n_keys, window = (64, 2048, 64) if ON_GPU else (16, 128, 8)
        far = slice(0, n_keys - n_queries - window - (512 if ON_GPU else 32))
    else:  # many queries, few keys: the first queries see no key at all
        n_queries, n_keys, window = (2048, 64, 64) if ON_GPU else (128, 16, 4)
        far = slice(0, n_queries - n_keys - window - (512 if ON_GPU else 32))
    q, k, v = make_qkv(1, 2, 1, n_queries, n_keys, 32, torch.bfloat16, seed=7, requires_grad=False)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(8)).to(DEVICE, q.dtype)
    clean = _run(q, k, v, dout, causal=True, window_size=(window, -1))
    if side == "keys":
        k[:, :, far], v[:, :, far] = float("nan"), float("nan")
    else:
        q[:, :, far], dout[:, :, far] = float("nan"), float("nan")
    poisoned = _run(q, k, v, dout, causal=True, window_size=(window, -1))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), clean, poisoned):
        assert torch.equal(a, b), f"{name}: a block outside every window was read"


def test_windows_that_bound_nothing_change_no_bit():
    """FlashAttention's rule: a causal call ignores the right side; a window wider than the sequence
    is no window. Both give the plain kernels' exact bits."""
    q, k, v = make_qkv(1, 2, 1, 40, 56, 16, torch.float16, seed=9)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(10)).to(DEVICE, q.dtype)
    for causal, window in ((True, (-1, 5)), (True, (1000, 0)), (False, (1000, 1000)), (False, (-1, -1))):
        plain = _run(q, k, v, dout, causal=causal)
        windowed = _run(q, k, v, dout, causal=causal, window_size=window)
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), plain, windowed):
            assert torch.equal(a, b), f"{name} differs for causal={causal}, window_size={window}"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softcap_within_policy(dtype, causal):
    shape = (2, 4, 2, 300, 400, 128) if ON_GPU else (1, 4, 2, 24, 40, 16)
    q, k, v = make_qkv(*shape, dtype, seed=11)
    assert_all_within_tolerance(compare_with_reference(q, k, v, causal=causal, softcap=1.5))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softcap_saturates_at_large_logits(dtype):
    """Logits in the hundreds against a cap of 5: tanh saturates, most capped scores sit within a
    rounding of +-5, their slope 1 - tanh^2 underflows towards 0, and the softmax spreads over the keys
    whose capped scores tie at the top."""
    shape = (1, 4, 2, 200, 300, 64) if ON_GPU else (1, 2, 1, 24, 40, 16)
    q, k, v = make_qkv(*shape, dtype, seed=13, requires_grad=False)
    q, k = 6.0 * q, 6.0 * k
    scale = 1.0 / math.sqrt(shape[-1])
    keys_per_query_head = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # GQA
    assert (q.double() @ keys_per_query_head.transpose(-1, -2) * scale).abs().max() > 100
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert_all_within_tolerance(compare_with_reference(q, k, v, causal=True, softcap=5.0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softcap_with_a_window(dtype):
    shape = (1, 4, 2, 500, 700, 64) if ON_GPU else (1, 4, 2, 33, 47, 32)
    q, k, v = make_qkv(*shape, dtype, seed=15)
    window = (100, -1) if ON_GPU else (9, -1)
    assert_all_within_tolerance(
        compare_with_reference(q, k, v, causal=True, window_size=window, softcap=2.0, sm_scale=0.4)
    )


@pytest.mark.parametrize(
    "options,error,match",
    [
        ({"window_size": (-2, 0)}, ValueError, "left side must be -1"),
        ({"window_size": (3, -5)}, ValueError, "right side must be -1"),
        ({"window_size": (1.5, 0)}, TypeError, "must be an int"),
        ({"window_size": (True, 0)}, TypeError, "must be an int"),
        ({"window_size": (1, 2, 3)}, TypeError, "pair"),
        ({"window_size": 4}, TypeError, "pair"),
        ({"softcap": -1.0}, ValueError, "softcap must be finite and >= 0"),
        ({"softcap": float("nan")}, ValueError, "softcap must be finite"),
        ({"softcap": float("inf")}, ValueError, "softcap must be finite"),
        ({"softcap": 1e39}, ValueError, "at most"),
        ({"softcap": "50"}, TypeError, "softcap must be a real number"),
        ({"softcap": torch.tensor(50.0)}, TypeError, "not a tensor"),
    ],
)
def test_bad_window_or_softcap_is_refused_before_any_launch(options, error, match, monkeypatch):
    def launched(*args, **kwargs):
        raise AssertionError("a kernel output was allocated or a kernel launched for invalid input")

    monkeypatch.setattr(core.testing.portable.plans, "new_buffer", launched)
    monkeypatch.setattr(core.testing.portable.launch.BoundLaunch, "__call__", launched)
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, torch.float16, seed=17, requires_grad=False)
    with pytest.raises(error, match=match):
        core.attention(q, k, v, **options)
