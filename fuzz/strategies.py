"""Composable hypothesis strategies for everything core.attention accepts.

Every axis has its own strategy (sequence lengths, head dims, GQA head counts, softmax scales, sliding
windows, softcaps, memory layouts, value distributions, upstream gradients); `problems()` and `cases()`
compose them within the active profile's Limits, and each takes the others as arguments so a property
can pin or narrow any axis. `windowed_problems()` adds a window and a softcap to a problem;
`varlen_cases()` draws ragged packed batches for core.attention_varlen, `kvcache_cases()` KV-cache calls.
Sizes are drawn with extra weight on the edges where tiled kernels go wrong: 1, the powers of two and
their neighbours, and the neighbours of every tile size the kernels use on this machine.

The only source of randomness is hypothesis: tensors are filled from a torch.Generator seeded by a drawn
integer (cases.make_values), never from global RNG, so every example replays from its repr.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from dataclasses import replace

import torch
from hypothesis import strategies as st

import core
from core.testing import portable
from fuzz import profiles, sharding
from fuzz.cases import DISTRIBUTIONS, Case, KvCase, Layout, Problem, Upstream, Values, VarlenCase

DTYPES = sharding.DTYPES
# The upstream of forward-only properties: the LSE is returned (and judged), no backward runs.
FORWARD_ONLY = st.just(Upstream(lse="unused"))
FP32_MAX = torch.finfo(torch.float32).max
LOG2E = math.log2(math.e)


@functools.cache
def kernel_block_sizes() -> tuple[int, ...]:
    """Every tile size (BLOCK_M, BLOCK_N) the kernels use here, read from core's own config table."""
    interpreted = core.is_interpreted()
    sizes = {portable.config.preprocess_block_m(interpreted)}
    for dtype in DTYPES:
        for block_d in (16, 32, 64, 128, 256):
            forward = portable.config.forward_config(block_d, dtype, interpreted)
            for config in (forward, *portable.config.backward_configs(block_d, dtype, interpreted)):
                sizes |= {config.block_m, config.block_n}
    return tuple(sorted(sizes))


def edge_sizes(upper: int, around: tuple[int, ...] = ()) -> list[int]:
    """1, 2, 3, each power of two and its neighbours, and the neighbours of 1..4 times each of
    `around`: the sizes in 1..upper where a tile is full, one short, or one over."""
    points = {1, 2, 3}
    centres = [2**e for e in range(1, upper.bit_length() + 1)] + [m * b for b in around for m in (1, 2, 3, 4)]
    for c in centres:
        points |= {c - 1, c, c + 1}
    return sorted(p for p in points if 1 <= p <= upper)


def sizes(upper: int, around: tuple[int, ...] = ()) -> st.SearchStrategy[int]:
    """An integer in 1..upper, half the time an edge size."""
    return st.one_of(st.sampled_from(edge_sizes(upper, around)), st.integers(1, upper))


def seq_lens(upper: int) -> st.SearchStrategy[int]:
    return sizes(upper, kernel_block_sizes())


def key_lens(n_queries: int, upper: int) -> st.SearchStrategy[int]:
    """Nk given Nq: equal (self-attention), one off (the causal diagonal moves by one), a tile more
    (a KV cache ahead of the queries), or anything (cross-attention, Nq = 1 decoding, Nq > Nk)."""
    tile = max(kernel_block_sizes())
    related = sorted(
        {n for n in (n_queries, n_queries - 1, n_queries + 1, n_queries + tile) if 1 <= n <= upper}
    )
    return st.one_of(st.sampled_from(related), seq_lens(upper)) if related else seq_lens(upper)


# Head dims of real models that are not powers of two, besides the power-of-two neighbours.
MODEL_HEAD_DIMS = (40, 72, 80, 96, 112, 160, 192, 200)


def head_dims(limits: profiles.Limits, dtype: torch.dtype) -> st.SearchStrategy[int]:
    if limits.head_dims:
        return st.sampled_from(limits.head_dims[dtype])
    edges = sorted(
        {*edge_sizes(limits.max_head_dim), *(d for d in MODEL_HEAD_DIMS if d <= limits.max_head_dim)}
    )
    return st.one_of(st.sampled_from(edges), st.integers(1, limits.max_head_dim))


def sm_scales(head_dim: int) -> st.SearchStrategy[float | None]:
    """None (the default 1/sqrt(D)), 1/sqrt(D) times 2^-6..2^6, peaky scales up to 1e4 that push the
    softmax towards one-hot (either sign), and the special values 0 (uniform attention), -1/sqrt(D), 1."""
    default = 1.0 / math.sqrt(head_dim)
    peaky = st.floats(8.0, 1e4)
    return st.one_of(
        st.none(),
        st.floats(-6.0, 6.0).map(lambda e: default * 2.0**e),
        peaky,
        peaky.map(lambda s: -s),
        st.sampled_from((0.0, -default, 1.0)),
    )


