"""torch.compile over core.attention, as a table: fullgraph x dynamic x return_lse x causal x layout, each
cell compiled, run forward and backward over several sequence lengths, and compared with eager.

    python packages/core/benchmarks/run.py compile        # GPU: inductor; CPU (interpreter): aot_eager

Columns: graphs and graph breaks (torch._dynamo.explain on the first length), frames compiled over all
lengths (1 = no recompile per length), and whether out, LSE and every gradient equal eager's bit for bit.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # before core is imported

import torch._dynamo.testing  # noqa: E402

import core  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
BACKEND = "inductor" if ON_GPU else "aot_eager"


def _inputs(n: int, layout: str, dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    batch, q_heads, kv_heads, head_dim = (2, 8, 2, 64) if ON_GPU else (1, 4, 2, 16)

    def draw(heads):
        if layout == "bshd":
            x = torch.randn(batch, n, heads, head_dim, generator=generator).transpose(1, 2)
        else:
            x = torch.randn(batch, heads, n, head_dim, generator=generator)
        return x.to(DEVICE, dtype).requires_grad_()

    return draw(q_heads), draw(kv_heads), draw(kv_heads)


def _step(fn, q, k, v, return_lse: bool):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    result = fn(*leaves)
    out, lse = result if return_lse else (result, None)
    loss = out.float().square().sum() + (lse.sum() if lse is not None else 0)
    loss.backward()
    return [out, *([lse] if lse is not None else []), *[t.grad for t in leaves]]


def cell(fullgraph: bool, dynamic: bool, return_lse: bool, causal: bool, layout: str, lengths) -> dict:
    torch._dynamo.reset()
    dtype = torch.bfloat16 if ON_GPU else torch.float16

    def attend(q, k, v):
        return core.attention(q, k, v, causal=causal, return_lse=return_lse)

    row = {"fullgraph": fullgraph, "dynamic": dynamic, "return_lse": return_lse, "causal": causal}
    row["layout"] = layout
    try:
        q, k, v = _inputs(lengths[0], layout, dtype, 0)
        explanation = torch._dynamo.explain(attend)(q, k, v)
        row["graphs"], row["breaks"] = explanation.graph_count, explanation.graph_break_count
        torch._dynamo.reset()
        counter = torch._dynamo.testing.CompileCounterWithBackend(BACKEND)
        compiled = torch.compile(attend, backend=counter, fullgraph=fullgraph, dynamic=dynamic)
        equal = True
        for seed, n in enumerate(lengths):
            q, k, v = _inputs(n, layout, dtype, seed)
            eager, got = _step(attend, q, k, v, return_lse), _step(compiled, q, k, v, return_lse)
            equal &= all(torch.equal(a, b) for a, b in zip(eager, got))
        row["frames"], row["bitwise"] = counter.frame_count, equal
    except Exception as failure:  # a cell that fails is a result
        row["error"] = f"{type(failure).__name__}: {str(failure)[:160]}"
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", default="512,640,1000" if ON_GPU else "24,40,56")
    args = parser.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]
    device = torch.cuda.get_device_name() if ON_GPU else "CPU, Triton interpreter"
    print(f"torch.compile matrix, backend {BACKEND}, {device}, torch {torch.__version__}, lengths {lengths}")
    print("| fullgraph | dynamic | return_lse | causal | layout | graphs | breaks | frames | bitwise |")
    print("|---|---|---|---|---|---|---|---|---|")
    failures = 0
    for fullgraph, dynamic, return_lse, causal, layout in itertools.product(
        (True, False), (False, True), (False, True), (True, False), ("bhsd", "bshd")
    ):
        row = cell(fullgraph, dynamic, return_lse, causal, layout, lengths)
        head = f"| {fullgraph} | {dynamic} | {return_lse} | {causal} | {layout} |"
        if "error" in row:
            failures += 1
            print(f"{head} error: {row['error']} | | | |")
        else:
            ok = row["breaks"] == 0 and row["bitwise"] and (row["frames"] == 1 or not dynamic)
            failures += not ok
            print(f"{head} {row['graphs']} | {row['breaks']} | {row['frames']} | {row['bitwise']} |")
    print(f"{failures} cell(s) failed")
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
