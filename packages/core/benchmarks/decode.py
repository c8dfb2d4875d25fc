"""Decode with a KV cache: core.attention_with_kvcache (split-KV) against SDPA's FLASH and CUDNN backends and
core's portable path, in bytes moved per second against the card's measured copy bandwidth.

    python packages/core/benchmarks/run.py decode [--quick] [--out FILE.json] [--providers core,flash,...]
    python packages/core/benchmarks/run.py decode --sweep     # core's tile and split variants, quick rows
    python packages/core/benchmarks/run.py decode --dry-run   # CPU: tiny rows through the whole harness

Rows: batch 1, 4, 8, 32; cached keys 1k, 8k, 32k, 128k (every sequence full); 1 and 4 new queries
(decoding, speculative decoding); GQA 32/8 and MHA 32/32; a dense cache and a paged one (pages of 256
keys, vLLM's (blocks, page, H, D) layout read through its transposed view, a shuffled block table); bf16,
D 128, causal (bottom-right). Rows whose caches would not fit the card are skipped and say so.

Providers (every one is checked against core's output before it is timed: the bench's 16-ulp rule):
- core: core.attention_with_kvcache on the row's cache (dense or paged);
- attention: core.attention(q, k, v) on the dense cache, which routes decode shapes to the same kernels;
- portable: core.attention forced onto the portable family (one program per query tile);
- flash, cudnn: F.scaled_dot_product_attention on the dense cache restricted to that backend. One query
  sees every key (non-causal call). Several queries need the bottom-right mask: FLASH runs its aten op,
  whose causal is bottom-right (k, v expanded for GQA, which it takes no other way), CUDNN an explicit
  boolean mask. GQA goes through enable_gqa, or expanded k, v where a backend refuses it (noted).
  Paged rows time core alone: SDPA reads no paged cache, and its dense numbers stand beside them.

Bandwidth counts the bytes a decode step must move: the cached keys and values once, q and the output.
The ceiling is a large device-to-device copy timed in the same run (read + write). Timings are
triton.testing.do_bench medians with the L2 cache flushed before each call. The table is printed last.

--kernels lists, for the quick dense rows, each GPU kernel a step launches and its mean time (torch.profiler,
20 steps), for core and the SDPA backends: which launch of a step (split, merge) costs what.

--sweep times core alone on the quick rows under other tiles (keys per tile, warps, stages) and split
rules (programs per SM), through core.testing.decode: the data behind the decode family's config.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from attnbench.runner import compare

HEAD_DIM = 128
PAGE = 256
DRY_RUN_PAGE = 16
Q_HEADS = 32
DTYPE = torch.bfloat16
PROVIDERS = ("core", "attention", "portable", "flash", "cudnn")
QUICK_PROVIDERS = ("core", "portable", "flash", "cudnn")
COPY_BYTES = 2**30
# Leave room on the card for the providers' own buffers (SDPA's expanded k, v, masks, outputs).
MEMORY_HEADROOM = 0.75


@dataclass(frozen=True)
class Row:
    batch: int
    cache: int
    n_queries: int
    kv_heads: int
    page: int  # 0: a dense cache

    @property
    def paged(self) -> bool:
        return self.page > 0

    @property
    def label(self) -> str:
        heads = "MHA" if self.kv_heads == Q_HEADS else f"GQA {Q_HEADS}/{self.kv_heads}"
        layout = f"paged {self.page}" if self.paged else "dense"
        length = f"{self.cache // 1024}k" if self.cache >= 1024 else str(self.cache)
        return f"B{self.batch} N{length} Nq{self.n_queries} {heads} {layout}"

    def cache_bytes(self) -> int:
        return 2 * self.batch * self.kv_heads * self.cache * HEAD_DIM * DTYPE.itemsize

    def moved_bytes(self) -> int:
        """What one step must read and write at least: the cache once, the queries in, the output out."""
        return self.cache_bytes() + 2 * self.batch * Q_HEADS * self.n_queries * HEAD_DIM * DTYPE.itemsize


def rows(mode: str) -> list[Row]:
    if mode == "quick":
        grid = itertools.product((1, 8, 32), (8192, 32768), (1,), (8, 32), (0, PAGE))
    elif mode == "dry-run":
        grid = itertools.product((1,), (64,), (1, 4), (8, 32), (0, DRY_RUN_PAGE))
    else:
        grid = itertools.product((1, 4, 8, 32), (1024, 8192, 32768, 131072), (1, 4), (8, 32), (0, PAGE))
    return [Row(*values) for values in grid]


def device() -> str:
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


class Step:
    """The tensors of one row: q, the cache as core reads it (dense BHSD, or vLLM-layout pages through a
    transposed view with a shuffled block table) and the same keys and values dense for SDPA."""

    def __init__(self, row: Row, seed: int = 0):
        generator = torch.Generator(device=device()).manual_seed(seed)

        def normal(*shape):
            return torch.randn(shape, generator=generator, device=device(), dtype=DTYPE)

        self.q = normal(row.batch, Q_HEADS, row.n_queries, HEAD_DIM)
        self.k = normal(row.batch, row.kv_heads, row.cache, HEAD_DIM)
        self.v = normal(row.batch, row.kv_heads, row.cache, HEAD_DIM)
        self.seqlens = torch.full((row.batch,), row.cache, dtype=torch.int32, device=device())
        self.block_table = None
        if row.paged:
            pages = row.cache // row.page
            order = torch.randperm(row.batch * pages, generator=generator, device=device())
            self.block_table = order.view(row.batch, pages).to(torch.int32)
            self.k_cache, self.v_cache = (self._paged(t, order, pages, row.page) for t in (self.k, self.v))
            del self.k, self.v  # the dense copies are not needed: SDPA does not run on paged rows
        else:
            self.k_cache, self.v_cache = self.k, self.v

    @staticmethod
    def _paged(dense: torch.Tensor, order: torch.Tensor, pages: int, page: int) -> torch.Tensor:
        """The keys of `dense` (B, H, N, D) in pages (blocks, page, H, D), page i of sequence b in block
        order[b * pages + i], seen as (blocks, H, page, D)."""
        batch, heads = dense.shape[:2]
        blocks = dense.new_empty(batch * pages, page, heads, HEAD_DIM)
        blocks[order] = dense.view(batch, heads, pages, page, HEAD_DIM).permute(0, 2, 3, 1, 4).flatten(0, 1)
        return blocks.transpose(1, 2)


def provider_call(name: str, row: Row, step: Step):
    """(the call to time, a note on how it was asked) for one provider, or raise ValueError: n/a."""
    import core
    import core.testing

    if name == "core":
        return (
            lambda: core.attention_with_kvcache(
                step.q, step.k_cache, step.v_cache, cache_seqlens=step.seqlens, block_table=step.block_table
            ),
            None,
        )
    if row.paged:
        raise ValueError("paged cache: SDPA and core.attention read dense keys (see the dense row)")
    if name == "attention":
        return lambda: core.attention(step.q, step.k, step.v, causal=True), None
    if name == "portable":

        def portable():
            with core.testing.use_family("portable"):
                return core.attention(step.q, step.k, step.v, causal=True)

        return portable, None
    return sdpa_call(name, row, step)


def sdpa_call(name: str, row: Row, step: Step):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[name]
    gqa = row.kv_heads != Q_HEADS
    q, k, v = step.q, step.k, step.v
    if row.n_queries > 1 and name == "flash":
        # The aten op aligns causal bottom-right, but takes no GQA: k, v expanded (outside the timing).
        if gqa:
            k, v = (t.repeat_interleave(Q_HEADS // row.kv_heads, dim=1) for t in (k, v))
        note = "aten flash op, causal bottom-right" + (", k/v expanded" if gqa else "")
        return lambda: torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True)[0], note
    mask, note = None, "one query: non-causal call (it sees every key)"
    if row.n_queries > 1:
        queries = torch.arange(row.n_queries, device=device())[:, None]
        mask = torch.arange(row.cache, device=device())[None, :] <= queries + (row.cache - row.n_queries)
        note = "explicit bottom-right boolean mask"

    def attend(k=k, v=v, gqa=gqa):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    try:
        attend()
    except RuntimeError:
        if not gqa:
            raise
        expanded = [t.repeat_interleave(Q_HEADS // row.kv_heads, dim=1) for t in (k, v)]
        note += "; enable_gqa refused: k/v expanded"
        return lambda: attend(*expanded, False), note
    return attend, note


def measure_copy_gbps(timer, size: int = COPY_BYTES) -> float:
    source = torch.empty(size, device=device(), dtype=torch.uint8)
    target = torch.empty_like(source)
    milliseconds = timer(lambda: target.copy_(source))
    return 2 * size / milliseconds / 1e6


def run_row(row: Row, providers, timer, copy_gbps: float) -> dict:
    """Check and time every provider on one row; core runs first and is the others' reference."""
    result: dict = {"row": asdict(row), "label": row.label, "providers": {}}
    free = torch.cuda.mem_get_info()[0] if device() == "cuda" else float("inf")
    needed = row.cache_bytes() * (2 if row.paged else 1)  # a paged cache is built from a dense one
    if needed > MEMORY_HEADROOM * free:
        result["skipped"] = f"needs {needed / 2**30:.1f} GiB for its cache ({free / 2**30:.1f} free)"
        return result
    try:
        step = Step(row)
    except torch.cuda.OutOfMemoryError:
        result["skipped"] = "out of memory building the cache"
        return result
    reference = None
    for name in providers:
        entry = result["providers"][name] = {}
        try:
            call, note = provider_call(name, row, step)
            output = call()
            if reference is not None:
                entry.update(compare(output, reference, "bf16"))
            entry["note"] = note
            milliseconds = timer(call)
        except (ValueError, RuntimeError) as failure:  # refused, out of memory, unsupported
            entry["error"] = " ".join(str(failure).split())[:200]
            torch.cuda.empty_cache()
            if name == "core":
                break  # nothing to check the others against
            continue
        if name == "core":
            reference = output
        entry["us"] = milliseconds * 1e3
        entry["gbps"] = row.moved_bytes() / milliseconds / 1e6
        entry["of_copy"] = entry["gbps"] / copy_gbps
    del step, reference
    torch.cuda.empty_cache()
    return result


