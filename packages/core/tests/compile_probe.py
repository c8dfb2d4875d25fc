"""Compile core's Triton kernels for Hopper (sm_90) on a machine without a GPU, as their plans would launch
them: run by test_compiles_for_hopper.py in a process of its own, without TRITON_INTERPRET.

The interpreter runs a kernel's Python and accepts what Triton's compiler refuses (a loop that rebinds a
name to another type, say), so a kernel can pass every CPU test and fail to build on the GPU. Here each
KV-cache call of CALLS and each attention call of ATTENTION_CALLS (forward and backward, the portable
family; the forward also with its persistent kernel, core.testing.portable_persistent) builds core's
plans on CPU tensors; every launch they make is recorded instead of run
(core.testing.portable.launch.BoundLaunch, the one way core launches), and each distinct
(kernel, signature, constexprs) is compiled with triton.compile for sm_90, specialised as Triton's
launcher would (core.testing.compile_signature). The Hopper family's Gluon forwards are compiled from
their plans' own arguments (ForwardPlan.arguments: copy-engine descriptors over CPU tensors) for each
call of HOPPER_CALLS, one program per tile or persistent (core.testing.hopper_persistent); the fused
backward's plans (core.testing.fused_backward's switch) for each of FUSED_CALLS; the Hopper backward's
(core.testing.hopper_backward's switch: its preprocess, its Gluon Delta pass and kernel, dQ's
conversion) for each of HOPPER_BACKWARD_CALLS.
Prints one JSON line per compile: kernel, constexprs, error.

    python packages/core/tests/compile_probe.py
"""

from __future__ import annotations

import json
import os
import sys

import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("compile_probe: run without TRITON_INTERPRET (the point is Triton's compiler)")

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import core.testing

try:
    from triton.experimental.gluon import GluonASTSource
except ImportError:  # Triton 3.6 keeps it in its runtime module
    from triton.experimental.gluon._runtime import GluonASTSource

HOPPER = GPUTarget("cuda", 90, 32)
POINTER_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32"}

# (dtype, head dim, paged page size or None, causal, window, softcap, num_splits, new keys, Nq, group):
# every constexpr switch of the split, merge and append kernels: dense and paged caches (pages a tile
# divides, and not), masks, softcap, one split and several, a merge that reads all its splits at once
# and one that loops (D 256 and 40 splits), float32's compensated path, appends.
CALLS = [
    (torch.bfloat16, 128, None, True, (-1, -1), 0.0, 1, 0, 1, 4),
    (torch.bfloat16, 128, None, True, (-1, -1), 0.0, 8, 1, 1, 4),
    (torch.float16, 64, 64, False, (32, 8), 30.0, 3, 4, 2, 2),
    (torch.float16, 80, 24, True, (100, -1), 0.0, 2, 0, 3, 1),
    (torch.bfloat16, 256, None, True, (-1, -1), 0.0, 40, 0, 1, 2),
    (torch.float32, 64, None, True, (-1, -1), 0.0, 5, 2, 1, 2),
    (torch.float32, 256, 32, False, (-1, -1), 50.0, 40, 0, 1, 1),
]


# (dtype, head dim, Nq, Nk, causal, window, softcap): the portable kernels' switches: whole query blocks
# and ragged ones (Q and dO masked in the dK/dV kernel), windows, softcap, GQA, float32's precision path.
# (The fused backward, behind its switch, takes CUDA tensors only: not probed.)
ATTENTION_CALLS = [
    (torch.bfloat16, 128, 256, 256, True, (-1, -1), 0.0),
    (torch.float16, 64, 200, 333, False, (-1, -1), 0.0),
    (torch.bfloat16, 128, 256, 256, True, (64, 0), 0.0),
    (torch.float16, 96, 200, 200, False, (40, 17), 30.0),
    (torch.bfloat16, 256, 130, 190, True, (-1, -1), 50.0),
    (torch.float32, 64, 100, 77, True, (20, -1), 0.0),
]


# (dtype, head dim, Nq, Nk, causal, with a dLSE, deterministic): the portable family's fused backward (off
# by default, behind core.testing.fused_backward): its Delta passes, the fused kernel both ways, dQ's
# conversion from the float32 accumulator, whole and ragged query blocks, a masked head dim.
FUSED_CALLS = [
    (torch.bfloat16, 128, 256, 256, True, False, True),
    (torch.float16, 64, 200, 333, False, True, False),
    (torch.bfloat16, 96, 130, 190, True, False, True),
]


# (dtype, head dim, causal, q heads, kv heads, persistent): the Hopper family's Gluon forwards as its
# plans launch them, one program per tile and persistent (core.testing.hopper_persistent): both dtypes,
# causal or not, GQA, one head (whose head count and group, equal to 1, become constants), and the
# persistent kernel at both head dims the kernels run at.
HOPPER_CALLS = [
    (torch.float16, 128, True, 4, 2, False),
    (torch.bfloat16, 128, False, 4, 2, False),
    (torch.bfloat16, 128, True, 1, 1, False),
    (torch.float16, 128, True, 4, 2, True),
    (torch.bfloat16, 128, False, 1, 1, True),
    (torch.bfloat16, 64, True, 4, 2, True),
    (torch.float16, 64, False, 4, 2, True),
]


