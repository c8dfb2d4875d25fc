"""The Hopper forwards (core.kernels.hopper: one program per tile, and persistent) in one GPU run:
correctness against the float64 reference and SDPA, compatibility of their LSE with core's backward, the
persistent kernel's results bitwise the one-tile kernel's, then their speed next to core's portable
forward and SDPA's FLASH and CUDNN backends. A short table is printed last.

    PYTHONPATH=packages/core/src python packages/core/benchmarks/hopper_fwd_check.py [--quick] [--out DIR]

Without a GPU, --report compiles both kernels for sm_90a on the CPU (triton 3.6, whose ptxas ships in its
wheel) and prints what the compiler made of them: shared memory, registers per partition (setmaxnreg),
spills, the wgmma instructions and ptxas's warnings.

    PYTHONPATH=packages/core/src $TRITON36_PYTHON packages/core/benchmarks/hopper_fwd_check.py --report

Correctness, for each kernel: every output buffer is NaN-filled before the kernel runs
(core.testing.poisoned_outputs), so a row the kernel never writes shows as NaN. out and the natural LSE are
judged by core.tolerance against core.attention_reference in float64; the base-2 LSE's low part must
follow the portable forward's rules (0 where |LSE2| < 256 or the row sees no key, at most half an ulp of
LSE2 elsewhere, and LSE2 + low closer to the truth than LSE2 alone at large logits); the backward
(core.testing.backward, the portable one) run on the Hopper forward's out, LSE and low part must give
gradients within tolerance. Then the persistent kernel's out, LSE and low part must equal the one-tile
kernel's bit for bit, on every correctness case and every timed shape. The cases take in ragged and
rectangular lengths (causal with fewer and with more queries than keys), GQA, BSHD views, rows that see
no key, and tile counts below, at and around the GPU's SM count, and many times it. A kernel that hangs
is reported by a watchdog, which ends the process.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import core.testing
from core import attention, attention_reference
from core.tolerance import judge, largest_finite

hopper = core.testing.family("hopper")
ALL_HEAD_DIMS = (64, 128)  # the kernels run at both; the family takes only those where they win
KERNELS = {False: "hopper", True: "hopper-persistent"}  # by hopper.PERSISTENT


def hopper_plan(q, k, v, causal, sm_scale, persistent: bool):
    """The Hopper family's forward plan with one kernel or the other (its call gives out, lse2, lse_low)."""
    with core.testing.hopper_persistent(persistent):
        return hopper.ForwardPlan(q, k, v, causal, sm_scale)


