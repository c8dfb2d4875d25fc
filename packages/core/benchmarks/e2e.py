"""End-to-end training benchmark: a random-weight transformers Llama trained through core and through SDPA.

    PYTHONPATH=packages/core/src python packages/core/benchmarks/e2e.py [--quick] [--out FILE.json]
    PYTHONPATH=packages/core/src python packages/core/benchmarks/e2e.py --dry-run   # CPU, tiny model

The model (full run): LlamaForCausalLM with random weights, 8 layers, hidden 2048, 16 query heads over 4
key/value heads (GQA) of dim 128, MLP 5632, vocabulary 32000, parameters in bf16. A step trains on
16384 tokens, batch 8 x N 2048 and 2 x 8192, or on one sequence where N is longer: 1 x 32768. Activations
grow with the tokens, not with N (no attention here stores an N x N matrix), so N 32768 needs about
twice the activation memory of the others; weights, gradients and AdamW state take 4 GB, and the whole
fits an 80 GB H100 with gradient checkpointing off.
--quick runs 2 layers and fewer steps (a smoke run).

One step: forward, the language-model loss (labels = inputs), backward, AdamW step (torch's fused AdamW
on CUDA, lr 1e-5, state in bf16 like the parameters), zero_grad. The model keeps transformers' default
use_cache: without a cache transformers takes position_ids for possibly packed sequences (4.5x always,
5.x under torch.compile) and hands SDPA a materialized mask; the cache costs one K/V copy per layer, the
same for every attention.

Measured for each attention x mode x N, on a fresh model from the same seed:
- attention: core (attn_implementation="core"), sdpa (transformers' "sdpa", SDPA choosing its backend:
  the kernel names recorded say which ran), sdpa-flash (the same inside sdpa_kernel(FLASH_ATTENTION));
- mode: eager, or compiled (torch.compile(model), default mode; the first warmup step compiles, and its
  time is kept apart as first_step_s);
- tokens/s from the median over the timed steps of CUDA-event step times, after the warmup steps;
- attention share: CUDA time of the attention kernels / CUDA time of all kernels, from torch.profiler
  over the profiled steps (kernels by name: core's four Triton kernels; for SDPA, names with
  flash/fmha/cudnn/sdpa that inductor did not generate); the attention kernels' names are kept;
- the first step's loss (the same weights and tokens everywhere, so the attentions must agree) and the
  peak memory allocated.
A configuration that fails (an out-of-memory, a compile that crashes) is recorded with its error and the
run goes on. The JSON is written after every configuration, so a killed run keeps what it measured;
--lengths, --modes and --attentions run a part of the grid.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent

ATTENTIONS = ("core", "sdpa", "sdpa-flash")
MODES = ("eager", "compiled")
CORE_KERNELS = (
    "attention_forward_kernel",
    "backward_dkdv_kernel",
    "backward_dq_kernel",
    "backward_preprocess_kernel",
)
SDPA_KERNEL_MARKERS = ("flash", "fmha", "cudnn", "sdpa")
INDUCTOR_KERNEL_PREFIX = "triton_"  # inductor names its kernels triton_poi_fused_..., after the ops they fuse
SEED = 0


@dataclasses.dataclass(frozen=True)
class Plan:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tokens_per_step: int
    lengths: tuple[int, ...]
    warmup_steps: int
    timed_steps: int
    profiled_steps: int
    device: str
    compile_backend: str

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def batch(self, length: int) -> int:
        """Sequences per step: tokens_per_step / N, or one sequence where N is longer."""
        if length < self.tokens_per_step and self.tokens_per_step % length:
            raise ValueError(f"N={length} does not divide the {self.tokens_per_step} tokens of a step")
        return max(1, self.tokens_per_step // length)

    def describe(self) -> str:
        return (
            f"Llama, {self.layers} layers, hidden {self.hidden}, {self.heads} query heads / {self.kv_heads} "
            f"key-value heads of dim {self.head_dim}, MLP {self.intermediate}, vocabulary {self.vocab}; "
            f"{self.tokens_per_step} tokens per step (one sequence where N is longer); AdamW"
        )


PLANS = {
    "full": Plan(8, 2048, 16, 4, 5632, 32000, 16384, (2048, 8192, 32768), 3, 10, 2, "cuda", "inductor"),
    "quick": Plan(2, 2048, 16, 4, 5632, 32000, 16384, (2048, 8192, 32768), 2, 3, 1, "cuda", "inductor"),
    # CPU, core under the Triton interpreter: the harness end to end; its numbers mean nothing.
    "dry-run": Plan(2, 64, 4, 2, 128, 128, 64, (16, 32), 1, 1, 0, "cpu", "aot_eager"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="plan", action="store_const", const="quick", help="2 layers, few steps")
    mode.add_argument("--dry-run", dest="plan", action="store_const", const="dry-run", help="CPU, tiny model")
    parser.add_argument("--out", type=Path, help="results JSON (default: results/e2e-<card>-<date>.json)")
    parser.add_argument(
        "--attentions", default=",".join(ATTENTIONS), help=f"comma list of {','.join(ATTENTIONS)}"
    )
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {','.join(MODES)}")
    parser.add_argument("--lengths", help="comma list of sequence lengths N (default: the plan's)")
    parser.set_defaults(plan="full")
    args = parser.parse_args(argv)
    for flag, given, known in (("--attentions", args.attentions, ATTENTIONS), ("--modes", args.modes, MODES)):
        unknown = set(given.split(",")) - set(known)
        if unknown:
            parser.error(f"{flag}: unknown {', '.join(sorted(unknown))}; choose from {','.join(known)}")
    plan = PLANS[args.plan]
    if args.lengths:
        try:
            lengths = tuple(int(n) for n in args.lengths.split(","))
            for n in lengths:
                plan.batch(n)
        except ValueError as error:
            parser.error(f"--lengths: {error}")
        plan = dataclasses.replace(plan, lengths=lengths)
    args.plan_settings = plan
    return args


def configurations(plan: Plan, attentions: list[str], modes: list[str]) -> list[dict]:
    """N outermost (the longest last, where a failure is likeliest), then mode, then attention."""
    return [
        {"n": n, "batch": plan.batch(n), "mode": mode, "attention": attention}
        for n in plan.lengths
        for mode in MODES
        if mode in modes
        for attention in ATTENTIONS
        if attention in attentions
    ]


def is_attention_kernel(name: str) -> bool:
    if name.startswith(CORE_KERNELS):
        return True
    lowered = name.lower()
    return not name.startswith(INDUCTOR_KERNEL_PREFIX) and any(
        marker in lowered for marker in SDPA_KERNEL_MARKERS
    )


def attention_share(kernel_times: list[tuple[str, float]]) -> dict:
    """The attention kernels' part of all kernel time, from (kernel name, microseconds) pairs."""
    total = sum(us for _, us in kernel_times)
    attention = {}
    for name, us in kernel_times:
        if is_attention_kernel(name):
            attention[name] = attention.get(name, 0.0) + us
    return {
        "share": sum(attention.values()) / total if total else None,
        "attention_us": sum(attention.values()),
        "all_kernels_us": total,
        "attention_kernels": {
            name: round(us, 1) for name, us in sorted(attention.items(), key=lambda kv: -kv[1])
        },
    }