# (dtype, head dim, causal, q heads, kv heads, with a dLSE, deterministic, Gluon Delta pass): the Hopper
# family's Gluon backward (behind core.testing.hopper_backward) at both head dims it compiles for, both
# modes, GQA, its own Delta pass and the portable one with its low plane.
HOPPER_BACKWARD_CALLS = [
    (torch.bfloat16, 128, True, 4, 2, False, True, True),
    (torch.float16, 128, False, 4, 4, True, False, True),
    (torch.bfloat16, 64, False, 4, 1, False, True, True),
    (torch.float16, 64, True, 2, 2, False, False, True),
    (torch.bfloat16, 128, True, 2, 1, False, True, False),
]


def hopper_backward_plans():
    """[(plan, call arguments)] of the Hopper backward for each of HOPPER_BACKWARD_CALLS, on CPU tensors."""
    BackwardPlan = core.testing.family("hopper").BackwardPlan
    plans = []
    for dtype, head_dim, causal, q_heads, kv_heads, has_dlse, deterministic, gluon in HOPPER_BACKWARD_CALLS:
        # Batch 1 with MQA: Triton makes an int argument equal to 1 a constant, which has no .to().
        batch = 1 if kv_heads == 1 else 2
        q, dout = (torch.randn(batch, q_heads, 300, head_dim).to(dtype) for _ in range(2))
        k, v = (torch.randn(batch, kv_heads, 333, head_dim).to(dtype) for _ in range(2))
        lse = torch.randn(batch, q_heads, 300)
        dlse = torch.randn_like(lse) if has_dlse else None
        plan = BackwardPlan(dout, dlse, q, k, v, causal, head_dim**-0.5, deterministic, gluon)
        plans.append((plan, (dout, dlse, q, k, v, torch.randn_like(q), lse, lse[None])))
    return plans


def hopper_launches() -> list[tuple]:
    """[(kernel, arguments by name, launch options)] of the Hopper forwards, from their plans on CPU
    tensors (the descriptors need only an aligned address)."""
    hopper = core.testing.family("hopper")
    launches = []
    for dtype, head_dim, causal, q_heads, kv_heads, persistent in HOPPER_CALLS:
        q = torch.randn(2, q_heads, 300, head_dim).to(dtype)
        k, v = (torch.randn(2, kv_heads, 333, head_dim).to(dtype) for _ in range(2))
        with core.testing.hopper_persistent(persistent):
            plan = hopper.ForwardPlan(q, k, v, causal, head_dim**-0.5)
        lse = torch.empty(plan.lse_shape)
        arguments = plan.arguments(q, k, v, torch.empty_like(q), lse, lse[None])
        arguments = {
            name: core.testing.Pointer("fp32") if isinstance(value, torch.Tensor) else value
            for name, value in arguments.items()
        }
        launches.append((plan.kernel, arguments, plan.options))
    for plan, (dout, _, q, k, v, _, lse, lse_low) in hopper_backward_plans():
        accumulator = torch.empty(plan.accumulator_shape)
        turns = torch.empty(plan.turns_shape, dtype=torch.int32)
        delta = torch.empty(plan.delta.shape)
        arguments = plan.arguments(
            q, k, v, dout, torch.empty_like(k), torch.empty_like(v), lse, lse_low, delta, accumulator, turns
        )
        pointer = core.testing.Pointer
        arguments = {
            name: pointer(POINTER_TYPES[value.dtype]) if isinstance(value, torch.Tensor) else value
            for name, value in arguments.items()
        }
        launches.append((plan.kernel, arguments, plan.options))
        if plan.gluon_delta:
            arguments = plan.delta_arguments(q, k, v, dout, lse, lse_low, delta)
            arguments = {
                name: pointer(POINTER_TYPES[value.dtype]) if isinstance(value, torch.Tensor) else value
                for name, value in arguments.items()
            }
            launches.append((plan.delta_kernel, arguments, plan.options))
    return launches


