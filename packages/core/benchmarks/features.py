"""core's packed sequences, sliding windows and logit softcapping against what users would run otherwise.

    python packages/core/benchmarks/run.py features [--quick] [--dtype bf16] [--out FILE.json]
    python packages/core/benchmarks/run.py features --dry-run      # CPU: tiny shapes, the harness only

Scenarios (causal, H 16 x D 128, one GPU):
- packed: 16k tokens as 1 to 32 documents of long-tailed lengths (a fixed draw per count), each
  document attending only within itself. core.attention_varlen; FlexAttention with a document mask
  (compiled, its block mask built once); SDPA (its FLASH backend) on the batch padded to the longest
  document; a loop of dense core.attention calls, one per document.
- window: a 4k sliding window (window_size (4096, 0)) over 32k tokens. core; Flex with the window as
  its mask_mod; SDPA with the dense boolean mask, where it fits in memory.
- softcap: softcap 50 at 8k tokens (B 2). core; Flex with the cap as its score_mod; SDPA has no way
  to modify scores, so it is n/a.

TFLOP/s count only the visible (query, key) pairs (summed exactly over rows, documents and the window),
4 flops per pair and head dim for the forward, 2.5x that for the backward, as bench.py counts. "fwd" is
one forward call with inputs that require grad, "bwd" the backward alone on one recorded forward
(bench.py's convention: attnbench/runner.py). Before timing, each provider's output is compared with
core's: a difference beyond 16 ulps of the largest output marks it SUSPECT. The table prints last.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DTYPES = ("fp16", "bf16")


@dataclass
class Row:
    scenario: str
    provider: str
    fwd_ms: float | None = None
    bwd_ms: float | None = None
    fwd_tflops: float | None = None
    bwd_tflops: float | None = None
    max_abs_diff: float | None = None
    suspect: bool = False
    note: str = ""
    extra: dict = field(default_factory=dict)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer packings, shorter timings")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument(
        "--scenarios", default="packed,window,softcap", help="comma list of packed,window,softcap"
    )
    parser.add_argument(
        "--providers",
        default="core,fadelta,flex,sdpa,loop",
        help="comma list of core,fadelta,flex,sdpa,loop (fadelta: core with Delta = dO . O, as "
        "FlashAttention and Flex take it)",
    )
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    return parser.parse_args(argv)


def document_lengths(tokens: int, documents: int, seed: int) -> list[int]:
    """`documents` lengths >= 1 summing to `tokens`, long-tailed (log-normal weights, sigma 1.2): a few
    long documents and many short ones, as in a packed pretraining batch. Fixed per (count, seed)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    weights = torch.exp(1.2 * torch.randn(documents, generator=generator, dtype=torch.float64))
    lengths = [max(1, int(w)) for w in (weights / weights.sum() * tokens).floor().tolist()]
    lengths[int(torch.tensor(lengths).argmax())] += tokens - sum(lengths)
    return lengths


def visible_pairs(n_queries: int, n_keys: int, causal: bool, window=(-1, -1)) -> int:
    """(query, key) pairs one head scores, exactly: row i sees keys [i + d - left, i + d + right] within
    [0, Nk), d = Nk - Nq (core.reference.visible_keys_mask's rule), summed over the rows."""
    import torch

    left, right = window
    if causal:
        right = 0
    rows = torch.arange(n_queries, dtype=torch.int64)
    first = rows + (n_keys - n_queries) - left if left >= 0 else torch.zeros_like(rows)
    last = rows + (n_keys - n_queries) + right if right >= 0 else torch.full_like(rows, n_keys - 1)
    return int((last.clamp(max=n_keys - 1) - first.clamp(min=0) + 1).clamp(min=0).sum())


