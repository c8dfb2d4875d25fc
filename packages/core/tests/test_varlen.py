"""core.attention_varlen: packed variable-length sequences (FlashAttention's flash_attn_varlen_func).

Each packed sequence must give exactly what a dense core.attention call on that sequence alone gives:
the varlen kernels run the same tiles of each sequence in the same order on the same numbers, so the
comparison is bitwise, forward and backward, for every dtype, with windows and softcaps too. Against the
float64 truth (core.attention_varlen_reference) they are within the tolerance policy. Ragged lengths
include 0 and 1, Nq != Nk both ways, GQA, and q, k, v read in place as views of one fused projection.
(torch.compile and opcheck of the varlen ops: tests/test_ops.py.)
"""

from __future__ import annotations

import pytest
import torch

import core
import core.testing
from core.tolerance import judge, largest_finite

from .conftest import DEVICE, ON_GPU
from .helpers import DTYPES

HEAD_DIM = 64 if ON_GPU else 16

# (lengths of the query sequences, of the key sequences, options)
if ON_GPU:
    CASES = [
        ([500, 0, 1, 1700, 3, 700], [800, 5, 1, 1700, 0, 1400], {"causal": True}),  # chunked prefill
        ([900, 1, 0, 300, 1], [600, 0, 7, 1000, 1], {"causal": False, "window_size": (128, 64)}),
        (
            [256, 512, 0, 333],
            [256, 700, 40, 2000],
            {"causal": True, "window_size": (100, -1), "softcap": 30.0},
        ),
    ]
else:
    CASES = [
        ([5, 0, 17, 1, 33], [5, 3, 20, 1, 40], {"causal": True}),  # chunked prefill: Nk >= Nq
        ([9, 1, 0, 30], [9, 0, 4, 17], {"causal": False, "window_size": (4, 2)}),  # Nq > Nk, empty sides
        ([16, 32, 0, 19], [16, 40, 7, 50], {"causal": True, "window_size": (6, -1), "softcap": 2.0}),
    ]


def _case_id(case):
    lens_q, _, options = case
    return "-".join(f"{k}{v}" for k, v in options.items()).replace(" ", "") + f"-B{len(lens_q)}"


def cumulative(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def packed_inputs(
    lens_q, lens_k, q_heads, kv_heads, dtype, *, seed, fused=False, requires_grad=True, head_dim=HEAD_DIM
):
    """q (total_q, Hq, D), k, v (total_k, Hkv, D) leaves, and the int32 cu_seqlens. fused: q, k and v
    are views of one (total, Hq + 2 Hkv, D) projection (self-attention, lens_q == lens_k), so neither
    their token nor their head stride is the dense one."""
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    total_q, total_k = sum(lens_q), sum(lens_k)
    if fused:
        assert lens_q == lens_k
        qkv = draw(total_q, q_heads + 2 * kv_heads, head_dim)
        q, k, v = qkv.split((q_heads, kv_heads, kv_heads), dim=1)
    else:
        q, k, v = (
            draw(total_q, q_heads, head_dim),
            draw(total_k, kv_heads, head_dim),
            draw(total_k, kv_heads, head_dim),
        )
    return [t.requires_grad_(requires_grad) for t in (q, k, v)], cumulative(lens_q), cumulative(lens_k)


def _fresh(t):
    """A new leaf on t's memory, with t's strides."""
    return t.detach().requires_grad_()


def _as_dense(rows):
    """One sequence's (N, H, D) rows as a (1, H, N, D) leaf for core.attention (a view, as a model's)."""
    return _fresh(rows.detach().transpose(0, 1).unsqueeze(0))


def run_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dout, **options):
    """(out, lse, dq, dk, dv) of core.attention_varlen, with dout on the output."""
    q, k, v = (_fresh(t) for t in (q, k, v))
    out, lse = core.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **options, return_lse=True)
    out.backward(dout)
    return out, lse, q.grad, k.grad, v.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_each_sequence_equals_its_dense_call_bitwise(case, dtype):
    _check_each_sequence_against_its_dense_call(case, dtype, HEAD_DIM)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_at_head_dim_128_each_sequence_equals_its_dense_call_bitwise(dtype):
    """At BLOCK_D 128 too (other tiles on the GPU): the sequences end mid-block and in whole blocks, and
    start at offsets no block size divides."""
    _check_each_sequence_against_its_dense_call(CASES[0], dtype, 128)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_a_sequence_whose_scores_are_all_minus_inf_equals_its_dense_call(dtype):
    """A sequence whose every score overflows to -inf though each of its rows sees keys: its rows' LSE is
    -inf, so the dK/dV kernel of that sequence reads a -inf LSE for each row it visits (which the padded
    statistics hold as +inf, so that its P is 0), and it still gives its dense call's bits. The
    lengths cross multiples of the padded statistics' 128 rows."""
    lens_q, lens_k = [70, 90, 33, 50], [80, 90, 40, 50]
    options = {"causal": True}  # Nk >= Nq: every row sees a key
    (q, k, v), cu_q, cu_k = packed_inputs(lens_q, lens_k, 4, 2, dtype, seed=17)
    # q . k = -D * huge^2: beyond float32 in every score of sequence 1 (bf16 holds 1e30, float32 1e20)
    huge = 1e30 if dtype == torch.bfloat16 else 1e20
    rows, keys = slice(70, 160), slice(80, 170)
    with torch.no_grad():
        q[rows] = huge
        k[keys] = -huge
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(18)).to(DEVICE, dtype)
    _, lse, dq, dk, _ = _check_against_dense_calls(q, k, v, cu_q, cu_k, dout, lens_q, lens_k, options)
    assert torch.all(lse[:, rows] == float("-inf"))
    assert torch.all(dq[rows] == 0) and torch.all(dk[keys] == 0)


