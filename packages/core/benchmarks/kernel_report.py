"""What the compiler made of core's kernels on Hopper, without a GPU: registers, spills, shared memory,
ptxas's performance warnings, and the instruction mix of every loop, from an sm_90a compile on the CPU.

    python3 -m venv /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0 torch==2.13.0 numpy
    PYTHONPATH=packages/core/src /tmp/t36/bin/python packages/core/benchmarks/kernel_report.py [--d 64,128]

Use the Triton release the GPU machine runs (3.6 here): the report is its compiler's, and ptxas ships in
Triton's wheel. The kernels are compiled as core launches them for contiguous (B, H, N, D) inputs of
16k tokens (the benchmark's shapes): the portable tile table's tiles, tensor descriptors, whole query
blocks. Two things it finds that a timing only hints at (docs/perf-notes.md):

- per-element work in a loop: the dK/dV kernel's masked one-float-per-row loads of LSE and Delta were a
  third of its D=128 loop (706 instructions per step, 463 without them);
- ptxas's C7515, "wgmma.mma_async instructions are serialized": every tensor-core op then waits for the
  previous one. It appeared and went with innocent rewrites (an index added in another order, an `if`
  around a loop), so the report prints it for each kernel.

Loops are listed in SASS order, innermost loops with tensor-core work only: the forward's and dQ
kernel's unmasked loop, then their masked one; the dK/dV kernel's masked and unmasked loops with the
LSE low part, then the same two without it (the one typical inputs run).

`--features window,softcap,varlen` compiles the kernels with those switches on instead (a sliding
window, logit softcapping, packed sequences; any subset): the plain kernels' report is the default.
`--n` sets N: one that is no multiple of the dK/dV kernel's BLOCK_M (4001, say) compiles the backward
of a ragged Nq, whose dK/dV kernel masks Q and dO (backward.py, WHOLE_QUERY_BLOCKS; every call reads
its row statistics from the padded copy). `--no-causal` compiles the kernels without the causal mask.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from core.testing import Pointer, compile_signature, portable

_config, _launch = portable.config, portable.plans
backward_dkdv_kernel = portable.backward.backward_dkdv_kernel
backward_dq_kernel = portable.backward.backward_dq_kernel
attention_forward_kernel = portable.forward.attention_forward_kernel

HOPPER = GPUTarget("cuda", 90, 32)
TOKENS, WIDTH = 16384, 2048
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
DTYPES = {"fp16": (torch.float16, "fp16"), "bf16": (torch.bfloat16, "bf16")}


def kernel_arguments(
    kind: str, d: int, n: int, element: str, torch_dtype, causal: bool, features: frozenset = frozenset()
) -> tuple[dict, dict]:
    """(arguments by name, launch options) of one kernel as core's plans launch it, with the switches
    named in `features` ("window", "softcap", "varlen") on."""
    heads = WIDTH // d
    varlen, window = "varlen" in features, "window" in features
    # varlen: (total, H, D) tensors, batch stride 0 (plans.kernel_strides)
    strides = (0, d, heads * d, 1) if varlen else (heads * n * d, n * d, d, 1)
    block_d = _config.padded_head_dim(d)
    if kind == "forward":
        config = _config.forward_config(block_d, torch_dtype, False)
        tensors = {"q": "bhmd", "k": "bhnd", "v": "bhnd", "o": "bhmd"}
        pointers = {"Q": element, "K": element, "V": element, "Out": element, "Lse": "fp32", "LseLow": "fp32"}
        scalars = {"qk_scale": 0.18}
        extra = {}
    else:
        dkdv, dq = _config.backward_configs(block_d, torch_dtype, False)
        config = dkdv if kind == "dkdv" else dq
        outputs = {"dk": "bhnd", "dv": "bhnd"} if kind == "dkdv" else {"dq": "bhmd"}
        tensors = {"q": "bhmd", "k": "bhnd", "v": "bhnd", "do": "bhmd", **outputs}
        pointers = {name: element for name in ("Q", "K", "V", "dOut")}
        pointers |= {"Lse": "fp32", "LseLow": "fp32", "Delta": "fp32"}
        pointers |= {"dK": element, "dV": element} if kind == "dkdv" else {"dQ": element}
        scalars = {"sm_scale": 0.125, "qk_scale": 0.18}
        if kind == "dkdv":
            whole = not varlen and _launch.whole_query_blocks(n, config.block_m)
            extra = {"PREFETCH_ROW_STATS": config.prefetch_row_stats, "WHOLE_QUERY_BLOCKS": whole}
        else:
            extra = {"DELTA_IN_DQ": False}
    pointers |= {"CuSeqlensQ": "i32", "CuSeqlensK": "i32"}  # stand-ins unless varlen
    arguments = {name: Pointer(element_type) for name, element_type in pointers.items()}
    for tensor, dims in tensors.items():
        arguments |= {f"stride_{tensor}{dim}": stride for dim, stride in zip(dims, strides)}
    sizes = {"n_q_heads": heads, "kv_group": 1, "n_queries": n, "n_keys": n}
    # A 4k window to the left of the causal diagonal (window_right 0) or none (unused arguments).
    sizes |= {"window_left": 4096 if window else 0, "window_right": 0}
    # softcap 50 at D = 128 in base 2 (sm_scale / 50, 50 * log2(e)), or unused zeros.
    softcap = "softcap" in features
    scalars |= {"softcap_in": 0.0025 if softcap else 0.0, "softcap_out": 72.1 if softcap else 0.0}
    constexprs, options = _launch._attention_meta(
        d, causal and not window, block_d, config, torch_dtype, False, config.descriptors, window,
        "softcap" in features, varlen,
    )  # fmt: skip
    arguments |= sizes | scalars | dict(constexprs) | extra
    return arguments, dict(options)


def ptxas_report(ptx: str) -> tuple[str, list[str]]:
    """ptxas -v's resource line and its performance warnings (C7515 and the like)."""
    with tempfile.TemporaryDirectory() as scratch:
        source = os.path.join(scratch, "k.ptx")
        with open(source, "w") as handle:
            handle.write(ptx)
        log = subprocess.run(
            [
                os.path.join(BIN, "ptxas"),
                "-arch=sm_90a",
                "-v",
                source,
                "-o",
                os.path.join(scratch, "k.cubin"),
            ],
            capture_output=True,
            text=True,
        ).stderr
    resources = " ".join(line.strip() for line in log.splitlines() if "spill" in line or "Used" in line)
    warnings = [line.split(": ", 1)[-1] for line in log.splitlines() if "Performance" in line]
    return resources, warnings


