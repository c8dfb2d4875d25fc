"""One fuzz example as plain data, and how it becomes tensors.

A `Case` is everything an example varies: the `Problem` (shapes, dtype, mask, window, softcap, scale), the
memory `Layout` of each input, the `Values` in them and the `Upstream` gradient that the backward pass
receives. A `VarlenCase` is a packed batch of ragged sequences for core.attention_varlen, a `KvCase` a call
of core.attention_with_kvcache.
Cases are frozen dataclasses whose repr is valid Python, so a falsifying example printed by hypothesis
can be pasted into an `@example(...)` as it is. Building tensors from a case is deterministic: the same
case gives the same bits on the same device (values come from a torch.Generator seeded by the case).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, is_dataclass

import torch

DISTRIBUTIONS = ("normal", "uniform", "outliers", "huge_logits", "tiny_logits", "ties")
NONFINITE = "nonfinite"  # opt-in: normal values with a few inf/-inf/NaN entries

FP16_MAX = torch.finfo(torch.float16).max  # 65504
FP16_TINY = torch.finfo(torch.float16).tiny  # 6.1e-5, the smallest normal float16


@dataclass(frozen=True)
class Problem:
    batch: int = 1
    q_heads: int = 1
    kv_heads: int = 1
    n_queries: int = 16
    n_keys: int = 16
    head_dim: int = 16
    dtype: torch.dtype = torch.float16
    causal: bool = True
    sm_scale: float | None = None
    window_size: tuple[int, int] = (-1, -1)  # FlashAttention's sliding window, -1: unbounded side
    softcap: float = 0.0

    @property
    def q_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.q_heads, self.n_queries, self.head_dim)

    @property
    def kv_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.kv_heads, self.n_keys, self.head_dim)

    @property
    def lse_shape(self) -> tuple[int, int, int]:
        return (self.batch, self.q_heads, self.n_queries)

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim) if self.sm_scale is None else self.sm_scale

    @property
    def empty_rows(self) -> int:
        """How many leading query rows see no key. Query i sees keys up to i + Nk - Nq + right, right the
        window's right side (0 when causal); nothing else can empty a row, since the left side stops at
        i + Nk - Nq - left < Nk. So only a prefix is empty: Nq - Nk - right rows (bottom-right causal
        mask with Nq > Nk: Nq - Nk)."""
        right = 0 if self.causal else self.window_size[1]
        if right < 0:
            return 0
        return min(self.n_queries, max(self.n_queries - self.n_keys - right, 0))


@dataclass(frozen=True)
class Layout:
    """Where a tensor's elements sit inside a larger storage whose every other element is a NaN canary.

    order: the dims from outermost to innermost in memory; () is the natural order (contiguous), and
        (0, 2, 1, 3) is the BSHD layout read through a transpose.
    steps: a positive slice step per dim (the view takes every steps[d]-th element); () means all 1.
    pads: canary elements added to each dim's extent in storage (gaps between rows, heads, ...).
    offset: canary elements before the view (its storage offset).
    broadcast: dims read with stride 0, as after expand(): every index along them is the same memory.
    """

    order: tuple[int, ...] = ()
    steps: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    offset: int = 0
    broadcast: tuple[int, ...] = ()


@dataclass(frozen=True)
class Values:
    """What the inputs hold. `level` scales the largest logit of huge_logits / tiny_logits, and the
    queries of ties (see below)."""

    distribution: str = "normal"
    seed: int = 0
    level: float = 1.0


@dataclass(frozen=True)
class Upstream:
    """The gradient handed to the backward pass, as a training loop would produce it.

    out, lse: "dense" (loss = (out * w).sum(): a random tensor, laid out by out_layout / lse_layout),
    "sum" (loss = out.sum(): autograd hands over a stride-0 expanded tensor of ones), "unused" (returned
    but not in the loss: the backward gets None). lse may also be "absent" (return_lse=False).
    """

    out: str = "dense"
    lse: str = "absent"
    out_layout: Layout = Layout()
    lse_layout: Layout = Layout()

    @property
    def return_lse(self) -> bool:
        return self.lse != "absent"


@dataclass(frozen=True)
class Case:
    problem: Problem = Problem()
    layouts: tuple[Layout, Layout, Layout] = (Layout(), Layout(), Layout())  # q, k, v
    values: Values = Values()
    upstream: Upstream = Upstream()


@dataclass(frozen=True)
class VarlenCase:
    """A packed batch for core.attention_varlen: each sequence's query and key lengths (0 allowed),
    heads, head dim, dtype, the options, the values, and whether q, k and v are head slices of one fused
    (total, Hq + 2 Hkv, D) projection (self-attention: lens_q == lens_k) instead of separate tensors."""

    lens_q: tuple[int, ...] = (16,)
    lens_k: tuple[int, ...] = (16,)
    q_heads: int = 1
    kv_heads: int = 1
    head_dim: int = 16
    dtype: torch.dtype = torch.float16
    causal: bool = True
    sm_scale: float | None = None
    window_size: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    values: Values = Values()
    fused: bool = False

    @property
    def options(self) -> dict:
        return {"causal": self.causal, "sm_scale": self.sm_scale, "window_size": self.window_size,
                "softcap": self.softcap}  # fmt: skip

    def sequence(self, b: int) -> Problem:
        """Sequence b as the dense problem core.attention would take alone."""
        return Problem(
            1, self.q_heads, self.kv_heads, self.lens_q[b], self.lens_k[b], self.head_dim, self.dtype,
            self.causal, self.sm_scale, self.window_size, self.softcap,
        )  # fmt: skip


@dataclass
class PackedInputs:
    q: torch.Tensor  # (total_q, Hq, D) leaves that require grad
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens_q: torch.Tensor  # int32 (B + 1,)
    cu_seqlens_k: torch.Tensor
    dout: torch.Tensor


def _cumulative(lengths, device) -> torch.Tensor:
    starts = [0]
    for length in lengths:
        starts.append(starts[-1] + length)
    return torch.tensor(starts, dtype=torch.int32, device=device)


def build_varlen(case: VarlenCase, device) -> PackedInputs:
    """The packed inputs of `case`: values drawn as for one dense (1, H, total, D) problem (so every
    distribution applies, huge logits scaled over all pairs), then laid out (total, H, D)."""
    total_q, total_k = sum(case.lens_q), sum(case.lens_k)
    whole = Problem(
        1, case.q_heads, case.kv_heads, max(total_q, 1), max(total_k, 1), case.head_dim, case.dtype,
        sm_scale=case.sm_scale,
    )  # fmt: skip
    q, k, v = (t[0, :, :n].transpose(0, 1) for t, n in zip(make_values(whole, case.values, device),
                                                          (total_q, total_k, total_k)))  # fmt: skip
    if case.fused:
        fused = torch.cat([q, k, v], dim=1).contiguous()
        q, k, v = fused.split((case.q_heads, case.kv_heads, case.kv_heads), dim=1)
    else:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    g = torch.Generator(device).manual_seed(case.values.seed + 1)
    dout = torch.randn((total_q, case.q_heads, case.head_dim), generator=g, device=device).to(case.dtype)
    return PackedInputs(
        *(t.requires_grad_() for t in (q, k, v)),
        _cumulative(case.lens_q, device), _cumulative(case.lens_k, device), dout,
    )  # fmt: skip


@dataclass(frozen=True)
class KvCase:
    """A call of core.attention_with_kvcache: the caches (dense or paged, BSHD storage read through its
    transposed view, a row map), each sequence's cached length, the keys appended in place, and the
    options. Its tensors come from a generator seeded by `seed` (build_kvcache)."""

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


class KvInputs:
    """The tensors of a case: q, the caches (as the kernel sees them), their block table or row map, the
    new keys and values, cache_seqlens."""

    def __init__(self, case: KvCase, device):
        gen = torch.Generator().manual_seed(case.seed)

        def draw(*shape):
            return torch.randn(*shape, generator=gen).to(device=device, dtype=case.dtype)

        self.q = draw(case.batch, case.q_heads, case.n_queries, case.head_dim)
        self.block_table = self.cache_batch_idx = None
        if case.page is None:
            rows, slots = case.batch + 2, case.capacity
            if case.row_map:
                self.cache_batch_idx = (
                    torch.randperm(rows, generator=gen)[: case.batch].to(torch.int32).to(device)
                )
        else:
            pages = case.capacity // case.page
            rows, slots = case.batch * pages + 2, case.page
            order = torch.randperm(rows, generator=gen)[: case.batch * pages]
            self.block_table = order.view(case.batch, pages).to(torch.int32).to(device)
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
        self.cache_seqlens = torch.tensor(case.cached, dtype=torch.int32, device=device)

    def slot(self, case: KvCase, b: int, position: int) -> tuple[int, int]:
        """(cache row, slot) of key `position` of sequence b."""
        if case.page is not None:
            return int(self.block_table[b, position // case.page]), position % case.page
        return (b if self.cache_batch_idx is None else int(self.cache_batch_idx[b])), position


# --- A case as plain data (the failure files, fuzz/failures.py) ---------------------------------------


def to_data(value):
    """`value` (a case or any part of one, a dtype, or tuples of these and plain scalars: every argument a
    property takes) as JSON-ready data that `from_data` turns back into an equal value. Every dataclass
    field is written, defaults too, so a file reads without the code at hand."""
    if is_dataclass(value):
        return {
            "type": type(value).__name__,
            **{f.name: to_data(getattr(value, f.name)) for f in fields(value)},
        }
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, tuple):
        return [to_data(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):  # strict JSON has no inf or NaN
        return {"float": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot write a {type(value).__name__} as case data: {value!r}")


def compact_repr(value) -> str:
    """repr without the dataclass fields that equal their defaults: a case as short as it can be pasted
    into an @example."""
    if is_dataclass(value):
        changed = [f.name for f in fields(value) if getattr(value, f.name) != f.default]
        return (
            f"{type(value).__name__}({', '.join(f'{n}={compact_repr(getattr(value, n))}' for n in changed)})"
        )
    if isinstance(value, tuple):
        inner = ", ".join(compact_repr(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    return repr(value)


_CASE_TYPES = {cls.__name__: cls for cls in (Case, Problem, Layout, Values, Upstream, VarlenCase, KvCase)}


def from_data(data):
    """The value `to_data` wrote. Every sequence of a case and of the properties' arguments is a tuple."""
    if isinstance(data, list):
        return tuple(from_data(d) for d in data)
    if isinstance(data, dict):
        if "type" in data:
            cls = _CASE_TYPES[data["type"]]
            return cls(**{name: from_data(d) for name, d in data.items() if name != "type"})
        if "dtype" in data:
            return getattr(torch, data["dtype"])
        return float(data["float"])
    return data


