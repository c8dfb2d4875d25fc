"""core.attention_with_kvcache: split-KV attention against dense and paged KV caches, with in-place append.

Every result is judged against the float64 truth (core.attention_with_kvcache_reference, which gathers
each sequence's visible cache and attends to it plainly) by the one tolerance policy; the caches after an
append are compared bit for bit with the expected ones, every other slot included.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch._dynamo.testing

import core
import core.testing
from core.tolerance import judge

from .conftest import DEVICE, ON_GPU
from .helpers import DTYPES, assert_all_within_tolerance, compare_with_reference, make_qkv

BACKEND = "inductor" if ON_GPU else "aot_eager"
BIG = ON_GPU  # GPU runs take the long caches the split rule is for


@pytest.fixture(autouse=True)
def family():
    """attention_with_kvcache always runs the decode kernels (it is no choice of core.kernels.choose), so
    these tests run once instead of once per family; the core.attention tests below pick families
    themselves."""
    yield "decode"


class Cache:
    """A KV cache and its inputs: dense (B_cache, Hkv, N, D) or paged (blocks, Hkv, page, D) with a
    shuffled block table and spare blocks; `bshd` stores it as FlashAttention/vLLM do, (..., N, H, D),
    and hands the kernel the transposed view."""

    def __init__(
        self, batch, kv_heads, capacity, head_dim, dtype, *, page=None, bshd=False, spare_rows=1, seed
    ):
        self.gen = torch.Generator().manual_seed(seed)
        self.page = page
        if page is None:
            rows, slots = batch + spare_rows, capacity
            self.block_table = None
        else:
            pages_per_sequence = -(-capacity // page)
            rows, slots = batch * pages_per_sequence + 3, page
            order = torch.randperm(rows, generator=self.gen)[: batch * pages_per_sequence]
            self.block_table = order.view(batch, pages_per_sequence).to(torch.int32).to(DEVICE)
        shape = (rows, slots, kv_heads, head_dim) if bshd else (rows, kv_heads, slots, head_dim)
        self.k, self.v = (self._draw(*shape, dtype=dtype) for _ in range(2))
        if bshd:
            self.k, self.v = self.k.transpose(1, 2), self.v.transpose(1, 2)
        self.capacity = capacity if page is None else self.block_table.shape[1] * page

    def _draw(self, *shape, dtype):
        return torch.randn(*shape, generator=self.gen).to(device=DEVICE, dtype=dtype)

    def new_keys(self, batch, kv_heads, n_new, head_dim, dtype):
        return self._draw(batch, kv_heads, n_new, head_dim, dtype=dtype), self._draw(
            batch, kv_heads, n_new, head_dim, dtype=dtype
        )


def lengths(batch, capacity, n_new=0, page=16, seed=0):
    """Cached lengths that hit the edges: empty, one key, page boundaries either side, a full cache."""
    room = capacity - n_new
    edges = [0, 1, min(page, room), min(page + 1, room), max(room - 1, 0), room]
    gen = torch.Generator().manual_seed(seed)
    picked = [edges[i % len(edges)] for i in range(batch)]
    order = torch.randperm(batch, generator=gen).tolist()
    return torch.tensor([picked[i] for i in order], dtype=torch.int32, device=DEVICE)


def verdicts(q, cache, seqlens, k=None, v=None, **options):
    """(out, lse) of the kernel, and the tolerance verdicts for both against the float64 truth. The
    reference reads the cache as it was before the call (the new keys are appended in its copy)."""
    keys, values = cache.k.clone(), cache.v.clone()
    out, lse = core.attention_with_kvcache(
        q, cache.k, cache.v, cache_seqlens=seqlens, k=k, v=v, block_table=cache.block_table, return_lse=True,
        **options,
    )  # fmt: skip
    common = dict(cache_seqlens=seqlens, k=k, v=v, block_table=cache.block_table, return_lse=True, **options)
    common.pop("num_splits", None)
    truth = core.attention_with_kvcache_reference(q, keys, values, **common)
    eager = core.attention_with_kvcache_reference(q, keys, values, compute_dtype=None, **common)
    found = [
        judge("out", out, truth[0], eager[0]),
        judge("lse", lse, truth[1], eager[1], input_dtype=q.dtype),
    ]
    return out, lse, found


def queries(batch, q_heads, n_queries, head_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, q_heads, n_queries, head_dim, generator=gen).to(device=DEVICE, dtype=dtype)


# (B, Hq, Hkv, Nq, capacity, D, page): MHA, GQA, MQA; one query, a few, and speculative-decoding lengths.
CASES = [
    (4, 2, 2, 1, 40, 32, None),
    (6, 4, 2, 1, 50, 64, 16),
    (3, 6, 1, 3, 48, 40, 24),  # MQA, a page size that is no power of two, D masked
    (2, 4, 2, 16, 37, 16, 16),  # a row tile of 2 x 16 rows spans two row blocks
]
if BIG:
    CASES += [(8, 32, 8, 1, 4096, 128, None), (4, 16, 4, 4, 3000, 128, 256), (2, 8, 1, 1, 2049, 256, 64)]


def case_id(case):
    b, hq, hkv, nq, n, d, page = case
    return f"B{b}-H{hq}/{hkv}-Nq{nq}-N{n}-D{d}-{'dense' if page is None else f'page{page}'}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_within_policy_of_the_float64_truth(case, dtype):
    batch, q_heads, kv_heads, n_queries, capacity, head_dim, page = case
    cache = Cache(batch, kv_heads, capacity, head_dim, dtype, page=page, bshd=True, seed=1)
    q = queries(batch, q_heads, n_queries, head_dim, dtype, seed=2)
    seqlens = lengths(batch, cache.capacity, page=page or 16)
    _, _, found = verdicts(q, cache, seqlens, causal=True)
    assert_all_within_tolerance(found)


@pytest.mark.parametrize("page", [None, 16, 20], ids=["dense", "page16", "page20"])
@pytest.mark.parametrize("bshd", [False, True], ids=["bhsd", "bshd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_append_writes_the_new_keys_exactly_and_attends_to_them(page, bshd, dtype):
    batch, q_heads, kv_heads, n_queries, n_new, head_dim = 4, 4, 2, 3, 3, 32
    cache = Cache(batch, kv_heads, 48, head_dim, dtype, page=page, bshd=bshd, seed=3)
    k, v = cache.new_keys(batch, kv_heads, n_new, head_dim, dtype)
    seqlens = lengths(batch, cache.capacity, n_new=n_new, page=page or 16, seed=4)
    expected_k, expected_v = cache.k.clone(), cache.v.clone()
    for b, start in enumerate(seqlens.tolist()):
        for t in range(n_new):
            position = start + t
            if page is None:
                row, slot = b, position
            else:
                row, slot = int(cache.block_table[b, position // page]), position % page
            expected_k[row, :, slot] = k[b, :, t]
            expected_v[row, :, slot] = v[b, :, t]
    q = queries(batch, q_heads, n_queries, head_dim, dtype, seed=5)

    _, _, found = verdicts(q, cache, seqlens, k=k, v=v, causal=True, num_splits=2)

    assert torch.equal(cache.k, expected_k) and torch.equal(cache.v, expected_v), (
        "the caches after the append"
    )
    assert_all_within_tolerance(found)


def test_cache_batch_idx_reads_and_appends_the_chosen_rows():
    batch, kv_heads, head_dim, n_new = 3, 2, 16, 2
    cache = Cache(batch, kv_heads, 40, head_dim, torch.float16, spare_rows=2, seed=6)
    rows = torch.tensor([4, 0, 2], dtype=torch.int32, device=DEVICE)
    k, v = cache.new_keys(batch, kv_heads, n_new, head_dim, torch.float16)
    seqlens = torch.tensor([5, 0, 38], dtype=torch.int32, device=DEVICE)
    q = queries(batch, 4, 1, head_dim, torch.float16, seed=7)
    before_k, before_v = cache.k.clone(), cache.v.clone()

    out = core.attention_with_kvcache(
        q, cache.k, cache.v, cache_seqlens=seqlens, k=k, v=v, cache_batch_idx=rows
    )

    expected_k, expected_v = before_k.clone(), before_v.clone()
    for b, (row, start) in enumerate(zip(rows.tolist(), seqlens.tolist())):
        expected_k[row, :, start : start + n_new] = k[b]
        expected_v[row, :, start : start + n_new] = v[b]
    assert torch.equal(cache.k, expected_k) and torch.equal(cache.v, expected_v)
    truth = core.attention_with_kvcache_reference(
        q, before_k, before_v, cache_seqlens=seqlens, k=k, v=v, cache_batch_idx=rows
    )
    eager = core.attention_with_kvcache_reference(
        q, before_k, before_v, cache_seqlens=seqlens, k=k, v=v, cache_batch_idx=rows, compute_dtype=None
    )
    assert_all_within_tolerance([judge("out", out, truth, eager)])


@pytest.mark.parametrize(
    "causal,window,softcap",
    [(True, (6, -1), 0.0), (False, (5, 3), 0.0), (False, (-1, 0), 0.0), (True, (-1, -1), 3.0),
     (False, (9, 2), 0.5), (True, (0, 0), 30.0)],
)  # fmt: skip
@pytest.mark.parametrize("n_queries", [1, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_windows_and_softcap_within_policy(causal, window, softcap, n_queries, dtype):
    cache = Cache(3, 2, 45, 32, dtype, page=16, seed=8)
    q = queries(3, 4, n_queries, 32, dtype, seed=9)
    seqlens = lengths(3, cache.capacity, seed=10)
    _, _, found = verdicts(
        q, cache, seqlens, causal=causal, window_size=window, softcap=softcap, num_splits=3
    )
    assert_all_within_tolerance(found)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_split_count_within_policy_and_bitwise_repeatable(dtype):
    batch, capacity = 2, 150 if not BIG else 8192
    cache = Cache(batch, 2, capacity, 64, dtype, seed=11)
    q = queries(batch, 8, 2, 64, dtype, seed=12)
    seqlens = torch.tensor([capacity, capacity // 3], dtype=torch.int32, device=DEVICE)
    for splits in (1, 2, 5, None):  # None: the split rule's choice
        out, lse, found = verdicts(q, cache, seqlens, num_splits=splits)
        assert_all_within_tolerance(found)
        again = core.attention_with_kvcache(
            q, cache.k, cache.v, cache_seqlens=seqlens, num_splits=splits, return_lse=True
        )
        assert torch.equal(out, again[0]) and torch.equal(lse, again[1]), f"num_splits={splits} repeated"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_merge_of_more_splits_than_it_reads_at_once(dtype):
    """Head dim 256: the merge reads 16 splits at a time, so 37 splits take three reads, the last one
    partly masked; with fewer key tiles than splits, some splits see no key at all."""
    config = core.testing.decode.config
    splits = 37
    assert config.merge_block_s(splits, 256) < splits
    cache = Cache(1, 1, 300, 256, dtype, seed=21)
    q = queries(1, 2, 1, 256, dtype, seed=22)
    seqlens = torch.tensor([300], dtype=torch.int32, device=DEVICE)
    _, _, found = verdicts(q, cache, seqlens, num_splits=splits)
    assert_all_within_tolerance(found)


@pytest.mark.skipif(
    not ON_GPU or torch.cuda.get_device_capability() < (9, 0),
    reason="programmatic dependent launch: compiled kernels on sm_90 and later (inert elsewhere)",
)
@pytest.mark.parametrize("page", [None, 16], ids=["dense", "page16"])
def test_the_early_merge_launch_gives_the_same_bits(monkeypatch, page):
    """config.OVERLAP_MERGE_FROM_SPLITS launches the merge before the split kernel ends; its wait must
    make it read the finished partials: the same output and LSE, bit for bit, as the merge launched
    after."""
    config = core.testing.decode.config
    cache = Cache(2, 8, 8192, 128, torch.bfloat16, page=page, seed=31)
    q = queries(2, 32, 1, 128, torch.bfloat16, seed=32)
    seqlens = torch.tensor([8192, 3001], dtype=torch.int32, device=DEVICE)
    results = {}
    for overlap in (False, True):
        monkeypatch.setattr(config, "OVERLAP_MERGE_FROM_SPLITS", 2 if overlap else None)
        core.testing.clear_plans()
        results[overlap] = [
            core.attention_with_kvcache(
                q, cache.k, cache.v, cache_seqlens=seqlens, block_table=cache.block_table, num_splits=splits,
                return_lse=True,
            )
            for splits in (2, 7, None)
        ]  # fmt: skip
    core.testing.clear_plans()
    for (out, lse), (early_out, early_lse) in zip(results[False], results[True], strict=True):
        assert torch.equal(out, early_out) and torch.equal(lse, early_lse)


def test_the_merge_is_launched_early_from_the_rules_split_count_on_hopper(monkeypatch):
    """config.overlaps_merge: early from OVERLAP_MERGE_FROM_SPLITS splits on (never below 2: one split has
    no merge), for compiled kernels on sm_90 (a CPU tensor stands for the Hopper target, as in the
    compile probe), never interpreted, never with the rule off."""
    config = core.testing.decode.config
    cpu = torch.device("cpu")
    monkeypatch.setattr(config, "OVERLAP_MERGE_FROM_SPLITS", 16)
    early = [config.overlaps_merge(splits, cpu, False) for splits in (1, 2, 8, 15, 16, 32, 128)]
    assert early == [False] * 4 + [True] * 3
    assert not config.overlaps_merge(32, cpu, True)
    monkeypatch.setattr(config, "OVERLAP_MERGE_FROM_SPLITS", 1)
    assert [config.overlaps_merge(s, cpu, False) for s in (1, 2)] == [False, True]
    monkeypatch.setattr(config, "OVERLAP_MERGE_FROM_SPLITS", None)
    assert not config.overlaps_merge(128, cpu, False)


def test_the_wave_split_rule_fills_the_machine_from_shapes_alone(monkeypatch):
    """FlashAttention-2's wave rule over two programs per SM, on an H100's 132 SMs (config.BALANCE_TILES
    off; the balanced rule below starts from the same count)."""
    monkeypatch.setattr(core.testing.decode.config, "BALANCE_TILES", False)
    split_count = core.testing.decode.config.split_count
    sms = 132
    assert split_count(8 * 8, 32768 // 64, sms) == 4  # B 8 x 8 KV heads: one wave of 256 programs
    assert split_count(1 * 8, 32768 // 64, sms) == 29  # one sequence: 232 programs of ~1k keys
    assert split_count(32 * 8, 32768 // 64, sms) == 1  # already a wave without splitting
    assert split_count(8, 2, sms) == 1  # too few key tiles to split
    most = core.testing.decode.config.MAX_SPLITS
    assert 0.85 * most <= split_count(1, 10**6, sms) <= most  # a capped count: within 85% of the best


def test_the_balanced_split_rule_gives_every_split_of_one_wave_as_many_tiles(monkeypatch):
    """The balanced rule (config.BALANCE_TILES, the default): one wave of programs at most, no split
    left empty or short by more than the rounding, and the fewest splits for that many tiles each."""
    config = core.testing.decode.config
    monkeypatch.setattr(config, "BALANCE_TILES", True)
    sms = 132
    slots = config.PROGRAMS_PER_SM * sms
    assert config.split_count(1 * 8, 32768 // 64, sms) == 32  # 256 programs of 16 tiles (waves: 29 of 18)
    assert config.split_count(1 * 32, 8192 // 64, sms) == 8  # 16 tiles each (the wave rule: 7 of 19)
    assert config.split_count(8 * 8, 32768 // 64, sms) == 4
    assert config.split_count(32 * 8, 32768 // 64, sms) == 1
    for programs in (1, 2, 3, 7, 8, 31, 32, 33, 100, 211):
        for tiles in (0, 1, 3, 4, 5, 63, 64, 100, 127, 512, 4097, 10**6):
            splits = config.split_count(programs, tiles, sms)
            per_split = -(-tiles // splits)
            assert 1 <= splits <= config.MAX_SPLITS
            if splits > 1:
                assert programs * splits <= slots, (programs, tiles, splits)
                assert per_split * (splits - 1) < tiles, (programs, tiles, splits)  # the last split has work
                assert -(-tiles // (splits - 1)) > per_split, (programs, tiles, splits)  # one fewer: longer


def test_an_int_cache_seqlens_equals_the_tensor_form():
    cache = Cache(2, 2, 40, 32, torch.float16, seed=13)
    q = queries(2, 4, 2, 32, torch.float16, seed=14)
    from_int = core.attention_with_kvcache(q, cache.k, cache.v, cache_seqlens=33, num_splits=2)
    from_tensor = core.attention_with_kvcache(
        q,
        cache.k,
        cache.v,
        cache_seqlens=torch.full((2,), 33, dtype=torch.int32, device=DEVICE),
        num_splits=2,
    )
    assert torch.equal(from_int, from_tensor)


def test_rows_that_see_no_key_give_zero_and_minus_inf():
    cache = Cache(2, 1, 32, 16, torch.float16, seed=15)
    q = queries(2, 2, 4, 16, torch.float16, seed=16)
    seqlens = torch.tensor([0, 2], dtype=torch.int32, device=DEVICE)  # empty; fewer keys than queries
    out, lse = core.attention_with_kvcache(q, cache.k, cache.v, cache_seqlens=seqlens, return_lse=True)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()
    # Causal, 2 keys and 4 queries: the first two queries see nothing, the last two one and two keys.
    assert torch.equal(out[1, :, :2], torch.zeros_like(out[1, :, :2])) and torch.isneginf(lse[1, :, :2]).all()
    assert torch.isfinite(lse[1, :, 2:]).all()


def test_core_attention_routes_decode_shapes_to_the_decode_family():
    """A decode-shaped core.attention call takes the split-KV kernels, forward and (the portable
    family's) backward within policy; a call of another shape keeps the portable kernels."""
    n_keys = 4096 if BIG else 100
    q, k, v = make_qkv(2, 8, 2, 2, n_keys, 64, torch.bfloat16, seed=17)
    assert core.testing.family("decode").supports(q, k, v, True)
    core.testing.clear_plans()
    assert_all_within_tolerance(compare_with_reference(q, k, v, causal=True))
    assert type(core.testing.cached_plans()[0]) is core.testing.decode.plans.ForwardPlan
    long_queries = make_qkv(1, 8, 2, 20, n_keys, 64, torch.bfloat16, seed=18)
    assert not core.testing.family("decode").supports(*long_queries, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_and_portable_forwards_agree_within_policy(dtype):
    q, k, v = make_qkv(1, 4, 1, 3, 4096 if BIG else 70, 32, dtype, seed=19, requires_grad=False)
    for name in ("decode", "portable"):
        with core.testing.use_family(name):
            assert_all_within_tolerance(compare_with_reference(q, k, v, causal=True, grads=False))


def test_gradients_are_refused_clearly():
    cache = Cache(1, 1, 32, 16, torch.float32, seed=20)
    q = queries(1, 1, 1, 16, torch.float32, seed=21).requires_grad_()
    out = core.attention_with_kvcache(q, cache.k, cache.v, cache_seqlens=10)
    with pytest.raises(RuntimeError, match="forward-only"):
        out.sum().backward()


# ------------------------------------------------------------------------------------------ bad input


def _call(overrides):
    """A valid paged call with new keys, with overrides(call) applied."""
    cache = Cache(2, 2, 32, 16, torch.float16, page=16, seed=22)
    q = queries(2, 4, 1, 16, torch.float16, seed=23)
    k, v = cache.new_keys(2, 2, 1, 16, torch.float16)
    seqlens = torch.tensor([3, 31], dtype=torch.int32, device=DEVICE)
    call = dict(q=q, k_cache=cache.k, v_cache=cache.v, cache_seqlens=seqlens, k=k, v=v,
                block_table=cache.block_table)  # fmt: skip
    call.update(overrides(call))
    return call


def _dense(call):
    return dict(
        k_cache=call["k_cache"][:2].contiguous(), v_cache=call["v_cache"][:2].contiguous(), block_table=None
    )


BAD = [
    (lambda c: {"q": c["q"].double()}, TypeError, "q has dtype torch.float64"),
    (lambda c: {"k_cache": c["k_cache"].float()}, TypeError, "must share one dtype"),
    (lambda c: {"q": c["q"][0]}, ValueError, "q must have 4 dims"),
    (lambda c: {"q": c["q"].tolist()}, TypeError, r"q must be a torch\.Tensor"),
    (lambda c: {"v_cache": c["v_cache"][..., :8]}, ValueError, "same shape"),
    (lambda c: {"q": c["q"][..., :8]}, ValueError, "head dim differs"),
    (lambda c: {"q": torch.cat([c["q"], c["q"][:, :1]], 1)}, ValueError, "not a multiple"),
    (lambda c: {"block_table": c["block_table"].long()}, TypeError, "block_table must be an int32"),
    (lambda c: {"block_table": c["block_table"][:1]}, ValueError, r"block_table must have shape \(batch"),
    (lambda c: {"k_cache": c["k_cache"][:, :, :8], "v_cache": c["v_cache"][:, :, :8]}, ValueError,
     "page size .* at least 16"),
    (lambda c: {"cache_seqlens": c["cache_seqlens"].long()}, TypeError, "cache_seqlens must be an int32"),
    (lambda c: {"cache_seqlens": c["cache_seqlens"][:1]}, ValueError, r"cache_seqlens must have shape"),
    (lambda c: {"cache_seqlens": 3.0}, TypeError, "cache_seqlens must be an int"),
    (lambda c: {"cache_seqlens": 32}, ValueError, "does not fit"),
    (lambda c: {"cache_seqlens": -1}, ValueError, "does not fit"),
    (lambda c: {"k": None}, ValueError, "k and v .* together"),
    (lambda c: {"k": c["k"][:, :1], "v": c["v"][:, :1]}, ValueError, r"k and v must have shape \(batch"),
    (lambda c: {"k": torch.cat([c["k"]] * 33, 2), "v": torch.cat([c["v"]] * 33, 2)}, ValueError,
     "holds only 32"),
    (lambda c: {"k": c["k"].float(), "v": c["v"].float()}, TypeError, "must share one dtype"),
    (lambda c: {**_dense(c), "k_cache": _dense(c)["k_cache"][:1], "v_cache": _dense(c)["v_cache"][:1]},
     ValueError, "holds 1 sequences"),
    (lambda c: {**_dense(c), "cache_batch_idx": torch.zeros(2, dtype=torch.int64, device=DEVICE)}, TypeError,
     "cache_batch_idx must be an int32"),
    (lambda c: {"cache_batch_idx": torch.zeros(2, dtype=torch.int32, device=DEVICE)}, ValueError,
     "paged cache takes block_table alone"),
    (lambda c: {"window_size": (-2, 0)}, ValueError, "window_size's left"),
    (lambda c: {"window_size": 4}, TypeError, "window_size must be a"),
    (lambda c: {"softcap": -1.0}, ValueError, "softcap must be finite and >= 0"),
    (lambda c: {"softcap": float("inf")}, ValueError, "softcap must be finite"),
    (lambda c: {"num_splits": 129}, ValueError, "num_splits must be between"),
    (lambda c: {"num_splits": 2.0}, TypeError, "num_splits must be an int"),
    (lambda c: {"causal": 1}, TypeError, "causal must be a bool"),
    (lambda c: {"sm_scale": float("nan")}, ValueError, "sm_scale must be finite"),
]  # fmt: skip


@pytest.mark.parametrize("bad,error,message", BAD, ids=[re.sub(r"\W+", "-", m)[:40] for _, _, m in BAD])
def test_bad_input_is_refused_before_launch(bad, error, message):
    call = _call(bad)
    cache_before = call["k_cache"].clone()
    with core.testing.launches_forbidden(), pytest.raises(error, match=message):
        core.attention_with_kvcache(**call)
    assert torch.equal(call["k_cache"], cache_before)


# ------------------------------------------------------------------------------------ PyTorch integration


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_fullgraph_compile_equals_eager_bitwise_and_mutates_the_cache(paged, fresh_dynamo):
    def step(q, k_cache, v_cache, seqlens, k, v, table):
        return core.attention_with_kvcache(
            q,
            k_cache,
            v_cache,
            cache_seqlens=seqlens,
            k=k,
            v=v,
            block_table=table,
            return_lse=True,
            num_splits=2,
        )

    results = []
    for compiled in (False, True):
        cache = Cache(2, 2, 40, 16, torch.bfloat16, page=16 if paged else None, bshd=True, seed=24)
        k, v = cache.new_keys(2, 2, 2, 16, torch.bfloat16)
        q = queries(2, 4, 2, 16, torch.bfloat16, seed=25)
        seqlens = torch.tensor([7, 30], dtype=torch.int32, device=DEVICE)
        counter = torch._dynamo.testing.CompileCounterWithBackend(BACKEND)
        run = torch.compile(step, backend=counter, fullgraph=True) if compiled else step
        results.append((*run(q, cache.k, cache.v, seqlens, k, v, cache.block_table), cache.k, cache.v))
        if compiled:
            assert counter.frame_count == 1
    for name, eager, compiled in zip(("out", "lse", "k_cache", "v_cache"), *results):
        assert torch.equal(eager, compiled), f"{name}: compiled differs from eager"


def test_opcheck_both_ops():
    cache = Cache(2, 2, 32, 16, torch.float16, page=16, seed=26)
    q = queries(2, 4, 2, 16, torch.float16, seed=27)
    k, v = cache.new_keys(2, 2, 2, 16, torch.float16)
    seqlens = torch.tensor([3, 20], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(
        torch.ops.core.kvcache_append.default, (cache.k, cache.v, k, v, seqlens, 0, cache.block_table, None)
    )
    torch.library.opcheck(
        torch.ops.core.attention_with_kvcache.default,
        (q, cache.k, cache.v, seqlens, 0, 2, cache.block_table, None, True, 0.25, 5, -1, 0.0, 2),
    )


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_a_decode_step_replays_from_a_cuda_graph():
    """Capture one append + attention step; replay it with new inputs and lengths: eager's bits."""
    batch, kv_heads, head_dim = 4, 8, 128
    cache = Cache(batch, kv_heads, 4096, head_dim, torch.bfloat16, page=256, bshd=True, seed=28)
    q = queries(batch, 32, 1, head_dim, torch.bfloat16, seed=29)
    k, v = cache.new_keys(batch, kv_heads, 1, head_dim, torch.bfloat16)
    seqlens = torch.tensor([100, 4000, 0, 2048], dtype=torch.int32, device=DEVICE)

    def step():
        return core.attention_with_kvcache(q, cache.k, cache.v, cache_seqlens=seqlens, k=k, v=v,
                                           block_table=cache.block_table)  # fmt: skip

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile before capturing
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for tensor in (q, k, v):
        tensor.copy_(torch.randn_like(tensor))
    seqlens.copy_(torch.tensor([4095, 7, 300, 1], dtype=torch.int32))
    graph.replay()
    keys_after_replay = cache.k.clone()
    torch.cuda.synchronize()
    assert torch.equal(captured, step())
    assert torch.equal(cache.k, keys_after_replay)  # the eager step rewrote the same slots with the same keys