def tile_count(case: dict) -> int:
    """The Hopper kernels' tiles of 2 x BLOCK_M query rows for a case."""
    rows = 2 * hopper.tile_config(case["d"]).block_m
    return -(-case["nq"] // rows) * case["hq"] * case["b"]


TOKENS, WIDTH = 16384, 2048
SEQ_LENS = (1024, 4096, 16384)
HANG_SECONDS = 60
LN2 = math.log(2.0)


# ----------------------------------------------------------------------------- compile report (CPU)


def _compile_for_sm90(head_dim: int, causal: bool, dtype: torch.dtype, persistent: bool = False):
    """A kernel (one program per tile, or persistent) compiled for sm_90a as the family's plans launch
    it, without a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    kernel = hopper.kernel(persistent)

    config = hopper.tile_config(head_dim)
    element = gl.float16 if dtype == torch.float16 else gl.bfloat16
    stand_in = torch.empty(1, 1, 1024, head_dim, dtype=dtype)

    def descriptor(rows):
        layout = gl.NVMMASharedLayout.get_default_for([1, 1, rows, head_dim], element)
        return mangle_type(
            TensorDescriptor(
                stand_in, list(stand_in.shape), list(stand_in.stride()), [1, 1, rows, head_dim], layout
            )
        )

    types = {
        "q_desc": descriptor(config.block_m), "k_desc": descriptor(config.block_n),
        "v_desc": descriptor(config.block_n), "o_desc": descriptor(config.block_m),
        "Lse": "*fp32", "LseLow": "*fp32", "n_batch_heads": "i32",
        "n_q_heads": "i32", "kv_group": "i32", "n_queries": "i32", "n_keys": "i32", "qk_scale": "fp32",
    }  # fmt: skip
    signature = {name: types[name] for name in kernel.arg_names if name in types}
    constants = {
        "HEAD_DIM": head_dim, "CAUSAL": causal, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n,
        "STAGES": config.stages, "CONSUMER_REGISTERS": config.consumer_registers,
        "PRODUCER_REGISTERS": config.producer_registers,
    }  # fmt: skip
    names = kernel.arg_names
    constexprs = {}
    for name, value in constants.items():
        signature[name] = "constexpr"
        constexprs[(names.index(name),)] = value
    aligned = {(names.index(name),): [["tt.divisibility", 16]] for name in ("Lse", "LseLow")}
    source = GluonASTSource(kernel, signature, constexprs, aligned)
    options = {"num_warps": 4, "maxnreg": config.max_registers}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def report() -> None:
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    print(f"triton {triton.__version__}, sm_90a")
    for persistent, dtype, head_dim, causal in itertools.product(
        (False, True), (torch.float16, torch.bfloat16), (64, 128), (False, True)
    ):
        compiled = _compile_for_sm90(head_dim, causal, dtype, persistent)
        ptx = compiled.asm["ptx"]
        with tempfile.TemporaryDirectory() as scratch:
            source = os.path.join(scratch, "k.ptx")
            Path(source).write_text(ptx)
            log = subprocess.run(
                [ptxas, "-arch=sm_90a", "-v", source, "-o", os.path.join(scratch, "k.cubin")],
                capture_output=True, text=True,
            ).stderr  # fmt: skip
        used = re.search(r"Used (\d+) registers", log)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        wgmma = [line for line in ptx.splitlines() if "wgmma.mma_async" in line]
        facts = {
            "shared bytes": compiled.metadata.shared,
            "launch registers": used.group(1) if used else "?",
            # setmaxnreg: the partitions' budgets, and the values warps pass through on the way.
            "setmaxnreg": sorted(
                {int(n) for n in re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", ptx)}
            ),
            "spill stores/loads": "/".join(spills.groups()) if spills else "?",
            "wgmma shapes": sorted({re.search(r"aligned\.(\w+)\.", line).group(1) for line in wgmma}),
            "wgmma": len(wgmma),
            # P V reads P from registers: its A operand is a register list, not a descriptor.
            "with A in registers": sum("}, {" in line for line in wgmma),
            "ptxas warnings": [line.split(": ", 1)[-1] for line in log.splitlines() if "warning" in line],
        }
        print(
            f"{KERNELS[persistent]} {str(dtype)[6:]} D={head_dim} causal={causal}: "
            + ", ".join(f"{k} {v}" for k, v in facts.items())
        )


# ----------------------------------------------------------------------------- correctness (GPU)


poisoned_outputs = core.testing.poisoned_outputs


class Watchdog:
    """Ends the process if a step takes longer than HANG_SECONDS: a deadlocked kernel cannot be
    interrupted from Python, and the run's later sections would never print."""

    def __init__(self):
        self.step, self.started = "start", time.monotonic()
        threading.Thread(target=self._watch, daemon=True).start()

    def enter(self, step: str):
        self.step, self.started = step, time.monotonic()

    def _watch(self):
        while True:
            time.sleep(1)
            if time.monotonic() - self.started > HANG_SECONDS:
                print(f"HANG: no progress for {HANG_SECONDS} s in: {self.step}", flush=True)
                os._exit(3)


def make_inputs(case: dict, device="cuda"):
    batch, q_heads, kv_heads = case["b"], case["hq"], case["hkv"]
    n_queries, n_keys, head_dim, dtype = case["nq"], case["nk"], case["d"], case["dtype"]
    generator = torch.Generator(device=device).manual_seed(case.get("seed", 0))

    def tensor(heads, n):
        if case.get("layout") == "bshd":  # a (B, N, H, D) projection seen as (B, H, N, D)
            x = torch.randn(
                batch, n, heads, head_dim, device=device, generator=generator, dtype=torch.float32
            )
            return x.to(dtype).transpose(1, 2)
        x = torch.randn(batch, heads, n, head_dim, device=device, generator=generator, dtype=torch.float32)
        return x.to(dtype)

    return tensor(q_heads, n_queries), tensor(kv_heads, n_keys), tensor(kv_heads, n_keys)


def check_lse_low(lse2: torch.Tensor, lse_low: torch.Tensor) -> str | None:
    """The portable forward's rules for the LSE's low part, or what breaks them."""
    low = lse_low[0]
    small = ~torch.isfinite(lse2) | (lse2.abs() < 256)
    if not torch.isfinite(low).all():
        return "non-finite low part"
    if (low[small] != 0).any():
        return "nonzero low part where |LSE2| < 256 or the row sees no key"
    big = ~small
    if big.any():
        half_ulp = torch.finfo(torch.float32).eps * lse2[big].abs()
        if (low[big].abs() > half_ulp).any():
            return "low part larger than half an ulp of LSE2"
    return None


def correctness_cases(quick: bool) -> list[dict]:
    cases = []
    for dtype in (torch.float16, torch.bfloat16):
        for head_dim in (64, 128):
            for causal in (False, True):
                cases.append(dict(b=2, hq=4, hkv=4, nq=512, nk=512, d=head_dim, dtype=dtype, causal=causal))
    # Ragged and rectangular sizes, GQA, BSHD views, empty causal rows, tiny and single-row problems.
    odd = [
        dict(b=1, hq=4, hkv=2, nq=1000, nk=1537, d=128, dtype=torch.bfloat16, causal=True, backward=True),
        dict(b=1, hq=4, hkv=2, nq=1000, nk=1537, d=64, dtype=torch.float16, causal=False),
        dict(b=2, hq=8, hkv=1, nq=300, nk=200, d=64, dtype=torch.float16, causal=True, backward=True),
        dict(b=2, hq=6, hkv=3, nq=129, nk=257, d=128, dtype=torch.bfloat16, causal=True, layout="bshd"),
        dict(b=3, hq=2, hkv=2, nq=17, nk=17, d=64, dtype=torch.bfloat16, causal=True),
        dict(b=1, hq=2, hkv=2, nq=1, nk=1000, d=128, dtype=torch.float16, causal=True),
        dict(b=1, hq=2, hkv=2, nq=1, nk=1, d=64, dtype=torch.float16, causal=False),
        dict(b=1, hq=2, hkv=2, nq=2048, nk=2048, d=128, dtype=torch.float16, causal=True, layout="bshd"),
        # Many tiles per head and batch (grid far beyond the SM count), GQA, ragged ends.
        dict(b=4, hq=8, hkv=2, nq=1536, nk=1536, d=64, dtype=torch.float16, causal=True),
        dict(b=3, hq=16, hkv=16, nq=700, nk=900, d=128, dtype=torch.bfloat16, causal=False),
        dict(b=2, hq=16, hkv=4, nq=1100, nk=1000, d=128, dtype=torch.bfloat16, causal=True),
        # Large logits: |LSE2| beyond 256, where the low part is saved.
        dict(
            b=1, hq=2, hkv=2, nq=256, nk=384, d=64, dtype=torch.bfloat16, causal=True, sm_scale=40.0,
            backward=True,
        ),
        dict(b=1, hq=2, hkv=2, nq=256, nk=256, d=128, dtype=torch.float16, causal=False, sm_scale=-25.0),
        # The persistent grid: many tiles of unequal weight per program (causal, heaviest first), fewer
        # queries than keys and more.
        dict(b=2, hq=8, hkv=2, nq=4096, nk=4096, d=128, dtype=torch.bfloat16, causal=True),
        dict(b=1, hq=12, hkv=4, nq=3000, nk=2500, d=128, dtype=torch.float16, causal=True),
        dict(b=1, hq=12, hkv=4, nq=1900, nk=3333, d=64, dtype=torch.bfloat16, causal=True),
    ]  # fmt: skip
    # Tile counts one below, at and one above the SM count (one tile a head): the persistent grid's
    # edge, where a program takes one tile or two.
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    odd += [
        dict(b=1, hq=heads, hkv=1, nq=100, nk=300, d=128, dtype=torch.bfloat16, causal=True)
        for heads in (sms - 1, sms, sms + 1)
    ]
    if quick:  # every other odd case, and all the many-tile, large-logit and persistent-grid ones
        return cases[::3] + [case for i, case in enumerate(odd) if i % 2 == 0 or i >= 8]
    return cases + odd


def references(case: dict, q, k, v, causal: bool, sm_scale: float) -> dict:
    """What each kernel's outputs are judged against: the float64 truth, eager attention, core's
    portable forward, SDPA where its mask is the same, and the gradients for backward cases."""
    import torch.nn.functional as F

    ref: dict = {}
    ref["truth"], ref["truth_lse"] = attention_reference(
        q, k, v, causal=causal, sm_scale=sm_scale, return_lse=True
    )
    ref["eager"], ref["eager_lse"] = attention_reference(
        q, k, v, causal=causal, sm_scale=sm_scale, return_lse=True, compute_dtype=None
    )
    with core.testing.use_family("portable"):
        ref["portable"] = core.testing.forward(q, k, v, causal=causal, sm_scale=sm_scale)
    # SDPA's causal mask is top-left aligned: compare only where that is the same mask.
    if not causal or case["nq"] == case["nk"]:
        ref["sdpa"] = F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, scale=sm_scale, enable_gqa=case["hq"] != case["hkv"]
        )
    if case.get("backward"):
        ref["dout"] = dout = torch.randn_like(q)
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        true_out = attention_reference(*leaves, causal=causal, sm_scale=sm_scale)
        ref["true_grads"] = torch.autograd.grad(true_out, leaves, dout.double())
        eager_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        eager_out = attention_reference(*eager_leaves, causal=causal, sm_scale=sm_scale, compute_dtype=None)
        ref["eager_grads"] = torch.autograd.grad(eager_out, eager_leaves, dout)
    return ref