# --- Placing a tensor in canary-filled storage ---------------------------------------------------------


@dataclass
class Placed:
    """A view into NaN-filled storage, and the means to check that nobody wrote to that storage."""

    tensor: torch.Tensor
    storage: torch.Tensor
    snapshot: torch.Tensor  # the storage's bits right after placement

    def untouched(self) -> bool:
        return torch.equal(bits(self.storage), bits(self.snapshot))


def bits(t: torch.Tensor) -> torch.Tensor:
    """The same memory read as integers: bitwise comparisons that see NaN payloads and signed zeros."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def place(values: torch.Tensor, layout: Layout) -> Placed:
    """Copy `values` into a view with `layout`; every storage element outside the view is NaN.

    An out-of-view read then shows up as NaN in a result that should be finite, and an out-of-view
    write as a changed canary.
    """
    rank = values.dim()
    order = layout.order or tuple(range(rank))
    steps = layout.steps or (1,) * rank
    pads = layout.pads or (0,) * rank
    sizes = tuple(values.shape)
    extents = [1 if d in layout.broadcast else sizes[d] * steps[d] + pads[d] for d in range(rank)]
    dense_strides = [0] * rank
    stride = 1
    for d in reversed(order):
        dense_strides[d] = stride
        stride *= extents[d]
    strides = tuple(0 if d in layout.broadcast else dense_strides[d] * steps[d] for d in range(rank))

    storage = torch.full((layout.offset + stride,), float("nan"), dtype=values.dtype, device=values.device)
    # Broadcast dims hold one copy in memory: write index 0 along them, the view repeats it.
    stored = values
    for d in layout.broadcast:
        stored = stored.narrow(d, 0, 1)
    storage.as_strided(tuple(stored.shape), strides, layout.offset).copy_(stored)
    view = storage.as_strided(sizes, strides, layout.offset)
    return Placed(tensor=view, storage=storage, snapshot=storage.clone())


# --- Values --------------------------------------------------------------------------------------------


def _scores_max(q: torch.Tensor, k: torch.Tensor, scale: float) -> float:
    """max |q k^T * scale| over every (query, key) pair, in float64, with k shared across GQA groups."""
    k = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return (q.double() @ k.transpose(-2, -1)).abs().max().item() * abs(scale)


def _with_largest_logit(q, k, problem: Problem, target: float):
    """Scale q and k by one common factor so that the largest |logit| is `target`.

    The factor stops where q or k would reach a quarter of float16's largest value, whatever the dtype:
    the logits go to extremes, the inputs stay ones that every dtype (and a model) can hold. With a tiny
    sm_scale the target is then out of reach and the logits stay smaller.
    """
    largest = _scores_max(q, k, problem.scale)
    if largest == 0.0:  # sm_scale == 0: every logit is 0 whatever the inputs
        return q, k
    factor = math.sqrt(target / largest)
    factor = min(factor, FP16_MAX / 4 / max(q.abs().max().item(), k.abs().max().item(), 1e-30))
    return q * factor, k * factor


def _with_nonfinite_entries(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A copy of `t` with 1 to 3 entries set to inf, -inf or NaN."""
    t = t.clone()
    flat = t.view(-1)
    count = int(torch.randint(1, 4, (), generator=g, device=t.device))
    where = torch.randint(0, flat.numel(), (count,), generator=g, device=t.device)
    kinds = torch.tensor([float("inf"), float("-inf"), float("nan")], device=t.device)
    flat[where] = kinds[torch.randint(0, 3, (count,), generator=g, device=t.device)]
    return t