def table(results: list[dict], providers, copy_gbps: float) -> str:
    lines = [f"copy ceiling {copy_gbps:.0f} GB/s (read + write); us per step, core's GB/s and share of it"]
    header = (
        f"{'row':<34}"
        + "".join(f"{name:>11}" for name in providers)
        + f"{'GB/s':>8}{'copy%':>7}{'vs SDPA':>9}"
    )
    lines.append(header)
    for result in results:
        if "skipped" in result:
            lines.append(f"{result['label']:<34}  skipped: {result['skipped']}")
            continue
        cells = []
        for name in providers:
            entry = result["providers"].get(name, {})
            cell = f"{entry['us']:.1f}" if "us" in entry else "n/a"
            cells.append(cell + ("!" if entry.get("suspect") else ""))
        core_entry = result["providers"].get("core", {})
        sdpa = [result["providers"].get(n, {}).get("us") for n in ("flash", "cudnn")]
        sdpa = [t for t in sdpa if t is not None]
        speedup = f"{min(sdpa) / core_entry['us']:.2f}x" if sdpa and "us" in core_entry else "-"
        bandwidth = f"{core_entry['gbps']:.0f}" if "gbps" in core_entry else "-"
        share = f"{100 * core_entry['of_copy']:.0f}" if "of_copy" in core_entry else "-"
        lines.append(
            f"{result['label']:<34}"
            + "".join(f"{c:>11}" for c in cells)
            + f"{bandwidth:>8}{share:>7}{speedup:>9}"
        )
    lines.append(
        "'!': more than 16 ulps from core's output (suspect); 'vs SDPA': best of FLASH, CUDNN / core"
    )
    return "\n".join(lines)