def check_kernel(q, k, v, causal: bool, sm_scale: float, persistent: bool, ref: dict, dog: Watchdog):
    """One kernel on one case: (its entry, its (out, lse2, lse_low) or None if it failed)."""
    name = KERNELS[persistent]
    entry: dict = {}
    try:
        with poisoned_outputs():
            produced = hopper_plan(q, k, v, causal, sm_scale, persistent)(q, k, v)
        torch.cuda.synchronize()
    except Exception as error:  # a compile or launch failure is a result of this check
        entry["error"] = f"{type(error).__name__}: {error}"[:2000]
        return entry, None
    out, lse2, lse_low = produced
    verdicts = [
        judge("out", out, ref["truth"], ref["eager"]),
        judge("lse", lse2 * LN2, ref["truth_lse"], ref["eager_lse"], input_dtype=q.dtype),
    ]
    entry["nan_out"] = int(torch.isnan(out).sum())
    entry["nan_lse"] = int(torch.isnan(lse2).sum())
    entry["lse_low"] = check_lse_low(lse2, lse_low) or "ok"
    # LSE2 + its low part, in float64, against the truth in base 2: the low part must not hurt.
    truth2 = ref["truth_lse"].double() / LN2
    seen = torch.isfinite(truth2)
    if seen.any():
        with_low = (lse2.double() + lse_low[0].double() - truth2)[seen].abs().max().item()
        without = (lse2.double() - truth2)[seen].abs().max().item()
        entry["lse2_err"], entry["lse2_plus_low_err"] = without, with_low
        if with_low > without and with_low > 1e-6 * truth2[seen].abs().max().item():
            entry["lse_low"] = f"LSE2 + low further from the truth ({with_low:.3e}) than LSE2 ({without:.3e})"
    portable, portable_lse2, portable_low = ref["portable"]
    entry["vs_portable_out"] = (out.float() - portable.float()).abs().max().item()
    both = torch.isfinite(portable_lse2)
    if not torch.equal(both, torch.isfinite(lse2)):
        entry["lse_low"] = "rows without keys differ from the portable forward's"
    entry["vs_portable_lse2"] = (lse2 - portable_lse2)[both].abs().max().item() if both.any() else 0.0
    entry["vs_portable_low"] = (lse_low - portable_low).abs().max().item()
    if "sdpa" in ref:
        entry["vs_sdpa_out"] = (out.float() - ref["sdpa"].float()).abs().max().item()
    # The backward on this forward's statistics.
    if "dout" in ref:
        dog.enter(f"backward {name}")
        grads = core.testing.backward(
            ref["dout"], None, q, k, v, out, lse2, lse_low, causal=causal, sm_scale=sm_scale
        )
        family = largest_finite(*ref["true_grads"])
        for quantity, grad, true_grad, eager_grad in zip(
            ("dq", "dk", "dv"), grads, ref["true_grads"], ref["eager_grads"]
        ):
            verdicts.append(judge(quantity, grad, true_grad, eager_grad, family_scale=family))
    entry["verdicts"] = {v.quantity: {"ok": v.ok, "ratio": v.ratio} for v in verdicts}
    entry["ok"] = (
        all(v.ok for v in verdicts) and entry["lse_low"] == "ok" and entry["nan_out"] == entry["nan_lse"] == 0
    )
    ratios = " ".join(f"{v.quantity} {v.ratio:.2f}" for v in verdicts)
    entry["summary"] = (
        f"{'PASS' if entry['ok'] else 'FAIL'} ({ratios}; lse_low {entry['lse_low']}; "
        f"|out - portable| {entry['vs_portable_out']:.2e}; "
        f"|lse2 - portable| {entry['vs_portable_lse2']:.2e}; "
        f"|low - portable| {entry['vs_portable_low']:.2e}"
        + (f"; |out - sdpa| {entry['vs_sdpa_out']:.2e}" if "vs_sdpa_out" in entry else "")
        + f"; NaN out/lse {entry['nan_out']}/{entry['nan_lse']})"
    )
    return entry, produced