def loops(cubin: bytes) -> list[tuple[int, collections.Counter]]:
    """(length, opcode counts) of each innermost loop with tensor-core work, in SASS order (a backward
    branch closes each loop)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        sass = subprocess.run(
            [os.path.join(BIN, "cuobjdump"), "-sass", handle.name], capture_output=True, text=True
        )
    instructions = []
    for line in sass.stdout.splitlines():
        match = re.search(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)(.*)", line)
        if match:
            instructions.append((int(match[1], 16), match[2].split(".")[0], match[3]))
    ranges = []
    for address, opcode, rest in instructions:
        target = re.search(r"0x([0-9a-f]+)", rest) if opcode == "BRA" else None
        if target and int(target[1], 16) < address:
            ranges.append((int(target[1], 16), address))
    report = []
    for start, end in ranges:
        if any(start <= inner_start and inner_end <= end and (inner_start, inner_end) != (start, end)
               for inner_start, inner_end in ranges):  # fmt: skip
            continue  # not innermost
        body = [opcode for at, opcode, _ in instructions if start <= at <= end]
        if "HGMMA" in body:
            report.append((len(body), collections.Counter(body)))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--d", default="64,128")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--n", type=int, default=4096, help="Nq = Nk (ragged: Q and dO masked in dK/dV)")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--kernels", default="forward,dq,dkdv")
    parser.add_argument("--features", default="", help="comma list of window,softcap,varlen (default: none)")
    args = parser.parse_args(argv)
    features = frozenset(filter(None, args.features.split(",")))
    unknown = features - {"window", "softcap", "varlen"}
    if unknown:
        parser.error(f"--features: unknown {', '.join(sorted(unknown))}; choose from window,softcap,varlen")
    torch_dtype, element = DTYPES[args.dtype]
    kernels = {"forward": attention_forward_kernel, "dq": backward_dq_kernel, "dkdv": backward_dkdv_kernel}
    shown = ",".join(sorted(features)) or "none"
    masking = "causal" if args.causal else "not causal"
    print(f"triton {triton.__version__}, sm_90a, {args.dtype}, {masking}, N {args.n}, features: {shown}")
    for d in map(int, args.d.split(",")):
        for kind in args.kernels.split(","):
            kernel = kernels[kind]
            arguments, options = kernel_arguments(
                kind, d, args.n, element, torch_dtype, args.causal, features
            )
            compiled = triton.compile(
                ASTSource(kernel, *compile_signature(kernel, arguments)), target=HOPPER, options=options
            )
            resources, warnings = ptxas_report(compiled.asm["ptx"])
            print(f"\n{kind} D{d} {options}: shared {compiled.metadata.shared} B; {resources}")
            for warning in warnings:
                print(f"  WARNING {warning}")
            for length, opcodes in loops(compiled.asm["cubin"]):
                mix = ", ".join(f"{op} {count}" for op, count in opcodes.most_common(10))
                print(f"  loop of {length} instructions: {mix}")


if __name__ == "__main__":
    main()
