"""core as PyTorch operators (core.ops): opcheck, torch.compile with no graph break, dynamic shapes without
a recompile per length, compiled results bitwise equal to eager, CUDA graphs.

Under the CPU interpreter the compiled functions use the `aot_eager` backend (Dynamo and AOTAutograd
trace the ops' fake kernels; the real kernels run interpreted); on a GPU they use Inductor, and
`mode="reduce-overhead"` replays a training step from CUDA graphs.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

import core
import core.testing

from .conftest import DEVICE, ON_GPU
from .helpers import make_qkv

BACKEND = "inductor" if ON_GPU else "aot_eager"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(layout="bhsd", gqa=False, n_queries=24, n_keys=40, dtype=torch.float16, seed=0):
    return make_qkv(1, 4, 2 if gqa else 4, n_queries, n_keys, 16, dtype, seed=seed, layout=layout)


def _loss_and_grads(fn, q, k, v, return_lse):
    """Run fn (core.attention or its compiled form) and backward through out (and the LSE)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    result = fn(*leaves)
    out, lse = result if return_lse else (result, None)
    weights = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out).to(out.dtype)
    loss = (out * weights).float().sum()
    if lse is not None:
        loss = loss + (lse * torch.linspace(0.5, 1.5, lse.numel(), device=lse.device).view_as(lse)).sum()
    loss.backward()
    return [out.detach(), *([lse.detach()] if lse is not None else []), *[t.grad for t in leaves]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_opcheck_forward(dtype):
    q, k, v = _inputs(dtype=dtype, gqa=True)
    torch.library.opcheck(torch.ops.core.attention_forward.default, (q, k, v, True, 0.25))


@pytest.mark.parametrize("with_dlse", [False, True])
def test_opcheck_backward(with_dlse):
    q, k, v = (t.detach() for t in _inputs(gqa=True))
    out, lse, lse_low = torch.ops.core.attention_forward(q, k, v, False, 0.25)
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse) if with_dlse else None
    torch.library.opcheck(
        torch.ops.core.attention_backward.default, (dout, q, k, v, out, lse, lse_low, dlse, False, 0.25)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_opcheck_forward_with_window_and_softcap(dtype):
    q, k, v = _inputs(dtype=dtype, gqa=True)
    torch.library.opcheck(torch.ops.core.attention_forward.default, (q, k, v, True, 0.25, 5, 0, 2.0))


def test_opcheck_backward_with_window_and_softcap():
    q, k, v = (t.detach() for t in _inputs(gqa=True))
    options = (False, 0.25, 3, 7, 1.5)
    out, lse, lse_low = torch.ops.core.attention_forward(q, k, v, *options)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    torch.library.opcheck(
        torch.ops.core.attention_backward.default, (dout, q, k, v, out, lse, lse_low, dlse, *options)
    )


def _packed(dtype=torch.float16, lens_q=(5, 0, 17, 1), lens_k=(9, 3, 17, 0), seed=0):
    """Packed q (total_q, 4, 16), k, v (total_k, 2, 16) leaves and their sequences."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), 4, 16, generator=gen).to(DEVICE, dtype).requires_grad_()
    k, v = (torch.randn(sum(lens_k), 2, 16, generator=gen).to(DEVICE, dtype).requires_grad_() for _ in "kv")

    def cumulative(lengths):
        return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)

    return q, k, v, cumulative(lens_q), cumulative(lens_k), max(lens_q), max(lens_k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_opcheck_varlen_forward(dtype):
    q, k, v, *sequences = _packed(dtype)
    torch.library.opcheck(
        torch.ops.core.attention_varlen_forward.default, (q, k, v, *sequences, True, 0.25, 4, -1, 3.0)
    )


def test_opcheck_varlen_backward():
    q, k, v, *sequences = (t.detach() if isinstance(t, torch.Tensor) else t for t in _packed())
    options = (*sequences, False, 0.25, -1, -1, 0.0)
    out, lse, lse_low = torch.ops.core.attention_varlen_forward(q, k, v, *options)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    torch.library.opcheck(
        torch.ops.core.attention_varlen_backward.default, (dout, q, k, v, out, lse, lse_low, dlse, *options)
    )


def test_opcheck_with_deterministic_off():
    q, k, v = (t.detach() for t in _inputs(gqa=True))
    options = (True, 0.25, -1, -1, 0.0, False)
    torch.library.opcheck(torch.ops.core.attention_forward.default, (q, k, v, *options))
    out, lse, lse_low = torch.ops.core.attention_forward(q, k, v, *options)
    torch.library.opcheck(
        torch.ops.core.attention_backward.default,
        (torch.randn_like(out), q, k, v, out, lse, lse_low, None, *options),
    )


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "varlen"])
def test_deterministic_reaches_the_backward_plan(packed, compiled, monkeypatch):
    """`deterministic` is what the family's backward_plan is asked for, on the eager route and through
    the traced ops alike; where that backward has no unordered sum, False changes no bit."""
    asked = []
    for name in core.testing.families():
        plan_type = core.testing.family(name).ForwardPlan
        original = plan_type.backward_plan

        def spy(self, *args, deterministic=True, _original=original):
            asked.append(deterministic)
            return _original(self, *args, deterministic=deterministic)

        monkeypatch.setattr(plan_type, "backward_plan", spy)
    if packed:
        q, k, v, *sequences = _packed()
        inputs = (q, k, v)

        def attend(q, k, v, deterministic):
            return core.attention_varlen(q, k, v, *sequences, causal=True, deterministic=deterministic)
    else:
        inputs = _inputs(gqa=True)

        def attend(q, k, v, deterministic):
            return core.attention(q, k, v, causal=True, deterministic=deterministic)

    results = {}
    for deterministic in (True, False):
        asked.clear()
        run = torch.compile(attend, backend=BACKEND, fullgraph=True) if compiled else attend
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = run(*leaves, deterministic)
        out.float().square().sum().backward()
        assert asked == [deterministic]
        results[deterministic] = [out.detach(), *(t.grad for t in leaves)]
    for a, b in zip(results[True], results[False]):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "options",
    [{"window_size": (6, -1)}, {"softcap": 2.0, "causal": False}, {"window_size": (3, 2), "softcap": 1.5}],
)
def test_fullgraph_compile_with_window_and_softcap_equals_eager_bitwise(options):
    q, k, v = _inputs(layout="bshd", gqa=True)

    def attend(q, k, v):
        return core.attention(q, k, v, **options, return_lse=True)

    eager = _loss_and_grads(attend, q, k, v, True)
    counter = torch._dynamo.testing.CompileCounterWithBackend(BACKEND)
    compiled = _loss_and_grads(torch.compile(attend, backend=counter, fullgraph=True), q, k, v, True)
    assert counter.frame_count == 1
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), eager, compiled):
        assert torch.equal(a, b), f"{name}: compiled differs from eager"
    assert torch._dynamo.explain(attend)(q, k, v).graph_break_count == 0


def test_varlen_fullgraph_compile_equals_eager_bitwise():
    q, k, v, cu_q, cu_k, max_q, max_k = _packed()

    def attend(q, k, v):
        return core.attention_varlen(
            q, k, v, cu_q, cu_k, max_q, max_k, causal=True, window_size=(5, -1), softcap=2.0, return_lse=True
        )

    def loss_and_grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out, lse = fn(*leaves)
        weights = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out).to(out.dtype)
        seen = torch.isfinite(lse)  # rows of a sequence without keys have LSE -inf
        (out * weights).float().sum().add(lse[seen].sum()).backward()
        return [out.detach(), lse.detach(), *(t.grad for t in leaves)]

    eager = loss_and_grads(attend)
    counter = torch._dynamo.testing.CompileCounterWithBackend(BACKEND)
    compiled = loss_and_grads(torch.compile(attend, backend=counter, fullgraph=True))
    assert counter.frame_count == 1
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), eager, compiled):
        assert torch.equal(a, b), f"{name}: compiled differs from eager"
    explanation = torch._dynamo.explain(attend)(q, k, v)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_varlen_dynamic_compile_once_for_every_packing():
    """New totals, batch sizes and max_seqlen reuse one graph (dynamic=True)."""
    counter = torch._dynamo.testing.CompileCounterWithBackend(BACKEND)

    def attend(q, k, v, cu_q, cu_k, max_q, max_k):
        return core.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)

    compiled = torch.compile(attend, backend=counter, dynamic=True, fullgraph=True)
    # Sizes that coincide with no other size (Dynamo's duck sizing would make them one symbol).
    packings = (
        ((5, 0, 17, 1, 6), (9, 3, 18, 0, 8)),
        ((20, 3), (21, 31)),
        ((1, 2, 3, 5, 7, 9), (9, 6, 5, 3, 1, 11)),
    )
    for seed, (lens_q, lens_k) in enumerate(packings):
        arguments = _packed(lens_q=lens_q, lens_k=lens_k, seed=seed)
        with torch.no_grad():
            assert torch.equal(compiled(*arguments), attend(*arguments))
    assert counter.frame_count == 1, "a new packing recompiled"


@pytest.mark.parametrize("return_lse", [False, True])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("layout,gqa", [("bhsd", False), ("bshd", True)])
def test_fullgraph_compile_equals_eager_bitwise(return_lse, causal, layout, gqa):
    q, k, v = _inputs(layout=layout, gqa=gqa)

    def attend(q, k, v):
        return core.attention(q, k, v, causal=causal, return_lse=return_lse)

    eager = _loss_and_grads(attend, q, k, v, return_lse)
    counter = torch._dynamo.testing.CompileCounterWithBackend(BACKEND)
    compiled = _loss_and_grads(torch.compile(attend, backend=counter, fullgraph=True), q, k, v, return_lse)
    assert counter.frame_count == 1
    for name, a, b in zip(
        ("out", "lse", "dq", "dk", "dv") if return_lse else ("out", "dq", "dk", "dv"), eager, compiled
    ):
        assert a.stride() == b.stride() or name.startswith("d"), f"{name}: layout differs"
        assert torch.equal(a, b), f"{name}: compiled differs from eager"


def test_no_graph_break_inside_a_model_block():
    """attention between projections, as a model calls it: one graph, no break."""
    q, k, v = _inputs(layout="bshd", gqa=True)
    weight = torch.randn(16, 16, device=DEVICE, dtype=q.dtype)

    def block(q, k, v):
        out = core.attention(q @ weight, k, v, causal=True)
        return (out.transpose(1, 2) @ weight).float().sum()

    explanation = torch._dynamo.explain(block)(q, k, v)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_dynamic_shapes_compile_once_for_every_length():
    counter = torch._dynamo.testing.CompileCounterWithBackend(BACKEND)

    def attend(q, k, v):
        return core.attention(q, k, v, causal=True, return_lse=True)

    compiled = torch.compile(attend, backend=counter, dynamic=True, fullgraph=True)
    for seed, (n_queries, n_keys) in enumerate(((24, 40), (33, 33), (17, 50), (48, 64))):
        q, k, v = _inputs(n_queries=n_queries, n_keys=n_keys, seed=seed)
        eager = _loss_and_grads(attend, q, k, v, True)
        got = _loss_and_grads(compiled, q, k, v, True)
        for a, b in zip(eager, got):
            assert torch.equal(a, b)
    assert counter.frame_count == 1, "a new sequence length recompiled"


def test_invalid_input_is_refused_while_tracing():
    q, k, v = _inputs()
    compiled = torch.compile(
        lambda q, k, v: core.attention(q, k, v[..., :8]), backend=BACKEND, fullgraph=True
    )
    with pytest.raises(Exception, match="k and v must have the same shape"):
        compiled(q, k, v)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_reduce_overhead_training_step_replays_from_cuda_graphs():
    """A compiled training step with mode="reduce-overhead" (CUDA graphs) gives eager's bits."""
    torch.manual_seed(0)
    x = torch.randn(2, 64, 128, device=DEVICE, dtype=torch.bfloat16)
    proj = torch.nn.Linear(128, 3 * 128, device=DEVICE, dtype=torch.bfloat16)

    def step(x):
        q, k, v = proj(x).view(2, 64, 3, 4, 32).permute(2, 0, 3, 1, 4)
        out = core.attention(q, k, v, causal=True)
        loss = out.float().square().mean()
        loss.backward()
        return loss.detach()

    eager = step(x)
    eager_grad = proj.weight.grad.clone()
    compiled = torch.compile(step, mode="reduce-overhead")
    for _ in range(3):  # warm-up, record, replay
        proj.weight.grad = None
        got = compiled(x)
    torch.cuda.synchronize()
    assert torch.equal(got, eager)
    assert torch.equal(proj.weight.grad, eager_grad)