def _check_each_sequence_against_its_dense_call(case, dtype, head_dim):
    lens_q, lens_k, options = case
    (q, k, v), cu_q, cu_k = packed_inputs(lens_q, lens_k, 4, 2, dtype, seed=len(lens_q), head_dim=head_dim)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    _check_against_dense_calls(q, k, v, cu_q, cu_k, dout, lens_q, lens_k, options)


def _check_against_dense_calls(q, k, v, cu_q, cu_k, dout, lens_q, lens_k, options):
    """(out, lse, dq, dk, dv) of core.attention_varlen, each sequence's bitwise its dense call's."""
    out, lse, dq, dk, dv = run_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), dout, **options)
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    checked = 0
    for b, (n_queries, n_keys) in enumerate(zip(lens_q, lens_k)):
        rows, keys = slice(starts_q[b], starts_q[b + 1]), slice(starts_k[b], starts_k[b + 1])
        if n_queries == 0 or n_keys == 0:  # no dense call takes an empty sequence: see the next test
            continue
        qb, kb, vb = _as_dense(q[rows]), _as_dense(k[keys]), _as_dense(v[keys])
        out_b, lse_b = core.attention(qb, kb, vb, **options, return_lse=True)
        out_b.backward(dout[rows].transpose(0, 1).unsqueeze(0))
        pairs = {
            "out": (out[rows], out_b[0].transpose(0, 1)),
            "lse": (lse[:, rows], lse_b[0]),
            "dq": (dq[rows], qb.grad[0].transpose(0, 1)),
            "dk": (dk[keys], kb.grad[0].transpose(0, 1)),
            "dv": (dv[keys], vb.grad[0].transpose(0, 1)),
        }
        for name, (packed, alone) in pairs.items():
            assert torch.equal(packed, alone), f"sequence {b} ({n_queries} x {n_keys}): {name} differs"
        checked += 1
    assert checked >= 2
    return out, lse, dq, dk, dv


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_within_policy_and_empty_sequences(dtype):
    """Against the float64 truth, judged by core.tolerance like core.attention; a sequence without keys
    outputs 0 with LSE -inf and zero dq, one without queries gets zero dk and dv."""
    lens_q, lens_k, options = CASES[1]
    (q, k, v), cu_q, cu_k = packed_inputs(lens_q, lens_k, 4, 2, dtype, seed=5)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(6)).to(DEVICE, dtype)
    max_q, max_k = max(lens_q), max(lens_k)
    kernel = run_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dout, **options)

    def reference(compute_dtype):
        leaves = [t.detach().to(compute_dtype or dtype).requires_grad_() for t in (q, k, v)]
        out, lse = core.attention_varlen_reference(
            *leaves, cu_q, cu_k, max_q, max_k, **options, return_lse=True, compute_dtype=compute_dtype
        )
        out.backward(dout.to(out.dtype))
        return out, lse, *(t.grad for t in leaves)

    truth, eager = reference(torch.float64), reference(None)
    gradient_scale = largest_finite(*truth[2:])
    failed = []
    for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
        verdict = judge(name, kernel[i], truth[i], eager[i], input_dtype=dtype,
                        family_scale=gradient_scale if i >= 2 else None)  # fmt: skip
        if not verdict.ok:
            failed.append(str(verdict))
    assert not failed, "\n".join(failed)

    out, lse, dq, dk, dv = kernel
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    for b, (n_queries, n_keys) in enumerate(zip(lens_q, lens_k)):
        rows, keys = slice(starts_q[b], starts_q[b + 1]), slice(starts_k[b], starts_k[b + 1])
        if n_keys == 0:
            assert torch.all(out[rows] == 0) and torch.all(lse[:, rows] == float("-inf"))
            assert torch.all(dq[rows] == 0)
        if n_queries == 0:
            assert torch.all(dk[keys] == 0) and torch.all(dv[keys] == 0)
    assert any(n == 0 for n in lens_k) and any(n == 0 for n in lens_q)