class Bench:
    """The run's settings: device, timer, and the check every provider's output gets against core's."""

    def __init__(self, args):
        import torch

        self.torch = torch
        self.device = "cpu" if args.dry_run else "cuda"
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
        self.dtype_name = args.dtype
        self.providers = set(args.providers.split(","))
        from attnbench.timing import DeviceTimer, HostTimer

        if args.dry_run:
            self.timer = HostTimer(repeats=1)
        elif args.quick:
            self.timer = DeviceTimer(warmup_ms=10, rep_ms=40)
        else:
            self.timer = DeviceTimer(warmup_ms=25, rep_ms=100)
        self.rows: list[Row] = []

    def synchronize(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def measure(self, scenario: str, provider: str, setup, flops: float, reference, note=""):
        """setup() -> (attend, leaves, grad): check attend()'s output (laid out like core's) against
        `reference`, then time fwd and bwd. Any failure (a provider that cannot run the case, memory)
        becomes an n/a row with its reason."""
        from attnbench.providers import ProviderError, explained_failures
        from attnbench.runner import Inputs, compare, time_pass

        row = Row(scenario, provider, note=note)
        self.rows.append(row)
        try:
            with explained_failures():
                attend, leaves, grad = setup()
                started = time.perf_counter()
                output = attend().detach()
                self.synchronize()
                row.extra["first_call_s"] = round(time.perf_counter() - started, 2)
                if reference is not None:
                    check = compare(output, reference, self.dtype_name)
                    row.max_abs_diff, row.suspect = check.get("max_abs_diff"), check["suspect"]
                inputs = Inputs(*leaves, grad_out=grad)
                row.fwd_ms = time_pass("fwd", attend, inputs, self.timer)
                row.bwd_ms = time_pass("bwd", attend, inputs, self.timer)
        except ProviderError as failure:
            row.note = f"n/a: {str(failure)[:160]}"
            print(_line(row), flush=True)
            if self.device == "cuda":
                self.torch.cuda.empty_cache()
            return None
        if row.fwd_ms:
            row.fwd_tflops = flops / row.fwd_ms / 1e9
        if row.bwd_ms:
            row.bwd_tflops = 2.5 * flops / row.bwd_ms / 1e9
        print(_line(row), flush=True)
        return output

    def randn(self, *shape, seed: int):
        generator = self.torch.Generator(device=self.device).manual_seed(seed)
        return self.torch.randn(*shape, generator=generator, device=self.device, dtype=self.dtype)


def _flex(torch):
    import torch._dynamo.config as dynamo_config
    import torch._functorch.config as functorch_config
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dynamo_config.recompile_limit = 4096
    dynamo_config.accumulated_recompile_limit = 4096
    functorch_config.donated_buffer = False  # the backward is timed on one graph, retain_graph
    return create_block_mask, torch.compile(flex_attention, dynamic=False)


def packed_scenario(bench: Bench, tokens: int, documents: int, heads: int, head_dim: int):
    import torch

    import core

    lengths = document_lengths(tokens, documents, seed=documents)
    longest = max(lengths)
    name = f"packed {tokens} tokens, {documents} docs"
    note = f"lengths {min(lengths)}-{longest}"
    flops = 4.0 * heads * head_dim * sum(visible_pairs(n, n, True) for n in lengths)
    starts = [0]
    for length in lengths:
        starts.append(starts[-1] + length)
    cu = torch.tensor(starts, dtype=torch.int32, device=bench.device)
    q, k, v, grad = (bench.randn(tokens, heads, head_dim, seed=s) for s in range(4))
    leaves = [t.requires_grad_() for t in (q, k, v)]

    def core_varlen():
        return core.attention_varlen(q, k, v, cu, cu, longest, longest, causal=True)

    def per_document():
        outs = [
            core.attention(*(t[s:e].transpose(0, 1).unsqueeze(0) for t in (q, k, v)), causal=True)
            for s, e in itertools.pairwise(starts)
        ]
        return torch.cat([out[0].transpose(0, 1) for out in outs])

    def flex_setup():
        create_block_mask, flex_attention = _flex(torch)
        bhsd = [t.detach().transpose(0, 1).unsqueeze(0).contiguous().requires_grad_() for t in (q, k, v)]
        document = torch.repeat_interleave(
            torch.arange(len(lengths), device=bench.device), torch.tensor(lengths, device=bench.device)
        )

        def document_causal(b, h, q_idx, kv_idx):
            return (document[q_idx] == document[kv_idx]) & (kv_idx <= q_idx)

        block_mask = create_block_mask(document_causal, None, None, tokens, tokens, device=bench.device)
        return (lambda: flex_attention(*bhsd, block_mask=block_mask)[0].transpose(0, 1)), bhsd, grad

    def sdpa_setup():
        padded = [q.new_zeros(len(lengths), heads, longest, head_dim) for _ in range(3)]
        for t, source in zip(padded, (q, k, v)):
            for b, (s, e) in enumerate(itertools.pairwise(starts)):
                t[b, :, : e - s] = source.detach()[s:e].transpose(0, 1)
        padded = [t.requires_grad_() for t in padded]
        real = torch.cat([torch.arange(b * longest, b * longest + n) for b, n in enumerate(lengths)])
        real = real.to(bench.device)

        def sdpa_padded():
            # Right padding: under is_causal a real query sees only its own document's real keys.
            with _sdpa_backend(torch, bench.device):
                out = torch.nn.functional.scaled_dot_product_attention(*padded, is_causal=True)
            return out.transpose(1, 2).reshape(-1, heads, head_dim)[real]

        return sdpa_padded, padded, grad

    reference = None
    if "core" in bench.providers:
        reference = bench.measure(name, "core varlen", lambda: (core_varlen, leaves, grad), flops, None, note)
    _measure_with_output_delta(bench, name, "core varlen", core_varlen, leaves, grad, flops, reference)
    if "loop" in bench.providers:
        bench.measure(name, "core per-doc loop", lambda: (per_document, leaves, grad), flops, reference,
                      "one core.attention per document, + a cat")  # fmt: skip
    if "flex" in bench.providers:
        bench.measure(name, "flex doc mask", flex_setup, flops, reference, "block mask built once")
    if "sdpa" in bench.providers:
        padding = len(lengths) * longest / tokens
        bench.measure(
            name, "sdpa padded", sdpa_setup, flops, reference,
            f"FLASH on {len(lengths)} x {longest}: {padding:.1f}x the tokens",
        )  # fmt: skip


def _measure_with_output_delta(bench: Bench, name, provider, attend, leaves, grad, flops, reference):
    """core again with its backward's Delta taken as dO . O from the rounded output (provider fadelta;
    core.testing.precise_delta(False)), what FlashAttention and Flex compute: core's default Delta
    pass (docs/perf-notes.md) made apart from the kernels' own speed."""
    if "fadelta" not in bench.providers:
        return
    import core.testing

    with core.testing.precise_delta(False):
        bench.measure(name, f"{provider} dO.O", lambda: (attend, leaves, grad), flops, reference,
                      "Delta = dO . O (precise_delta off)")  # fmt: skip


def _sdpa_backend(torch, device):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION if device == "cuda" else SDPBackend.MATH)