def bitwise_equal(first, second) -> bool:
    """Whether two kernels' (out, lse2, lse_low) are the same bits (NaN, an unwritten element, is not)."""
    return all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def run_correctness(cases: list[dict], dog: Watchdog) -> list[dict]:
    results = []
    for case in cases:
        label = (
            f"{str(case['dtype'])[6:]} B{case['b']} Hq{case['hq']}/{case['hkv']} Nq{case['nq']} "
            f"Nk{case['nk']} D{case['d']} {'causal' if case['causal'] else 'full'} "
            f"{case.get('layout', 'bhsd')} ({tile_count(case)} tiles)"
        )
        dog.enter(f"inputs and references {label}")
        q, k, v = make_inputs(case)
        causal = case["causal"]
        sm_scale = case.get("sm_scale", 1.0 / math.sqrt(case["d"]))
        entry: dict = {"case": label}
        if not hopper.supports(q, k, v, causal, head_dims=ALL_HEAD_DIMS):
            entry["error"] = "supports() is False"
            results.append(entry)
            print(f"  {label}: NOT SUPPORTED", flush=True)
            continue
        ref = references(case, q, k, v, causal, sm_scale)
        produced = {}
        for persistent, name in KERNELS.items():
            dog.enter(f"correctness {name} {label}")
            entry[name], produced[name] = check_kernel(q, k, v, causal, sm_scale, persistent, ref, dog)
            print(
                f"  {label} {name}: {entry[name].get('summary') or 'FAILED ' + entry[name]['error']}",
                flush=True,
            )
        ran = all(result is not None for result in produced.values())
        entry["bitwise"] = ran and bitwise_equal(*produced.values())
        entry["ok"] = entry["bitwise"] and all(entry[name].get("ok") for name in KERNELS.values())
        print(f"  {label}: persistent == one-tile bitwise: {entry['bitwise']}", flush=True)
        results.append(entry)
    return results


