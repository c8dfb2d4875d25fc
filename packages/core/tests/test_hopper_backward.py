"""The Hopper family's Gluon backward (core.kernels.hopper.backward, behind hopper.BACKWARD): on any
machine, its switch and plan (kernel arguments, grid, buffers) and the two-part Delta it reads; on an
sm_90 GPU, its gradients against the float64 truth under the tolerance policy and against the split
backward, bit for bit from run to run in its deterministic mode, zero for rows that see no key and
finite for ragged keys of rows with very negative LSEs."""

from __future__ import annotations

import pytest
import torch

import core
import core.testing

from .conftest import ON_GPU
from .helpers import make_qkv
from .test_fused_backward import Problem, assert_all_ok

hopper = core.testing.family("hopper")
on_gpu = pytest.mark.skipif(
    "hopper" not in core.testing.families(), reason="the Hopper family does not run on this machine"
)

# (B, Hq, Hkv, Nq, Nk, D): one program; ragged query and key blocks with GQA; more queries than keys;
# whole blocks at D 64; a query group of 8 over one kv head.
SHAPES = [
    (1, 2, 2, 128, 128, 128),
    (2, 4, 2, 1000, 1537, 128),
    (1, 4, 4, 1100, 700, 128),
    (2, 4, 4, 1024, 1024, 64),
    (1, 8, 1, 333, 517, 64),
]


@pytest.fixture(autouse=True)
def family():
    """Each test builds its plans itself: one run, not one per family."""
    yield "hopper"


def hopper_backward(problem: Problem, deterministic: bool = True, gluon_delta: bool = True):
    dlse, inputs = problem.kernel_dlse(), (problem.q, problem.k, problem.v)
    plan = hopper.BackwardPlan(
        problem.dout, dlse, *inputs, problem.causal, problem.sm_scale, deterministic, gluon_delta
    )
    return plan(problem.dout, dlse, *inputs, problem.out, problem.lse, problem.lse_low)


def test_plan_arguments_and_grid():
    """Off a GPU too: the plan binds every kernel argument by name, one program per 128 keys of each
    (batch, kv head), a turn counter per query block only in the deterministic mode."""
    q = torch.randn(2, 4, 300, 128).to(torch.bfloat16)
    k, v = (torch.randn(2, 2, 333, 128).to(torch.bfloat16) for _ in range(2))
    dout = torch.randn_like(q)
    for deterministic in (True, False):
        plan = hopper.BackwardPlan(dout, None, q, k, v, True, 0.1, deterministic)
        assert plan.grid == (3 * 2 * 2,)
        assert plan.accumulator_shape == (2, 4, 320, 128)
        assert plan.turns_shape == ((2, 4, 5) if deterministic else (1,))
        assert plan.delta.shape == (2, 2, 4, 300)
        lse = torch.empty(2, 4, 300)
        arguments = plan.arguments(
            q, k, v, dout, torch.empty_like(k), torch.empty_like(v), lse, lse[None], lse, lse, lse
        )
        assert sorted(arguments) == sorted(plan.kernel.arg_names)
        assert arguments["kv_group"] == 2 and arguments["DETERMINISTIC"] == deterministic
        # The Delta pass: one program per 128 query rows of each (batch, head).
        delta_arguments = plan.delta_arguments(q, k, v, dout, lse, lse[None], lse)
        assert sorted(delta_arguments) == sorted(plan.delta_kernel.arg_names)
        assert plan.delta_grid == (3 * 4 * 2,)


def test_delta_pass_choice():
    """The Gluon pass runs where Delta comes from the keys (the default for fp16/bf16); the portable
    one on request; neither where the preprocess's dO . O is all of it (the Delta pass switched off)."""
    q = torch.randn(1, 2, 200, 64).to(torch.float16)
    k, v = (torch.randn(1, 2, 200, 64).to(torch.float16) for _ in range(2))
    dout = torch.randn_like(q)
    plan = hopper.BackwardPlan(dout, None, q, k, v, False, 0.1)
    assert plan.gluon_delta and plan.delta.delta_pass is None and plan.delta.from_keys
    plan = hopper.BackwardPlan(dout, None, q, k, v, False, 0.1, gluon_delta=False)
    assert not plan.gluon_delta and plan.delta.delta_pass is not None
    with core.testing.precise_delta(False):
        plan = hopper.BackwardPlan(dout, None, q, k, v, False, 0.1)
    assert not plan.gluon_delta and plan.delta.delta_pass is None and not plan.delta.from_keys


def test_backward_supports():
    q = torch.randn(1, 2, 256, 128).to(torch.bfloat16)
    k, v = (torch.randn(1, 1, 256, 128).to(torch.bfloat16) for _ in range(2))
    dout = torch.randn_like(q)
    with core.testing.hopper_backward(False):
        assert not hopper.backward_supports(q, k, v, dout)
    with core.testing.hopper_backward(True):
        assert hopper.backward_supports(q, k, v, dout)
        assert not hopper.backward_supports(q, k, v, dout.to(torch.float16))
        # The gradient of a broadcast (a stride 0), and a head dim that is not the unit stride.
        assert not hopper.backward_supports(q, k, v, dout[:, :1].expand(1, 2, 256, 128))
        assert not hopper.backward_supports(q, k, v, torch.randn(1, 2, 128, 256).to(torch.bfloat16).mT)
        wide = [t[..., :96] for t in (q, k, v, dout)]
        assert not hopper.backward_supports(*wide)