# (label "keys/warps/stages x programs per SM", keys per tile, warps, stages for a dense cache (paged: two
# more), programs per SM the split rule fills, whether it balances tiles: config.BALANCE_TILES, label "b";
# from how many splits on the merge is launched early: config.OVERLAP_MERGE_FROM_SPLITS, None for never,
# label "pdl" from 2, "pdl16" from 16). "64/4w/3s x2b pdl16" is the table's current choice.
SWEEP = [
    ("64/4w/3s x2", 64, 4, 3, 2, False, None),
    ("64/4w/3s x2b", 64, 4, 3, 2, True, None),
    ("64/4w/3s x2b pdl", 64, 4, 3, 2, True, 2),
    ("64/4w/3s x2b pdl16", 64, 4, 3, 2, True, 16),
    ("64/4w/4s x2", 64, 4, 4, 2, False, None),
    ("64/4w/2s x2", 64, 4, 2, 2, False, None),
    ("128/4w/3s x2", 128, 4, 3, 2, False, None),
    ("32/4w/4s x2", 32, 4, 4, 2, False, None),
    ("32/4w/4s x2b", 32, 4, 4, 2, True, None),
    ("64/8w/3s x2", 64, 8, 3, 2, False, None),
    ("64/4w/3s x1", 64, 4, 3, 1, False, None),
    ("64/4w/3s x4", 64, 4, 3, 4, False, None),
]