# ----------------------------------------------------------------------------- timing (GPU)


PROVIDERS = ("portable", "hopper", "hopper-persistent", "flash", "cudnn")


def time_row(dtype_name: str, head_dim: int, n: int, causal: bool) -> dict:
    """TFLOP/s of each forward on one benchmark shape, each output checked against FLASH's, and whether
    the two Hopper kernels' outputs are the same bits."""
    import torch.nn.functional as F
    from attnbench.flops import forward_flops
    from attnbench.runner import DTYPES, compare
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    batch, heads = TOKENS // n, WIDTH // head_dim
    q, k, v = (
        torch.randn(batch, heads, n, head_dim, device="cuda", dtype=DTYPES[dtype_name]) for _ in range(3)
    )
    sm_scale = 1.0 / math.sqrt(head_dim)
    flops = forward_flops(batch, heads, n, n, head_dim, causal)
    plans = {persistent: hopper_plan(q, k, v, causal, sm_scale, persistent) for persistent in KERNELS}

    def portable():
        with core.testing.use_family("portable"):
            return attention(q, k, v, causal=causal)

    def sdpa(backend):
        def call():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return call

    providers = {
        "portable": portable,
        "hopper": lambda: plans[False](q, k, v)[0],
        "hopper-persistent": lambda: plans[True](q, k, v)[0],
        "flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
    }
    row: dict = {"case": f"{dtype_name} D{head_dim} N{n} {'causal' if causal else 'full'}"}
    reference = providers["flash"]()
    for name, call in providers.items():
        try:
            row[f"{name}_check"] = compare(call(), reference, dtype_name)
            row[name] = flops / do_bench(call, return_mode="median") / 1e9
        except Exception as error:  # a provider that cannot run this shape is a blank cell
            row[name] = None
            row[f"{name}_error"] = f"{type(error).__name__}: {error}"[:300]
    try:
        row["bitwise"] = bitwise_equal(plans[False](q, k, v), plans[True](q, k, v))
    except Exception as error:  # reported with the kernels' own errors above
        row["bitwise"] = f"{type(error).__name__}"
    return row


