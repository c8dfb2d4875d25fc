"""core.flash_attn_interface: FlashAttention 2's functions over core. Each is core's entry point on
transposed views, so results must be core's bitwise; what the layouts mean is checked against data
placed where FlashAttention puts it (the appended cache rows, the (B, N, H, D) output); what core lacks
is refused."""

from __future__ import annotations

import pytest
import torch

import core
import core.flash_attn_interface as interface
from core.flash_attn_interface import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

from .conftest import DEVICE


def randn(*shape, dtype=torch.float16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(DEVICE, dtype)


def heads_first(t):
    return t.transpose(1, 2)


@pytest.mark.parametrize(
    "options",
    [{}, {"causal": True}, {"causal": True, "window_size": (5, 0), "softcap": 4.0}, {"softmax_scale": 0.2}],
    ids=["full", "causal", "window+softcap", "scale"],
)
def test_flash_attn_func_is_core_attention_in_bnhd_bitwise(options):
    q = randn(2, 40, 4, 32, seed=1).requires_grad_()
    k = randn(2, 40, 2, 32, seed=2).requires_grad_()
    v = randn(2, 40, 2, 32, seed=3).requires_grad_()
    out, lse, probabilities = flash_attn_func(q, k, v, return_attn_probs=True, **options)
    assert out.shape == q.shape and out.is_contiguous() and probabilities is None
    core_options = {"sm_scale" if name == "softmax_scale" else name: value for name, value in options.items()}
    core_options.setdefault("causal", False)  # FlashAttention's default, not core's
    expected, expected_lse = core.attention(*map(heads_first, (q, k, v)), return_lse=True, **core_options)
    assert torch.equal(out, heads_first(expected)) and torch.equal(lse, expected_lse)
    assert torch.equal(flash_attn_func(q, k, v, **options), out)

    dout = randn(*out.shape, seed=4)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    expected_grads = torch.autograd.grad(heads_first(expected), (q, k, v), dout)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected_grads))


def test_deterministic_is_passed_on_with_flashattentions_default(monkeypatch):
    """FlashAttention's deterministic=False default permits an unordered backward; True asks for none."""
    asked = []
    for name in ("attention", "attention_varlen"):
        entry = getattr(interface, name)
        monkeypatch.setattr(
            interface, name, lambda *a, _entry=entry, **o: asked.append(o["deterministic"]) or _entry(*a, **o)
        )
    q, k, v = randn(1, 16, 2, 32, seed=1), randn(1, 16, 2, 32, seed=2), randn(1, 16, 2, 32, seed=3)
    cu_seqlens = torch.tensor([0, 16], dtype=torch.int32, device=DEVICE)
    flash_attn_func(q, k, v)
    flash_attn_func(q, k, v, deterministic=True)
    flash_attn_varlen_func(q[0], k[0], v[0], cu_seqlens, cu_seqlens, 16, 16)
    flash_attn_varlen_func(q[0], k[0], v[0], cu_seqlens, cu_seqlens, 16, 16, deterministic=True)
    assert asked == [False, True, False, True]


def test_flash_attn_varlen_func_is_core_attention_varlen_bitwise():
    cu_seqlens = torch.tensor([0, 7, 7, 30], dtype=torch.int32, device=DEVICE)
    q, k, v = randn(30, 4, 32, seed=1), randn(30, 2, 32, seed=2), randn(30, 2, 32, seed=3)
    out, lse, probabilities = flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, 23, 23, causal=True, window_size=(4, 0), return_attn_probs=True
    )
    expected, expected_lse = core.attention_varlen(
        q, k, v, cu_seqlens, cu_seqlens, 23, 23, causal=True, window_size=(4, 0), return_lse=True
    )
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse) and probabilities is None