def build_model(plan: Plan, attention: str):
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=plan.vocab,
        hidden_size=plan.hidden,
        intermediate_size=plan.intermediate,
        num_hidden_layers=plan.layers,
        num_attention_heads=plan.heads,
        num_key_value_heads=plan.kv_heads,
        head_dim=plan.head_dim,
        max_position_embeddings=max(plan.lengths),
    )
    torch.manual_seed(SEED)
    with torch.device(plan.device):
        model = transformers.AutoModelForCausalLM.from_config(
            config, attn_implementation="core" if attention == "core" else "sdpa"
        )
    return model.to(torch.bfloat16).train()


def sdpa_backend(attention: str):
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION) if attention == "sdpa-flash" else contextlib.nullcontext()


def step_time_ms(step, device: str) -> float:
    import torch

    if device != "cuda":
        started = time.perf_counter()
        step()
        return (time.perf_counter() - started) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def profiled_kernel_times(step, steps: int) -> list[tuple[str, float]]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return [
        (event.key, event.self_device_time_total)
        for event in profiler.key_averages()
        if event.device_type == torch.autograd.DeviceType.CUDA
    ]


def measure(plan: Plan, configuration: dict) -> dict:
    """Train a fresh model for warmup + timed (+ profiled) steps under one configuration."""
    import torch

    model = build_model(plan, configuration["attention"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=plan.device == "cuda")
    runs = model
    if configuration["mode"] == "compiled":
        torch._dynamo.reset()  # each attention compiles its own graphs, inside its own SDPA backend choice
        runs = torch.compile(model, backend=plan.compile_backend)
    generator = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(0, plan.vocab, (configuration["batch"], configuration["n"]), generator=generator)
    ids = ids.to(plan.device)

    def step() -> torch.Tensor:
        with sdpa_backend(configuration["attention"]):
            loss = runs(input_ids=ids, labels=ids).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    if plan.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    first_loss = step().item()  # a compiled model compiles here
    first_step_s = time.perf_counter() - started
    for _ in range(plan.warmup_steps - 1):
        step()
    times = [step_time_ms(step, plan.device) for _ in range(plan.timed_steps)]
    result = {
        "first_step_s": first_step_s,
        "first_loss": first_loss,
        "step_ms": statistics.median(times),
        "step_ms_all": times,
        "tokens_per_s": configuration["batch"] * configuration["n"] / statistics.median(times) * 1e3,
    }
    if plan.device == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if plan.profiled_steps:
            result["attention_time"] = attention_share(profiled_kernel_times(step, plan.profiled_steps))
    return result


def release_memory() -> None:
    import torch

    torch._dynamo.reset()  # compiled graphs may hold on to the last model's tensors
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def describe_run(plan_name: str, plan: Plan, argv: list[str]) -> dict:
    import transformers
    from attnbench.machine import describe_machine

    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        **describe_machine(plan.device),
        "transformers": transformers.__version__,
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "stamp": now.strftime("%Y%m%d-%H%M"),
        "plan": plan_name,
        "model": plan.describe(),
        "settings": dataclasses.asdict(plan),
        "argv": argv,
    }