def sweep(timer, copy_gbps: float, mode: str, labels=None, others=()) -> str:
    """Core's us per step on the rows for every SWEEP variant (or those `labels` name), as a table; the
    `others` providers (e.g. cudnn) timed once, beside the first variant, as the last columns."""
    import core.testing

    config = core.testing.decode.config
    free = torch.cuda.mem_get_info()[0] if device() == "cuda" else float("inf")
    table_rows = [row for row in rows(mode) if row.cache_bytes() < 0.5 * free]
    timings: dict = {}
    knobs = ("decode_config", "PROGRAMS_PER_SM", "BALANCE_TILES", "OVERLAP_MERGE_FROM_SPLITS")
    original = {knob: getattr(config, knob) for knob in knobs}
    variants = [entry for entry in SWEEP if labels is None or entry[0] in labels]
    unknown = set(labels or ()) - {entry[0] for entry in SWEEP}
    if unknown:
        raise SystemExit(f"unknown sweep variants {sorted(unknown)}; choose from {[e[0] for e in SWEEP]}")
    try:
        for index, (label, block_n, warps, stages, per_sm, balance, overlap_from) in enumerate(variants):

            def variant(
                rows_, block_d, dtype, paged, interpreted, block_n=block_n, warps=warps, stages=stages
            ):
                return config.DecodeConfig(config.block_m_for(rows_), block_n, warps, stages + 2 * paged)

            config.decode_config, config.PROGRAMS_PER_SM, config.BALANCE_TILES = variant, per_sm, balance
            config.OVERLAP_MERGE_FROM_SPLITS = overlap_from
            core.testing.clear_plans()
            for row in table_rows:
                result = run_row(row, ["core", *(others if index == 0 else ())], timer, copy_gbps)
                timings[label, row] = result["providers"].get("core", {}).get("us")
                for other in others if index == 0 else ():
                    timings[other, row] = result["providers"].get(other, {}).get("us")
            print(f"{label}: done")
    finally:
        for knob, value in original.items():
            setattr(config, knob, value)
        core.testing.clear_plans()
    columns = [label for label, *_ in variants] + list(others)
    lines = [f"{'row':<34}" + "".join(f"{label:>14}" for label in columns)]
    for row in table_rows:
        cells = [timings.get((label, row)) for label in columns]
        lines.append(f"{row.label:<34}" + "".join(f"{'n/a' if c is None else f'{c:.1f}':>14}" for c in cells))
    beside = f"; {', '.join(others)} beside the first variant" if others else " only"
    return f"us per step (core{beside})\n" + "\n".join(lines)