# Where sm_scale * log2(e), the kernels' fp32 logit scale, stops being a finite float32.
FP32_SCALE_LIMIT = FP32_MAX / LOG2E


def extreme_scales() -> st.SearchStrategy[float]:
    """Every finite float core.attention's validation accepts, weighted to the ends: beyond 1e4 up to the
    largest double, the float32 boundaries of the kernels' scale, and down to the smallest subnormal."""
    boundaries = (FP32_SCALE_LIMIT * (1 - 1e-7), FP32_SCALE_LIMIT * (1 + 1e-7), FP32_MAX, 1e30, 1e300,
                  1.7976931348623157e308, 1e-30, 1e-300, 5e-324)  # fmt: skip
    magnitude = st.one_of(
        st.sampled_from(boundaries), st.floats(1e4, 1.7976931348623157e308), st.floats(5e-324, 1e-4)
    )
    return st.tuples(magnitude, st.booleans()).map(lambda ms: -ms[0] if ms[1] else ms[0])


@st.composite
def problems(
    draw,
    limits: profiles.Limits | None = None,
    dtypes: st.SearchStrategy[torch.dtype] | None = None,
    causal: st.SearchStrategy[bool] | None = None,
    scales=sm_scales,
    min_group: int = 1,
) -> Problem:
    """A valid problem within `limits` (the active profile's by default), of the running test item's
    kernel family (fuzz/sharding.py) unless `dtypes` / `causal` say otherwise.

    Sequence lengths are drawn last, from what the work budget leaves after batch, heads and head dim,
    so that large head dims come with short sequences instead of being rejected. `scales` maps the head
    dim to a strategy of sm_scale; `min_group` > 1 asks for GQA/MQA (Hq > Hkv).
    """
    limits = limits or profiles.active().limits
    kernel = sharding.current()
    if dtypes is None:
        dtypes = st.sampled_from(DTYPES) if kernel is None else st.just(kernel[0])
    if causal is None:
        causal = st.booleans() if kernel is None else st.just(kernel[1])
    dtype = draw(dtypes)
    head_dim = draw(head_dims(limits, dtype))
    batch = draw(st.integers(1, limits.max_batch))
    kv_heads = draw(st.integers(1, limits.max_kv_heads))
    q_heads = kv_heads * draw(st.integers(min_group, max(min_group, limits.max_group)))  # 1: MHA; Hkv 1: MQA
    rows = batch * q_heads
    pair_budget = max(1, min(limits.max_scores // rows, limits.max_work // (rows * head_dim)))
    n_queries = draw(seq_lens(min(limits.max_seq, pair_budget)))
    n_keys = draw(key_lens(n_queries, max(1, min(limits.max_seq, pair_budget // n_queries))))
    is_causal = draw(st.booleans() if causal is None else causal)
    return Problem(
        batch, q_heads, kv_heads, n_queries, n_keys, head_dim, dtype, is_causal, draw(scales(head_dim))
    )


def layouts(rank: int = 4, limits: profiles.Limits | None = None) -> st.SearchStrategy[Layout]:
    """Contiguous, BSHD through a transpose, or any mix of dim order, positive slice steps, canary
    padding between rows/heads/batches, a storage offset and stride-0 (broadcast) batch or head dims.
    A profile with a layout menu (Limits.layouts) draws rank-4 layouts from it and rank 3 contiguous."""
    limits = limits or profiles.active().limits
    if limits.layouts:
        return st.sampled_from(limits.layouts if rank == 4 else (Layout(),))
    natural = [Layout(), Layout(order=(0, 2, 1, 3))] if rank == 4 else [Layout()]
    general = st.builds(
        Layout,
        order=st.permutations(range(rank)).map(tuple),
        steps=st.tuples(*[st.integers(1, MAX_STEP)] * rank),
        pads=st.tuples(*[st.integers(0, MAX_PAD)] * rank),
        offset=st.integers(0, MAX_OFFSET),
        broadcast=st.sets(st.sampled_from(BROADCASTABLE), max_size=2).map(lambda dims: tuple(sorted(dims))),
    )
    return st.one_of(st.sampled_from(natural), general)


# The ranges of a general layout: slice steps, canary padding per dim, storage offset, and the dims
# (batch, heads) that may be read with stride 0.
MAX_STEP, MAX_PAD, MAX_OFFSET, BROADCASTABLE = 3, 3, 40, (0, 1)


def seeds() -> st.SearchStrategy[int]:
    return st.integers(0, 2**32 - 1)


@st.composite
def values(draw, distributions: tuple[str, ...] = DISTRIBUTIONS) -> Values:
    distribution = draw(st.sampled_from(distributions))
    if distribution in ("huge_logits", "tiny_logits"):
        level = draw(st.floats(0.5, 2.0))
    elif distribution == "ties":  # queries as drawn, or shrunk for logits ~1 at a peaky sm_scale
        level = draw(st.sampled_from((1.0, 1e-2, 1e-3, 1e-4)))
    else:
        level = 1.0
    return Values(distribution, draw(seeds()), level)


@st.composite
def upstreams(draw) -> Upstream:
    """How the loss uses (out, lse); at least one of them takes part in it."""
    out = draw(st.sampled_from(("dense", "sum", "unused")))
    lse = draw(st.sampled_from(("dense", "sum") if out == "unused" else ("absent", "unused", "dense", "sum")))
    out_layout = draw(layouts(4)) if out == "dense" else Layout()
    lse_layout = draw(layouts(3)) if lse == "dense" else Layout()
    return Upstream(out, lse, out_layout, lse_layout)


@st.composite
def cases(
    draw,
    problem: st.SearchStrategy[Problem] | None = None,
    value: st.SearchStrategy[Values] | None = None,
    upstream: st.SearchStrategy[Upstream] | None = None,
) -> Case:
    """A full example: a problem, an independent layout for each of q, k and v, values, upstream."""
    return Case(
        problem=draw(problems() if problem is None else problem),
        layouts=draw(st.tuples(layouts(), layouts(), layouts())),
        values=draw(values() if value is None else value),
        upstream=draw(upstreams() if upstream is None else upstream),
    )


@st.composite
def permuted_cases(
    draw, case: st.SearchStrategy[Case] | None = None
) -> tuple[Case, tuple[int, ...], tuple[int, ...]]:
    """A case, an order of its batches and an order of its key/value heads."""
    drawn = draw(cases() if case is None else case)
    batch_order = tuple(draw(st.permutations(range(drawn.problem.batch))))
    kv_head_order = tuple(draw(st.permutations(range(drawn.problem.kv_heads))))
    return drawn, batch_order, kv_head_order


@st.composite
def breakages(draw, catalogue: dict) -> tuple[tuple[str, int], ...]:
    """One to three (name, form) entries of `catalogue` (fuzz/invalid_inputs.py) touching disjoint
    arguments, so each breaks the call on its own and together they test which error wins."""
    chosen, touched = [], set()
    for name in draw(st.lists(st.sampled_from(sorted(catalogue)), min_size=1, max_size=3, unique=True)):
        breakage = catalogue[name]
        if touched.isdisjoint(breakage.touches):
            chosen.append((name, draw(st.integers(0, len(breakage.forms) - 1))))
            touched |= breakage.touches
    return tuple(chosen)


def window_sizes(n_queries: int, n_keys: int) -> st.SearchStrategy[tuple[int, int]]:
    """FlashAttention's (left, right): each side unbounded (-1), 0 (a window on the diagonal), a tile edge
    size, the offset between the sequences' ends (the window then starts or stops at a sequence's first
    key), or anything up to past the whole sequence (a window that bounds nothing)."""
    reach = n_queries + n_keys + 2
    side = st.one_of(
        st.just(-1),
        st.sampled_from(edge_sizes(reach, kernel_block_sizes())),
        st.sampled_from(sorted({0, abs(n_keys - n_queries), max(n_keys, n_queries)})),
        st.integers(0, reach),
    )
    return st.tuples(side, side)


def softcaps() -> st.SearchStrategy[float]:
    """0 (off) half the time; else caps from far below the logits (every score saturates at +-cap) to
    far above them (a no-op up to rounding), and the models' 30 and 50."""
    return st.one_of(st.just(0.0), st.floats(1e-3, 1e3), st.sampled_from((0.5, 1.0, 30.0, 50.0)))


@st.composite
def windowed_problems(draw, problem: st.SearchStrategy[Problem] | None = None) -> Problem:
    """A problem (problems() by default) with a sliding window, a softcap, or both: never neither (plain
    problems are the other properties' business)."""
    drawn = draw(problems() if problem is None else problem)
    window = draw(st.one_of(st.just((-1, -1)), window_sizes(drawn.n_queries, drawn.n_keys)))
    softcap = draw(softcaps())
    if window == (-1, -1) and softcap == 0:
        softcap = draw(st.floats(1e-3, 1e3))
    return dataclasses.replace(drawn, window_size=window, softcap=softcap)


def _ragged_length(upper: int) -> st.SearchStrategy[int]:
    """A sequence length in 0..upper, with extra weight on 0, 1 and the tile edges."""
    return st.one_of(st.sampled_from((0, 1)), seq_lens(max(upper, 1)).map(lambda n: min(n, upper)))


@st.composite
def varlen_cases(draw, limits: profiles.Limits | None = None) -> VarlenCase:
    """A packed batch of 1-4 ragged sequences within `limits`, of the running test item's kernel
    family: query and key lengths each 0, 1, a tile edge or anything (Nq != Nk both ways, chunked
    prefill's Nk >= Nq, and key lengths equal to the query lengths), GQA, any head dim, a window, a
    softcap, a scale, any value distribution, and sometimes q, k, v as views of one fused projection.
    The work over all sequences stays within the profile's per-example budget."""
    limits = limits or profiles.active().limits
    kernel = sharding.current()
    dtype = draw(st.sampled_from(DTYPES)) if kernel is None else kernel[0]
    causal = draw(st.booleans()) if kernel is None else kernel[1]
    head_dim = draw(head_dims(limits, dtype))
    kv_heads = draw(st.integers(1, limits.max_kv_heads))
    q_heads = kv_heads * draw(st.integers(1, limits.max_group))
    n_sequences = draw(st.integers(1, 4))
    pairs_left = max(1, min(limits.max_scores // q_heads, limits.max_work // (q_heads * head_dim)))
    lens_q, lens_k = [], []
    self_attention = draw(st.booleans())
    for _ in range(n_sequences):
        if self_attention:
            n_queries = n_keys = draw(_ragged_length(min(limits.max_seq, math.isqrt(pairs_left))))
        else:
            n_queries = draw(_ragged_length(min(limits.max_seq, pairs_left)))
            n_keys = draw(st.one_of(
                st.just(n_queries),
                _ragged_length(min(limits.max_seq, pairs_left // max(n_queries, 1))),
            ))  # fmt: skip
        n_keys = min(n_keys, pairs_left // max(n_queries, 1))
        pairs_left -= n_queries * n_keys
        lens_q.append(n_queries)
        lens_k.append(n_keys)
    longest = max(max(lens_q), max(lens_k), 1)
    window = draw(st.one_of(st.just((-1, -1)), window_sizes(longest, longest)))
    return VarlenCase(
        lens_q=tuple(lens_q), lens_k=tuple(lens_k), q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
        dtype=dtype, causal=causal, sm_scale=draw(sm_scales(head_dim)),
        window_size=window, softcap=draw(softcaps()), values=draw(values()),
        fused=self_attention and draw(st.booleans()),
    )  # fmt: skip


PAGE_SIZES = (16, 17, 24, 32, 64, 256)


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


# --- Menus of one slice (profiles.Profile.sliced) --------------------------------------------------------

SLICE_HEAD_DIMS = {torch.float16: 4, torch.bfloat16: 4, torch.float32: 2}  # float32 compiles slowest
SLICE_GENERAL_LAYOUTS = 2  # besides contiguous and BSHD


def slice_menus(limits: profiles.Limits, slice_: profiles.Slice) -> profiles.Limits:
    """The head-dim and layout menus of one slice of a run, drawn from the run's seed: each slice compiles
    the kernels for a few head dims and stride patterns only (docs/fuzzing.md: why compiling bounds a
    GPU run), and the slices of one run take different head dims, half of them edge sizes and real
    models' dims, half any other, until every dim has been taken. A run with another seed takes others."""
    rng = random.Random(f"{slice_.seed}/{slice_.index}/layouts")
    general = tuple(
        Layout(
            order=tuple(rng.sample(range(4), 4)),
            steps=tuple(rng.randint(1, MAX_STEP) for _ in range(4)),
            pads=tuple(rng.randint(0, MAX_PAD) for _ in range(4)),
            offset=rng.randint(0, MAX_OFFSET),
            broadcast=tuple(sorted(rng.sample(BROADCASTABLE, rng.randint(0, len(BROADCASTABLE))))),
        )
        for _ in range(SLICE_GENERAL_LAYOUTS)
    )
    edges = sorted(
        {*edge_sizes(limits.max_head_dim), *(d for d in MODEL_HEAD_DIMS if d <= limits.max_head_dim)}
    )
    others = sorted(set(range(1, limits.max_head_dim + 1)) - set(edges))
    head_dims = {}
    for dtype, count in SLICE_HEAD_DIMS.items():
        taken = []
        for pool, share in ((edges, count - count // 2), (others, count // 2)):
            order = random.Random(f"{slice_.seed}/{dtype}/{len(pool)}").sample(pool, len(pool))
            start = (slice_.index - 1) * share
            taken += [order[(start + i) % len(order)] for i in range(share)]
        head_dims[dtype] = tuple(sorted(taken))
    return replace(limits, head_dims=head_dims, layouts=(Layout(), Layout(order=(0, 2, 1, 3)), *general))