def shortened(text: str, limit: int = 90) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_table(results: dict) -> str:
    """Header lines (model, card, versions, date) and one row per configuration; tokens/s also as a ratio
    to SDPA's default backend in the same mode and N."""
    from attnbench.report import text_table

    meta = results["meta"]
    baseline = {
        (row["n"], row["mode"]): row["tokens_per_s"]
        for row in results["runs"]
        if row["attention"] == "sdpa" and "tokens_per_s" in row
    }
    grid = [
        ["N", "batch", "attention", "mode", "tokens/s", "step ms", "attention %", "vs sdpa", "loss", "GiB"]
    ]
    for row in results["runs"]:
        keys = [str(row["n"]), str(row["batch"]), row["attention"], row["mode"]]
        if "error" in row:
            grid.append([*keys, f"error: {shortened(row['error'])}", "", "", "", "", ""])
            continue
        share = row.get("attention_time", {}).get("share")
        reference = baseline.get((row["n"], row["mode"]))
        grid.append(
            [
                *keys,
                f"{row['tokens_per_s']:.0f}",
                f"{row['step_ms']:.1f}",
                "n/a" if share is None else f"{100 * share:.1f}",
                "" if reference is None else f"{row['tokens_per_s'] / reference:.2f}x",
                f"{row['first_loss']:.4f}",
                f"{row['peak_memory_gib']:.1f}" if "peak_memory_gib" in row else "n/a",
            ]
        )
    header = [
        f"e2e training: {meta['model']}",
        f"{meta['card']} | torch {meta['torch']} | triton {meta['triton']} | "
        f"transformers {meta['transformers']} | {meta['date']}",
    ]
    return "\n".join([*header, text_table(grid)])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    plan = args.plan_settings
    if plan.device == "cpu":  # must be set before core's kernels are imported
        os.environ.setdefault("TRITON_INTERPRET", "1")

    import torch
    from attnbench.machine import guarded
    from attnbench.results import save_results

    import core.integrations.transformers

    if plan.device == "cuda" and not torch.cuda.is_available():
        sys.exit("e2e.py: no CUDA device; --dry-run runs the harness on a CPU")
    core.integrations.transformers.register()
    meta = describe_run(args.plan, plan, sys.argv[1:] if argv is None else argv)
    default_dir = (
        Path(tempfile.mkdtemp(prefix="e2e-dry-run-")) if plan.device == "cpu" else BENCH_DIR / "results"
    )
    path = args.out or default_dir / f"e2e-{meta['card_slug']}-{meta['stamp']}.json"
    results = {"meta": meta, "runs": []}
    print(f"{meta['card']}: {plan.describe()} -> {path}", flush=True)
    for configuration in configurations(plan, args.attentions.split(","), args.modes.split(",")):
        outcome = guarded(lambda configuration=configuration: measure(plan, configuration))
        release_memory()
        results["runs"].append({**configuration, **outcome})
        save_results(results, path)
        summary = outcome.get("error") or f"{outcome['tokens_per_s']:.0f} tokens/s"
        print(
            f"N {configuration['n']} {configuration['mode']} {configuration['attention']}: {summary}",
            flush=True,
        )
    print(format_table(results), flush=True)
    return results


if __name__ == "__main__":
    main()