def dense_scenario(
    bench: Bench, name: str, batch: int, tokens: int, heads: int, head_dim: int, window, softcap
):
    """One causal (batch, heads, tokens, head_dim) problem with a window or a softcap: core, Flex, SDPA."""
    import torch

    import core

    flops = 4.0 * batch * heads * head_dim * visible_pairs(tokens, tokens, True, window)
    q, k, v, grad = (bench.randn(batch, heads, tokens, head_dim, seed=10 + s) for s in range(4))
    leaves = [t.requires_grad_() for t in (q, k, v)]
    left = window[0]

    def core_call():
        return core.attention(q, k, v, causal=True, window_size=window, softcap=softcap)

    def flex_setup():
        create_block_mask, flex_attention = _flex(torch)

        def causal_window(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx <= left) if left >= 0 else kv_idx <= q_idx

        def capped(score, b, h, q_idx, kv_idx):
            return softcap * torch.tanh(score / softcap)

        block_mask = create_block_mask(causal_window, None, None, tokens, tokens, device=bench.device)
        score_mod = capped if softcap else None
        return (lambda: flex_attention(q, k, v, block_mask=block_mask, score_mod=score_mod)), leaves, grad

    def sdpa_setup():
        rows = torch.arange(tokens, device=bench.device)[:, None]
        keys = torch.arange(tokens, device=bench.device)[None, :]
        mask = (keys <= rows) & (rows - keys <= left)
        return (
            (lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)),
            leaves,
            grad,
        )

    reference = None
    if "core" in bench.providers:
        reference = bench.measure(name, "core", lambda: (core_call, leaves, grad), flops, None)
    _measure_with_output_delta(bench, name, "core", core_call, leaves, grad, flops, reference)
    if "flex" in bench.providers:
        bench.measure(
            name, "flex", flex_setup, flops, reference, "mask_mod" + (" + score_mod" if softcap else "")
        )
    if "sdpa" in bench.providers:
        if softcap:
            bench.rows.append(Row(name, "sdpa", note="n/a: SDPA cannot modify scores (no softcap)"))
            print(_line(bench.rows[-1]))
        else:
            gib = tokens * tokens / 2**30
            bench.measure(name, "sdpa dense mask", sdpa_setup, flops, reference, f"bool mask {gib:.1f} GiB")