def make_values(problem: Problem, values: Values, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense q, k, v in the problem's dtype, drawn from `values.distribution`."""
    g = torch.Generator(device).manual_seed(values.seed)

    def normal(shape):
        return torch.randn(shape, generator=g, device=device)

    if values.distribution == "uniform":
        shapes = (problem.q_shape, problem.kv_shape, problem.kv_shape)
        q, k, v = (torch.rand(s, generator=g, device=device) * 2 - 1 for s in shapes)
    else:
        q, k, v = normal(problem.q_shape), normal(problem.kv_shape), normal(problem.kv_shape)

    if values.distribution == "outliers":
        # FlashAttention-3's stress test: N(0, 1), plus N(0, 10^2) on one entry in a thousand.
        def with_outliers(t):
            rare = torch.rand(t.shape, generator=g, device=device) < 1e-3
            return t + 10.0 * normal(t.shape) * rare

        q, k, v = with_outliers(q), with_outliers(k), with_outliers(v)
    elif values.distribution == "huge_logits":
        # The largest logit at level x float16's largest value: the eager fp16 reference overflows
        # once level > 1, the kernel (fp32 logits) must not.
        q, k = _with_largest_logit(q, k, problem, values.level * FP16_MAX)
    elif values.distribution == "tiny_logits":
        # Every logit near float16's smallest normal: the eager reference's fp16 scores lose precision
        # or flush to zero, and the softmax is almost exactly uniform.
        q, k = _with_largest_logit(q, k, problem, values.level * FP16_TINY)
    elif values.distribution == "ties":
        # Keys 2i and 2i+1 are equal, so every row's maximum is shared by two keys; every third query
        # row is zero, so all its logits tie (exactly 0).
        k[:, :, 1::2] = k[:, :, 0 : k.shape[2] - 1 : 2]
        q[:, :, ::3] = 0.0
        # A level below 1 shrinks the other queries, so that a peaky sm_scale still gives logits of
        # order 1: two tied keys then share a P that is not exactly 1/2 (the LSE rounds), where a Delta
        # off their exact midpoint once broke dq's exact cancellation (core's equal-keys tests).
        q = q * values.level
    elif values.distribution == NONFINITE:
        q, k, v = (_with_nonfinite_entries(t, g) for t in (q, k, v))
    return q.to(problem.dtype), k.to(problem.dtype), v.to(problem.dtype)


# --- A case as tensors ---------------------------------------------------------------------------------


@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor | None  # None: the output takes no part in the loss
    dlse: torch.Tensor | None  # None: the LSE takes no part in the loss (or is not returned)
    placed: list[Placed]

    def canaries_untouched(self) -> bool:
        return all(p.untouched() for p in self.placed)


def _upstream_gradient(kind: str, shape, dtype, layout: Layout, g: torch.Generator, device, placed: list):
    if kind == "sum":
        return torch.ones((), dtype=dtype, device=device).expand(shape)
    if kind == "dense":
        p = place(torch.randn(shape, generator=g, device=device).to(dtype), layout)
        placed.append(p)
        return p.tensor
    return None


def build(case: Case, device) -> Inputs:
    """The inputs of `case` on `device`: q, k, v as leaves that require grad, in their layouts."""
    problem = case.problem
    dense = make_values(problem, case.values, device)
    placed = [place(t, layout) for t, layout in zip(dense, case.layouts, strict=True)]
    q, k, v = (p.tensor.requires_grad_() for p in placed)
    g = torch.Generator(device).manual_seed(case.values.seed + 1)
    up = case.upstream
    dout = _upstream_gradient(up.out, problem.q_shape, problem.dtype, up.out_layout, g, device, placed)
    dlse = _upstream_gradient(up.lse, problem.lse_shape, torch.float32, up.lse_layout, g, device, placed)
    return Inputs(q, k, v, dout, dlse, placed)