def test_lse_has_flash_attentions_layout():
    """(Hq, total_q) float32, natural log, as flash_attn_varlen_func returns it."""
    lens = [7, 0, 20, 1]
    (q, k, v), cu_q, cu_k = packed_inputs(lens, lens, 4, 4, torch.float16, seed=7)
    out, lse = core.attention_varlen(q, k, v, cu_q, cu_k, 20, 20, causal=True, return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (4, sum(lens)) and lse.dtype == torch.float32
    _, truth = core.attention_varlen_reference(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    torch.testing.assert_close(lse.double(), truth, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_fused_projection_views_are_read_in_place(dtype, monkeypatch):
    """q, k and v as head slices of one packed QKV projection: read through their strides, never
    copied, with exactly their contiguous copies' results."""
    lens = [13, 1, 40, 0, 22] if not ON_GPU else [300, 1, 1000, 0, 777]
    (q, k, v), cu_q, cu_k = packed_inputs(lens, lens, 4, 2, dtype, seed=9, fused=True)
    assert not q.is_contiguous() and q.stride(0) == 8 * HEAD_DIM
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(10)).to(DEVICE, dtype)
    launched_with = []
    launch = core.testing.portable.launch.BoundLaunch.__call__

    def spy(self, device, *tensors, **kwargs):
        launched_with.append(tuple((t.data_ptr(), t.stride()) for t in tensors[:3]))
        return launch(self, device, *tensors, **kwargs)

    monkeypatch.setattr(core.testing.portable.launch.BoundLaunch, "__call__", spy)
    views = run_varlen(q, k, v, cu_q, cu_k, max(lens), max(lens), dout, causal=True, window_size=(5, -1))
    assert launched_with[0] == tuple((t.data_ptr(), t.stride()) for t in (q, k, v))
    copies = [t.detach().contiguous() for t in (q, k, v)]
    contiguous = run_varlen(*copies, cu_q, cu_k, max(lens), max(lens), dout, causal=True, window_size=(5, -1))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), views, contiguous):
        assert torch.equal(a, b), f"{name} differs between the views and their contiguous copies"


def test_a_looser_max_seqlen_changes_no_bit():
    """max_seqlen only sizes the grid: a bound above the longest sequence adds programs that return."""
    lens_q, lens_k, options = CASES[0]
    (q, k, v), cu_q, cu_k = packed_inputs(lens_q, lens_k, 2, 1, torch.bfloat16, seed=11)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(12)).to(DEVICE, q.dtype)
    tight = run_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), dout, **options)
    loose = run_varlen(q, k, v, cu_q, cu_k, 3 * max(lens_q) + 5, 2 * max(lens_k) + 1, dout, **options)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), tight, loose):
        assert torch.equal(a, b), f"{name} depends on max_seqlen"