def record_launches() -> list[tuple]:
    """Run each call's plans with launching replaced by recording: [(bound launch, tensors)]."""
    recorded = []
    bound_launch = core.testing.portable.launch.BoundLaunch

    def record(self, device, *tensors, grid=None):
        recorded.append((self, tensors))

    bound_launch.__call__ = record
    # Each call with the default rule for the early merge launch (config.OVERLAP_MERGE_FROM_SPLITS: the
    # 40-split calls launch it early), and the second once more with it launched early from 2 splits on.
    default_rule = core.testing.decode.config.OVERLAP_MERGE_FROM_SPLITS
    for overlap, (dtype, head_dim, page, causal, window, softcap, splits, n_new, n_queries, group) in [
        *((False, call) for call in CALLS),
        (True, CALLS[1]),
    ]:
        core.testing.decode.config.OVERLAP_MERGE_FROM_SPLITS = 2 if overlap else default_rule
        batch, kv_heads, capacity = 2, 2, 256
        q = torch.randn(batch, kv_heads * group, n_queries, head_dim).to(dtype)
        if page is None:
            k_cache = torch.randn(batch, kv_heads, capacity, head_dim).to(dtype)
            block_table = None
        else:
            pages = capacity // page
            k_cache = torch.randn(batch * pages, kv_heads, page, head_dim).to(dtype)
            block_table = torch.arange(batch * pages, dtype=torch.int32).view(batch, pages)
        v_cache = torch.randn_like(k_cache)
        new = torch.randn(batch, kv_heads, n_new, head_dim).to(dtype) if n_new else None
        seqlens = torch.tensor([capacity - n_new - 1, 3], dtype=torch.int32)
        plan = core.testing.decode.plans.KvCachePlan(
            q, k_cache, v_cache, seqlens, new, new, block_table, None, causal=causal,
            sm_scale=head_dim**-0.5, window_size=window, softcap=softcap, num_splits=splits,
        )  # fmt: skip
        plan(q, k_cache, v_cache, seqlens, new, new, block_table, None)
    core.testing.decode.config.OVERLAP_MERGE_FROM_SPLITS = default_rule
    for dtype, head_dim, n_queries, n_keys, causal, has_dlse, deterministic in FUSED_CALLS:
        q, dout = (torch.randn(1, 4, n_queries, head_dim).to(dtype) for _ in range(2))
        k, v = (torch.randn(1, 2, n_keys, head_dim).to(dtype) for _ in range(2))
        lse = torch.randn(1, 4, n_queries)
        dlse = torch.randn_like(lse) if has_dlse else None
        plan = core.testing.portable.fused_plans.FusedBackwardPlan(
            dout, dlse, q, k, v, causal, head_dim**-0.5, deterministic=deterministic
        )
        plan(dout, dlse, q, k, v, torch.randn_like(q), lse, lse[None])
    for plan, (dout, dlse, q, k, v, out, lse, lse_low) in hopper_backward_plans():
        plan.delta(None, dout, dlse, q, k, v, out, lse, lse_low)
        plan.dq_from_accumulator(None, torch.empty(plan.accumulator_shape), torch.empty_like(q))
    for dtype, head_dim, n_queries, n_keys, causal, window, softcap in ATTENTION_CALLS:
        q = torch.randn(1, 4, n_queries, head_dim).to(dtype)
        k, v = (torch.randn(1, 2, n_keys, head_dim).to(dtype) for _ in range(2))
        options = {"causal": causal, "window_size": window, "softcap": softcap}
        with core.testing.use_family("portable"):
            out, lse, lse_low = core.testing.forward(q, k, v, **options)
            core.testing.backward(torch.randn_like(q), None, q, k, v, out, lse, lse_low, **options)
            with core.testing.portable_persistent(True):
                core.testing.forward(q, k, v, **options)
    return recorded


def arguments_of(launch, tensors) -> dict:
    """One recorded launch's arguments by name, its tensors as core.testing.Pointer."""
    kernel = launch.kernel
    values = iter(launch._in_signature_order(tensors))
    arguments = {}
    for name, param in zip(kernel.arg_names, kernel.params, strict=True):
        if param.is_constexpr:
            arguments[name] = launch.keywords[name]
        else:
            value = next(values)
            is_tensor = isinstance(value, torch.Tensor)
            arguments[name] = core.testing.Pointer(POINTER_TYPES[value.dtype]) if is_tensor else value
    return arguments


def main() -> int:
    launches = [
        (launch.kernel, arguments_of(launch, tensors),
         {k: v for k, v in launch.keywords.items() if k not in launch.kernel.arg_names})
        for launch, tensors in record_launches()
    ]  # fmt: skip
    seen = set()
    for kernel, arguments, options in launches + hopper_launches():
        signature, constants, attributes = core.testing.compile_signature(kernel, arguments)
        key = (kernel.fn.__name__, json.dumps([signature, sorted(map(str, constants.items()))]))
        if key in seen:
            continue
        seen.add(key)
        constexprs = {kernel.arg_names[i[0]]: v for i, v in constants.items()}
        error = None
        try:
            kind = GluonASTSource if kernel.is_gluon() else ASTSource
            source = kind(kernel, signature, constants, attributes)
            triton.compile(source, target=HOPPER, options=options)
        except Exception as exc:  # every failure is reported, whatever raised it
            error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
        line = {"kernel": key[0], "constexprs": constexprs, "error": error}
        print(json.dumps(line, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