def run_timing(quick: bool, dog: Watchdog) -> list[dict]:
    rows = []
    dtypes = ("bf16",) if quick else ("bf16", "fp16")
    for dtype_name in dtypes:
        for head_dim in (64, 128):
            for n in SEQ_LENS:
                for causal in (False, True):
                    dog.enter(f"timing {dtype_name} D{head_dim} N{n} causal={causal}")
                    row = time_row(dtype_name, head_dim, n, causal)
                    rows.append(row)
                    cells = " ".join(
                        f"{name} {row[name]:.0f}" if row[name] else f"{name} -" for name in PROVIDERS
                    )
                    suspects = [p for p in PROVIDERS[:3] if row.get(f"{p}_check", {}).get("suspect", True)]
                    print(
                        f"  {row['case']}: {cells} TFLOP/s; bitwise {row['bitwise']}"
                        + (f"  SUSPECT {','.join(suspects)}" if suspects else ""),
                        flush=True,
                    )
    return rows


def print_table(rows: list[dict], device: str) -> None:
    print(f"\nForward TFLOP/s (median, do_bench), {TOKENS} tokens, H*D = {WIDTH}, {device}:")
    print(
        f"{'case':24} {'portable':>8} {'hopper':>6} {'persist':>7} {'FA2':>5} {'cuDNN':>5} "
        f"{'pers/hop':>8} {'hop/cuDNN':>9} {'pers/cuDNN':>10} {'pers/port':>9}"
    )

    def cell(value, width, digits=0):
        return f"{value:{width}.{digits}f}" if value else f"{'-':>{width}}"

    def ratio(a, b):
        return a / b if a and b else None

    for row in rows:
        port, hop, pers, cudnn = (row.get(n) for n in ("portable", "hopper", "hopper-persistent", "cudnn"))
        flags = [n for n in PROVIDERS[:3] if row.get(f"{n}_check", {}).get("suspect", True)]
        if row.get("bitwise") is not True:
            flags.append("NOT BITWISE")
        print(
            f"{row['case']:24} {cell(port, 8)} {cell(hop, 6)} {cell(pers, 7)} {cell(row.get('flash'), 5)} "
            f"{cell(cudnn, 5)} {cell(ratio(pers, hop), 8, 2)} {cell(ratio(hop, cudnn), 9, 2)} "
            f"{cell(ratio(pers, cudnn), 10, 2)} {cell(ratio(pers, port), 9, 2)}"
            + (f"  SUSPECT {','.join(flags)}" if flags else "")
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer correctness cases, bf16 timing only")
    parser.add_argument("--report", action="store_true", help="sm_90a compile facts, on the CPU")
    parser.add_argument("--out", type=Path, help="write results.json here")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument(
        "--no-correctness", action="store_true", help="timing only (its rows still check each result)"
    )
    args = parser.parse_args(argv)
    if args.report:
        report()
        return 0
    if not torch.cuda.is_available():
        print("no GPU: only --report runs here", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    dog = Watchdog()
    print(f"{device} ({sms} SMs), torch {torch.__version__}", flush=True)
    print("correctness (each case: both kernels, then whether their results are the same bits):", flush=True)
    cases = [] if args.no_correctness else correctness_cases(args.quick)
    results = {"device": device, "correctness": run_correctness(cases, dog)}
    cases = results["correctness"]
    passed = sum(bool(entry.get("ok")) for entry in cases)
    summary = (
        f"correctness: {passed}/{len(cases)} cases pass (both kernels within the policy, and bitwise "
        f"equal: {sum(entry.get('bitwise') is True for entry in cases)}/{len(cases)})"
    )
    print(summary, flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    if not args.no_timing:
        print("timing:", flush=True)
        results["timing"] = run_timing(args.quick, dog)
        if args.out:
            (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        print(f"\n{summary}")
        print_table(results["timing"], device)
    timed_bitwise = all(row.get("bitwise") is True for row in results.get("timing", []))
    return 0 if passed == len(cases) and timed_bitwise else 1


if __name__ == "__main__":
    sys.exit(main())