@pytest.mark.skipif(not ON_GPU, reason="synchronisation is a CUDA notion")
def test_no_host_synchronisation():
    """Nothing reads cu_seqlens on the host: forward and backward run under CUDA's sync debug mode
    set to raise on any synchronising call."""
    lens_q, lens_k, options = CASES[2]
    (q, k, v), cu_q, cu_k = packed_inputs(lens_q, lens_k, 4, 2, torch.bfloat16, seed=13)
    run_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), torch.ones_like(q), **options)  # compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, lse = core.attention_varlen(
            q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), **options, return_lse=True
        )
        (out.float().sum() + lse.sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _valid():
    """A valid call's arguments: q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k."""
    (q, k, v), cu_q, cu_k = packed_inputs([3, 5], [4, 6], 2, 2, torch.float16, seed=15, requires_grad=False)
    return [q, k, v, cu_q, cu_k, 5, 6]


def _with(**changes):
    """A valid call with some arguments replaced (a value, or a function of the valid argument)."""
    names = ("q", "k", "v", "cu_q", "cu_k", "max_q", "max_k")

    def build():
        arguments = dict(zip(names, _valid()))
        for name, change in changes.items():
            arguments[name] = change(arguments[name]) if callable(change) else change
        return [arguments[name] for name in names]

    return build


def _more_kv_heads(t):
    return t[:, :1].expand(-1, 3, -1)


BAD_INPUTS = {  # what: (arguments, options, error, message)
    "cu_seqlens_q int64": (_with(cu_q=lambda cu: cu.long()), {}, TypeError, "must be torch.int32"),
    "cu_seqlens_k float": (_with(cu_k=lambda cu: cu.float()), {}, TypeError, "must be torch.int32"),
    "cu_seqlens a list": (_with(cu_q=[0, 3, 8]), {}, TypeError, "cu_seqlens_q must be a torch.Tensor"),
    "cu_seqlens 2-D": (_with(cu_q=lambda cu: cu[None]), {}, ValueError, "must be 1-D"),
    "cu_seqlens one entry": (_with(cu_q=lambda cu: cu[:1]), {}, ValueError, "length batch \\+ 1 >= 2"),
    "cu_seqlens lengths differ": (
        _with(cu_k=lambda cu: torch.cat([cu, cu[-1:]])),
        {},
        ValueError,
        "both have batch \\+ 1 entries",
    ),
    "cu_seqlens strided": (
        _with(cu_q=lambda cu: torch.stack([cu, cu], 1)[:, 0]),
        {},
        ValueError,
        "contiguous",
    ),
    "cu_seqlens on meta": (_with(cu_q=lambda cu: cu.to("meta")), {}, ValueError, "inputs' device"),
    "max_seqlen_q 0": (_with(max_q=0), {}, ValueError, "max_seqlen_q must be >= 1"),
    "max_seqlen_k negative": (_with(max_k=-3), {}, ValueError, "max_seqlen_k must be >= 1"),
    "max_seqlen_q float": (_with(max_q=5.0), {}, TypeError, "max_seqlen_q must be a Python int"),
    "max_seqlen_k bool": (_with(max_k=True), {}, TypeError, "max_seqlen_k must be a Python int"),
    "max_seqlen_q tensor": (_with(max_q=torch.tensor(5)), {}, TypeError, "max_seqlen_q must be a Python int"),
    "q 4-D": (_with(q=lambda q: q[None]), {}, ValueError, "q must have 3 dims"),
    "k and v differ": (_with(v=lambda v: v[:-1]), {}, ValueError, "k and v must have the same shape"),
    "heads not a multiple": (_with(k=_more_kv_heads, v=_more_kv_heads), {}, ValueError, "multiple"),
    "dtypes differ": (_with(k=lambda k: k.float()), {}, TypeError, "share one dtype"),
    "bad window": (_with(), {"window_size": (-3, 0)}, ValueError, "left side must be -1"),
    "bad softcap": (_with(), {"softcap": -2.0}, ValueError, "softcap must be finite and >= 0"),
}


@pytest.mark.parametrize("what", sorted(BAD_INPUTS))
def test_bad_input_is_refused_before_any_launch(what, monkeypatch):
    def launched(*args, **kwargs):
        raise AssertionError("a kernel output was allocated or a kernel launched for invalid input")

    monkeypatch.setattr(core.testing.portable.plans, "new_buffer", launched)
    monkeypatch.setattr(core.testing.portable.launch.BoundLaunch, "__call__", launched)
    arguments, options, error, match = BAD_INPUTS[what]
    arguments = arguments()
    with pytest.raises(error, match=match):
        core.attention_varlen(*arguments, **options)
