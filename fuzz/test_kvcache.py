"""core.attention_with_kvcache against the float64 truth, on every cache the strategy reaches.

A `KvCase` draws what a serving engine hands the function: dense or paged caches (any page size from 16,
shuffled block tables), FlashAttention/vLLM-layout caches read through their transposed view, per-sequence
cached lengths from empty to full, new keys appended in place, one to sixteen queries (speculative
decoding), GQA/MQA, windows, softcapping, scales and explicit split counts. Each example checks:

- out and the LSE within the tolerance policy of `core.attention_with_kvcache_reference` (float64), where
  the eager same-dtype reference gives the policy a finite yardstick;
- the caches after the call: the appended keys and values bit for bit where they belong, every other
  slot untouched (an out-of-place write shows here);
- a second run gives the same bits (the splits merge in a fixed order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import event, given, settings, target
from hypothesis import strategies as st

import core
from fuzz import profiles, report, sharding
from fuzz.oracle import DEVICE
from fuzz.strategies import sizes

# Examples per profile (the property runs as one test item, on one worker): the CPU profiles' share keeps
# an example near a second of interpreted kernels. On a GPU most examples compile a new variant of the
# kernels (each mask, page size, head dim and dtype is one), which bounds the time-boxed profile.
EXAMPLES = {"ci": 40, "ci-shrink": 40, "dev": 20, "pinned": 1, "gpu-2k": 100, "nightly": 1500}
PAGE_SIZES = (16, 17, 24, 32, 64, 256)


@dataclass(frozen=True)
class KvCase:
    batch: int
    q_heads: int
    kv_heads: int
    n_queries: int
    head_dim: int
    dtype: torch.dtype
    capacity: int  # keys per sequence: N_cache, or pages x page size
    page: int | None  # None: a dense cache
    bshd: bool  # stored (..., N, H, D), handed over transposed
    row_map: bool  # dense only: cache_batch_idx picks each sequence's row among spare ones
    cached: tuple[int, ...]  # cache_seqlens, per sequence
    n_new: int  # keys appended in place (0: none)
    causal: bool
    window: tuple[int, int]
    softcap: float
    sm_scale: float | None
    num_splits: int | None
    seed: int


@st.composite
def kvcache_cases(draw) -> KvCase:
    limits = profiles.active().limits
    dtype = draw(st.sampled_from(sharding.DTYPES))
    menu = limits.head_dims and limits.head_dims.get(dtype)  # time-boxed GPU profiles draw from a menu
    head_dim = draw(st.sampled_from(menu) if menu else sizes(limits.max_head_dim))
    batch = draw(st.integers(1, max(limits.max_batch, 3)))
    kv_heads = draw(st.integers(1, limits.max_kv_heads))
    q_heads = kv_heads * draw(st.integers(1, max(limits.max_group, 4)))
    n_queries = draw(st.one_of(st.just(1), st.integers(1, 16)))
    # The work of an example (B x Hq x Nq x keys x D) stays within the profile's budget.
    most_keys = max(1, min(limits.max_seq, limits.max_work // (batch * q_heads * n_queries * head_dim)))
    page = draw(st.one_of(st.none(), st.sampled_from(PAGE_SIZES)))
    if page is not None:
        capacity = page * draw(st.integers(1, max(1, most_keys // page)))
    else:
        capacity = draw(sizes(most_keys))
    n_new = draw(st.one_of(st.just(0), st.integers(1, min(capacity, 16))))
    room = capacity - n_new
    edges = sorted({0, 1, room - 1, room} | ({page - 1, page, page + 1} if page else set()))
    length = st.one_of(st.sampled_from([e for e in edges if 0 <= e <= room]), st.integers(0, room))
    cached = tuple(draw(st.lists(length, min_size=batch, max_size=batch)))
    window_side = st.one_of(st.just(-1), st.integers(0, capacity + 2))
    window = draw(st.one_of(st.just((-1, -1)), st.tuples(window_side, window_side)))
    return KvCase(
        batch=batch, q_heads=q_heads, kv_heads=kv_heads, n_queries=n_queries, head_dim=head_dim, dtype=dtype,
        capacity=capacity, page=page, bshd=draw(st.booleans()),
        row_map=page is None and draw(st.booleans()), cached=cached, n_new=n_new, causal=draw(st.booleans()),
        window=window, softcap=draw(st.one_of(st.just(0.0), st.floats(0.05, 100.0))),
        sm_scale=draw(st.one_of(st.none(), st.floats(1e-3, 30.0))),
        num_splits=draw(st.one_of(st.none(), st.integers(1, 9))), seed=draw(st.integers(0, 2**31 - 1)),
    )  # fmt: skip


class Built:
    """The tensors of a case: q, the caches (as the kernel sees them), their block table or row map, the
    new keys and values, cache_seqlens."""

    def __init__(self, case: KvCase):
        gen = torch.Generator().manual_seed(case.seed)

        def draw(*shape):
            return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=case.dtype)

        self.q = draw(case.batch, case.q_heads, case.n_queries, case.head_dim)
        self.block_table = self.cache_batch_idx = None
        if case.page is None:
            rows, slots = case.batch + 2, case.capacity
            if case.row_map:
                self.cache_batch_idx = (
                    torch.randperm(rows, generator=gen)[: case.batch].to(torch.int32).to(DEVICE)
                )
        else:
            pages = case.capacity // case.page
            rows, slots = case.batch * pages + 2, case.page
            order = torch.randperm(rows, generator=gen)[: case.batch * pages]
            self.block_table = order.view(case.batch, pages).to(torch.int32).to(DEVICE)
        shape = (
            (rows, slots, case.kv_heads, case.head_dim)
            if case.bshd
            else (rows, case.kv_heads, slots, case.head_dim)
        )
        self.k_cache, self.v_cache = draw(*shape), draw(*shape)
        if case.bshd:
            self.k_cache, self.v_cache = self.k_cache.transpose(1, 2), self.v_cache.transpose(1, 2)
        self.k = self.v = None
        if case.n_new:
            self.k = draw(case.batch, case.kv_heads, case.n_new, case.head_dim)
            self.v = draw(case.batch, case.kv_heads, case.n_new, case.head_dim)
        self.cache_seqlens = torch.tensor(case.cached, dtype=torch.int32, device=DEVICE)

    def slot(self, case: KvCase, b: int, position: int) -> tuple[int, int]:
        """(cache row, slot) of key `position` of sequence b."""
        if case.page is not None:
            return int(self.block_table[b, position // case.page]), position % case.page
        return (b if self.cache_batch_idx is None else int(self.cache_batch_idx[b])), position


def run(case: KvCase, built: Built, **reference):
    options = dict(
        cache_seqlens=built.cache_seqlens, k=built.k, v=built.v, block_table=built.block_table,
        cache_batch_idx=built.cache_batch_idx, causal=case.causal, sm_scale=case.sm_scale,
        window_size=case.window, softcap=case.softcap, return_lse=True,
    )  # fmt: skip
    if reference:
        return core.attention_with_kvcache_reference(
            built.q, built.k_cache, built.v_cache, **options, **reference
        )
    return core.attention_with_kvcache(
        built.q, built.k_cache, built.v_cache, num_splits=case.num_splits, **options
    )


@settings(profiles.active().settings, max_examples=EXAMPLES.get(profiles.active().name, 20))
@given(case=kvcache_cases())
def test_kvcache_within_policy_exact_appends_and_repeatable(case):
    report.count_example("kvcache")
    built = Built(case)
    before = (built.k_cache.clone(), built.v_cache.clone())
    truth = run(case, built, compute_dtype=torch.float64)
    eager = run(case, built, compute_dtype=None)
    out, lse = run(case, built)

    expected_k, expected_v = (c.clone() for c in before)
    for b, start in enumerate(case.cached):
        for t in range(case.n_new):
            row, slot = built.slot(case, b, start + t)
            expected_k[row, :, slot] = built.k[b, :, t]
            expected_v[row, :, slot] = built.v[b, :, t]
    assert torch.equal(built.k_cache, expected_k), "k_cache after the call: wrong, missing or stray writes"
    assert torch.equal(built.v_cache, expected_v), "v_cache after the call: wrong, missing or stray writes"

    failures = []
    for name, actual, true, plain in (("out", out, truth[0], eager[0]), ("lse", lse, truth[1], eager[1])):
        verdict = core.tolerance.judge(name, actual, true, plain, input_dtype=case.dtype)
        if not math.isfinite(verdict.eager_error):
            event(f"{name}: eager {case.dtype} reference overflowed, policy comparison skipped")
            continue
        if math.isfinite(verdict.ratio):
            target(verdict.ratio, label=f"kvcache {name} error / bound")
        if not verdict.ok:
            failures.append(str(verdict))
    assert not failures, "outside the tolerance policy:\n  " + "\n  ".join(failures)

    again = run(case, built)  # appends the same keys to the same slots again
    assert torch.equal(again[0], out) and torch.equal(again[1], lse), "a second run gave other bits"