def kernel_breakdown(providers, mode: str, steps: int = 20) -> str:
    """Each provider's GPU kernels per step on the quick dense rows: name, launches per step, mean us."""
    from torch.profiler import ProfilerActivity, profile

    lines = []
    for row in [row for row in rows(mode) if not row.paged and row.batch < 32]:
        step = Step(row)
        for name in providers:
            try:
                call, _ = provider_call(name, row, step)
                call()
            except (ValueError, RuntimeError) as error:  # n/a, or a backend that refuses this row
                lines.append(f"{row.label:<30} {name:<9} n/a: {str(error).splitlines()[0][:80]}")
                continue
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as trace:
                for _ in range(steps):
                    call()
                if device() == "cuda":
                    torch.cuda.synchronize()
            for event in trace.key_averages():
                if event.device_type.name != "CUDA" or event.count < steps:
                    continue
                mean = event.self_device_time_total / event.count
                lines.append(
                    f"{row.label:<30} {name:<9} x{event.count // steps} {mean:8.1f} us  {event.key[:70]}"
                )
    return "kernels per step (mean us per launch)\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", dest="mode", action="store_const", const="quick", help="B 1/8/32, 8k/32k, Nq 1"
    )
    mode.add_argument("--dry-run", dest="mode", action="store_const", const="dry-run", help="CPU, tiny rows")
    parser.add_argument("--providers", help=f"comma list of {','.join(PROVIDERS)} (core always runs first)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--sweep", action="store_true", help="time core's tile and split variants instead")
    parser.add_argument(
        "--variants", help="with --sweep: comma list of SWEEP labels (default all); --providers adds columns"
    )
    parser.add_argument("--kernels", action="store_true", help="each provider's kernels per step instead")
    parser.add_argument("--warmup-ms", type=int, default=25)
    parser.add_argument("--rep-ms", type=int, default=100)
    args = parser.parse_args(argv)
    mode = args.mode or "full"
    if mode == "dry-run":  # must be set before core's kernels are imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        raise SystemExit("the decode benchmark needs a CUDA GPU (or --dry-run on a CPU)")
    chosen = (
        args.providers.split(",")
        if args.providers
        else list(QUICK_PROVIDERS if mode == "quick" else PROVIDERS)
    )
    unknown = set(chosen) - set(PROVIDERS)
    if unknown:
        raise SystemExit(f"unknown providers {sorted(unknown)}; choose from {','.join(PROVIDERS)}")
    providers = ["core", *[name for name in chosen if name != "core"]]

    if mode == "dry-run":

        def timer(call):  # wall clock: meaningless numbers, it only runs the harness end to end
            started = time.perf_counter()
            call()
            return (time.perf_counter() - started) * 1e3

        card = "cpu (dry run: meaningless numbers)"
    else:
        from triton.testing import do_bench

        def timer(call):
            return do_bench(call, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")

        card = torch.cuda.get_device_name()

    started = time.monotonic()
    copy_gbps = measure_copy_gbps(timer, COPY_BYTES if mode != "dry-run" else 2**24)
    # The first row a process timed ran slow for every provider alike (docs/log/perf.md): one untimed
    # pass over a row first.
    run_row(rows(mode)[0], providers, timer, copy_gbps)
    if args.sweep:
        labels = args.variants.split(",") if args.variants else None
        others = [name for name in providers if name != "core"] if args.providers else []
        print(sweep(timer, copy_gbps, "dry-run" if mode == "dry-run" else "quick", labels, others))
        return
    if args.kernels:
        print(kernel_breakdown(providers, "dry-run" if mode == "dry-run" else "quick"))
        return
    results = []
    for row in rows(mode):
        results.append(run_row(row, providers, timer, copy_gbps))
        print(f"{row.label}: {json.dumps(results[-1]['providers'].get('core', results[-1].get('skipped')))}")
        if args.out:
            args.out.write_text(
                json.dumps({"card": card, "copy_gbps": copy_gbps, "results": results}, indent=1, default=str)
            )
    print(f"\n{card}, torch {torch.__version__}, {time.monotonic() - started:.0f} s")
    print(table(results, providers, copy_gbps))