def test_two_part_delta_extends_the_one_part_delta():
    """The Delta pass's low plane: plane 0 is bitwise the one-part Delta the portable fused backward
    reads, plane 1 the float64 sum's rounding error to it (at most half an ulp of it; 0 for rows that
    see no key)."""
    DeltaPlan = core.testing.portable.fused_plans.DeltaPlan
    shape = (1, 2, 2, 700, 150, 64) if ON_GPU else (1, 2, 2, 45, 9, 16)
    q, k, v = make_qkv(*shape, torch.bfloat16, seed=3, requires_grad=False)
    problem = Problem(q, k, v, causal=True)
    arguments = (problem.dout, None, problem.q, problem.k, problem.v)
    stats = (problem.out, problem.lse, problem.lse_low)
    one = DeltaPlan(*arguments, True, problem.sm_scale)
    two = DeltaPlan(*arguments, True, problem.sm_scale, two_parts=True)
    index = q.device.index if q.device.type == "cuda" else None
    single = one(index, *arguments, *stats)
    both = two(index, *arguments, *stats)
    assert single.shape[0] == 1 and both.shape[0] == 2
    assert torch.equal(single[0], both[0])
    ulp = torch.finfo(torch.float32).eps * both[0].abs()
    assert torch.all(both[1].abs() <= ulp)
    n_queries, n_keys = shape[3], shape[4]
    assert torch.all(both[:, :, :, : n_queries - n_keys] == 0)
    assert torch.any(both[1] != 0)


@on_gpu
@pytest.mark.parametrize("deterministic", [True, False], ids=["ordered", "atomic"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gradients_within_policy(shape, dtype, causal, deterministic):
    q, k, v = make_qkv(*shape, dtype, seed=hash((shape, causal)) % 2**31)
    problem = Problem(q, k, v, causal=causal)
    gradients = hopper_backward(problem, deterministic)
    assert_all_ok(problem.verdicts(gradients))
    assert_all_ok(problem.verdicts(gradients, against=problem.split()))


@on_gpu
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", [(2, 4, 2, 1000, 1537, 128), (1, 8, 1, 333, 517, 64)], ids=str)
def test_the_delta_passes_agree(shape, causal):
    """The Gluon Delta pass and the portable one sum the same products: the gradients that follow
    agree to the bit or within the policy of each other (their float64 sums run in other orders)."""
    q, k, v = make_qkv(*shape, torch.bfloat16, seed=12)
    problem = Problem(q, k, v, causal=causal)
    gluon = hopper_backward(problem)
    portable = hopper_backward(problem, gluon_delta=False)
    assert_all_ok(problem.verdicts(gluon))
    assert_all_ok(problem.verdicts(gluon, against=portable))


@on_gpu
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_lse_gradient_within_policy(causal):
    q, k, v = make_qkv(1, 4, 2, 1000, 1200, 128, torch.bfloat16, seed=21)
    problem = Problem(q, k, v, causal=causal, with_dlse=True)
    gradients = hopper_backward(problem)
    assert_all_ok(problem.verdicts(gradients))
    assert_all_ok(problem.verdicts(gradients, against=problem.split()))


@on_gpu
def test_deterministic_mode_is_bitwise_reproducible():
    """Many key blocks (and programs running side by side) add to each query block: the ordered sum
    comes out the same to the bit, GQA heads included."""
    q, k, v = make_qkv(2, 8, 2, 2500, 3000, 128, torch.bfloat16, seed=8)
    for causal in (True, False):
        problem = Problem(q, k, v, causal=causal)
        first = hopper_backward(problem)
        for _ in range(3):
            for a, b in zip(first, hopper_backward(problem)):
                assert torch.equal(a, b)


@on_gpu
@pytest.mark.parametrize("deterministic", [True, False], ids=["ordered", "atomic"])
def test_rows_that_see_no_key_get_zero_gradients(deterministic):
    q, k, v = make_qkv(1, 2, 1, 700, 150, 128, torch.float16, seed=5)
    problem = Problem(q, k, v, causal=True)
    dq, dk, dv = hopper_backward(problem, deterministic)
    assert torch.all(dq[:, :, : 700 - 150] == 0)
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert_all_ok(problem.verdicts((dq, dk, dv)))


@on_gpu
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_ragged_keys_of_rows_with_very_negative_lse(causal):
    """Keys past Nk load as zeros: P = exp2(0 - LSE2) = inf there unless masked, NaN in dQ."""
    q, k, v = make_qkv(1, 2, 2, 300, 333, 64, torch.float16, seed=4)
    q, k = q.detach().abs() + 0.5, k.detach().abs() + 0.5
    problem = Problem(q, k, v, causal=causal, sm_scale=-8.0)
    assert problem.lse[:, :, -1].max() < -128
    for deterministic in (True, False):
        assert_all_ok(problem.verdicts(hopper_backward(problem, deterministic)))


@on_gpu
def test_the_switch_routes_core_attention_through_it(monkeypatch):
    """With the switch on, core.attention's backward of a call the Hopper forward runs takes the Gluon
    backward in the mode its `deterministic` argument asks, within the policy; off, it does not."""
    q, k, v = make_qkv(1, 4, 2, 1000, 1000, 128, torch.bfloat16, seed=5)
    problem = Problem(q, k, v, causal=True)
    modes = []
    run = hopper.BackwardPlan.__call__
    monkeypatch.setattr(
        hopper.BackwardPlan, "__call__", lambda *a: modes.append(a[0].deterministic) or run(*a)
    )
    for enabled, deterministic, expected in (
        (True, True, [True]),
        (True, False, [False]),
        (False, False, []),
    ):
        modes.clear()
        with core.testing.hopper_backward(enabled), core.testing.use_family("hopper"):
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            core.attention(*leaves, causal=True, deterministic=deterministic).backward(problem.dout)
        assert modes == expected, "the Hopper backward ran while off, or not while on, or in the wrong mode"
        assert_all_ok(problem.verdicts([t.grad for t in leaves]))