@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_flash_attn_with_kvcache_appends_in_flashattentions_layout_and_attends(paged):
    """A cache laid out as FlashAttention lays it out, (B, N, Hkv, D) or (pages, page_size, Hkv, D): the
    new keys land in its rows at cache_seqlens, and the output is core's on the transposed views."""
    batch, kv_heads, head_dim, n_new = 2, 2, 32, 3
    seqlens = torch.tensor([5, 17], dtype=torch.int32, device=DEVICE)
    if paged:
        k_cache, v_cache = randn(6, 16, kv_heads, head_dim, seed=1), randn(6, 16, kv_heads, head_dim, seed=2)
        block_table = torch.tensor([[4, 0, 2], [1, 5, 3]], dtype=torch.int32, device=DEVICE)
    else:
        k_cache, v_cache = (
            randn(batch, 48, kv_heads, head_dim, seed=1),
            randn(batch, 48, kv_heads, head_dim, seed=2),
        )
        block_table = None
    q = randn(batch, n_new, 4, head_dim, seed=3)
    k_new, v_new = (
        randn(batch, n_new, kv_heads, head_dim, seed=4),
        randn(batch, n_new, kv_heads, head_dim, seed=5),
    )
    k_before, v_before = k_cache.clone(), v_cache.clone()

    out, lse = flash_attn_with_kvcache(
        q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens, block_table=block_table,
        causal=True, return_softmax_lse=True,
    )  # fmt: skip
    for b, start in enumerate(seqlens.tolist()):
        for j in range(n_new):
            position = start + j
            if paged:
                page, slot = block_table[b, position // 16], position % 16
                written_k, written_v = k_cache[page, slot], v_cache[page, slot]
            else:
                written_k, written_v = k_cache[b, position], v_cache[b, position]
            assert torch.equal(written_k, k_new[b, j]) and torch.equal(written_v, v_new[b, j])

    expected, expected_lse = core.attention_with_kvcache(
        heads_first(q), heads_first(k_before), heads_first(v_before), cache_seqlens=seqlens,
        k=heads_first(k_new), v=heads_first(v_new), block_table=block_table, causal=True, return_lse=True,
    )  # fmt: skip
    assert out.shape == q.shape
    assert torch.equal(out, heads_first(expected)) and torch.equal(lse, expected_lse)


def test_a_full_cache_without_cache_seqlens_attends_to_every_row():
    q, k_cache, v_cache = randn(2, 1, 4, 32, seed=1), randn(2, 24, 2, 32, seed=2), randn(2, 24, 2, 32, seed=3)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, causal=True)
    expected = core.attention_with_kvcache(*map(heads_first, (q, k_cache, v_cache)), cache_seqlens=24)
    assert torch.equal(out, heads_first(expected))
    with pytest.raises(ValueError, match="needs cache_seqlens"):
        flash_attn_with_kvcache(q, k_cache, v_cache, k=k_cache[:, :1], v=v_cache[:, :1])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda q: flash_attn_func(q, q, q, dropout_p=0.1), "dropout_p=0.1"),
        (lambda q: flash_attn_func(q, q, q, alibi_slopes=torch.ones(4)), "alibi_slopes"),
        (lambda q: flash_attn_with_kvcache(q, q, q, cache_seqlens=4, rotary_cos=q), "rotary_cos"),
        (lambda q: flash_attn_with_kvcache(q, q, q, cache_seqlens=4, cache_leftpad=q), "cache_leftpad"),
    ],
    ids=["dropout", "alibi", "rotary", "leftpad"],
)
def test_what_core_lacks_is_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call(randn(1, 8, 4, 32))


def test_every_function_traces_with_fullgraph_and_gives_eager_bits():
    q, k, v = randn(1, 32, 2, 16, seed=1), randn(1, 32, 2, 16, seed=2), randn(1, 32, 2, 16, seed=3)
    cu_seqlens = torch.tensor([0, 10, 32], dtype=torch.int32, device=DEVICE)
    calls = {
        "func": lambda: flash_attn_func(q, k, v, causal=True, window_size=(4, 0)),
        "varlen": lambda: flash_attn_varlen_func(
            q[0], k[0], v[0], cu_seqlens, cu_seqlens, 22, 22, causal=True
        ),
        "kvcache": lambda: flash_attn_with_kvcache(q[:, :1], k, v, cache_seqlens=20, causal=True),
    }
    for name, call in calls.items():
        torch._dynamo.reset()
        assert torch.equal(torch.compile(call, fullgraph=True, backend="aot_eager")(), call()), name
    torch._dynamo.reset()