def _format(value, spec):
    return "-" if value is None else format(value, spec)


def _line(row: Row) -> str:
    diff = (
        "" if row.max_abs_diff is None else f" diff {row.max_abs_diff:.1e}{' SUSPECT' if row.suspect else ''}"
    )
    return (
        f"{row.scenario:<34} {row.provider:<18} fwd {_format(row.fwd_tflops, '7.1f')} TFLOP/s"
        f" ({_format(row.fwd_ms, '.3f')} ms)  bwd {_format(row.bwd_tflops, '7.1f')} TFLOP/s"
        f" ({_format(row.bwd_ms, '.3f')} ms){diff}  {row.note}"
    )


def table(rows: list[Row]) -> str:
    lines = [
        "| scenario | provider | fwd TFLOP/s | fwd ms | bwd TFLOP/s | bwd ms | max diff vs core | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        diff = _format(row.max_abs_diff, ".1e") + (" SUSPECT" if row.suspect else "")
        note = row.note.replace("|", "/")[:120]
        lines.append(
            f"| {row.scenario} | {row.provider} | {_format(row.fwd_tflops, '.1f')} | "
            f"{_format(row.fwd_ms, '.3f')} | "
            f"{_format(row.bwd_tflops, '.1f')} | {_format(row.bwd_ms, '.3f')} | {diff} | {note} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before core's kernels are imported
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("features.py: no CUDA device (use --dry-run on a CPU)")
    bench = Bench(args)
    scenarios = set(args.scenarios.split(","))
    heads, head_dim = (2, 16) if args.dry_run else (16, 128)
    if "packed" in scenarios:
        tokens = 64 if args.dry_run else 16384
        counts = (1, 4) if args.dry_run else ((1, 8, 32) if args.quick else (1, 4, 8, 16, 32))
        for documents in counts:
            packed_scenario(bench, tokens, documents, heads, head_dim)
    if "window" in scenarios:
        tokens, left = (64, 16) if args.dry_run else (32768, 4096)
        name = f"window {left} over {tokens} tokens"
        dense_scenario(bench, name, 1, tokens, heads, head_dim, (left, 0), 0.0)
    if "softcap" in scenarios:
        batch, tokens = (1, 48) if args.dry_run else (2, 8192)
        dense_scenario(
            bench, f"softcap 50, {batch} x {tokens} tokens", batch, tokens, heads, head_dim, (-1, -1), 50.0
        )
    from attnbench.machine import describe_machine

    machine = describe_machine(bench.device)
    header = (
        f"{machine['card']}, torch {machine['torch']}, triton {machine['triton']}, {args.dtype}, "
        f"H {heads} x D {head_dim}, causal"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"machine": machine, "args": vars(args), "rows": [row.__dict__ for row in bench.rows]}
        args.out.write_text(json.dumps(record, indent=2, default=str))
    print(f"\n{header}\n{table(bench.rows)}")


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    main(sys.argv[1:])
