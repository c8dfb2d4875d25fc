"""Running a plan: for every case and provider, check the output against core's, then time each pass.

Core, FLASH and CUDNN (sweep 0) cover the whole plan first; EFFICIENT and Flex (sweep 1, Flex
compiling every shape for seconds) follow over the same cases in the same priority order. When the
time budget runs out, what is missing is context on the low-priority rows, never a ratio the targets
are judged on. The results are saved after every case, so even a run that is killed keeps its data.

What a pass times (inputs of training cases require grad, so "fwd" is the training forward that
also saves what backward needs):
- fwd: one forward call.
- bwd: the backward call alone, `out.backward(grad, retain_graph=True)` on one recorded forward, so no
  forward recomputation is in it; the input gradients are reset to None before each call.
- fwd+bwd: a forward call and its backward.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from attnbench.providers import ProviderError, explained_failures
from attnbench.results import LABELS

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
EPS = {"fp16": 2.0**-10, "bf16": 2.0**-7}
# Flash-attention kernels differ from one another by a few units in the last place of the largest
# output; a wrong mask or a wrong kernel is off by far more. 16 ulps separates the two.
SUSPECT_ULPS = 16


@dataclass
class Budget:
    """Wall-clock seconds the measurements may take, counted from `started` (None: no limit)."""

    seconds: float | None
    clock: Callable[[], float] = time.monotonic
    started: float | None = None

    def __post_init__(self):
        if self.started is None:
            self.started = self.clock()

    def spent(self) -> float:
        return self.clock() - self.started

    def exhausted(self) -> bool:
        return self.seconds is not None and self.spent() >= self.seconds


@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    grad_out: torch.Tensor


def make_inputs(case, device: str, seed: int) -> Inputs:
    """Standard-normal q, k, v and output gradient; the same seed gives the same tensors in every sweep."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def normal(heads: int, length: int) -> torch.Tensor:
        shape = (case.batch, heads, length, case.head_dim)
        return torch.randn(shape, generator=generator, device=device, dtype=DTYPES[case.dtype])

    q = normal(case.q_heads, case.q_len).requires_grad_(case.needs_grad)
    k = normal(case.kv_heads, case.kv_len).requires_grad_(case.needs_grad)
    v = normal(case.kv_heads, case.kv_len).requires_grad_(case.needs_grad)
    return Inputs(q, k, v, grad_out=normal(case.q_heads, case.q_len))


def compare(output: torch.Tensor, reference: torch.Tensor, dtype: str) -> dict:
    """Max abs difference to core's output, and whether it is too large to be rounding."""
    if output.shape != reference.shape:
        return {"suspect": True, "error": f"shape {tuple(output.shape)} != core's {tuple(reference.shape)}"}
    difference = (output.float() - reference.float()).abs().max().item()
    scale = reference.float().abs().max().item()
    suspect = not math.isfinite(difference) or difference > SUSPECT_ULPS * EPS[dtype] * scale
    return {"max_abs_diff": difference, "ref_max_abs": scale, "suspect": suspect}


def time_pass(pass_name: str, attend: Callable, inputs: Inputs, timer) -> float:
    leaves = (inputs.q, inputs.k, inputs.v)
    if pass_name == "fwd":
        return timer(attend)
    if pass_name == "bwd":
        recorded = attend()
        return timer(lambda: recorded.backward(inputs.grad_out, retain_graph=True), grad_to_none=leaves)
    return timer(lambda: attend().backward(inputs.grad_out), grad_to_none=leaves)


def run_provider(provider, case, inputs: Inputs, reference, timer, synchronize) -> tuple[dict, object]:
    """One provider on one case: first call (timed, includes compiling), check, then every pass."""
    entry: dict = {"note": provider.note(case)}

    def attend():
        return provider.attention(inputs.q, inputs.k, inputs.v, case)

    with provider.context():
        try:
            with explained_failures():
                started = time.perf_counter()
                output = attend().detach()
                synchronize()
                entry["first_call_s"] = time.perf_counter() - started
        except ProviderError as failure:
            entry["error"] = str(failure)
            return entry, None
        if reference is not None:
            entry["check"] = compare(output, reference, case.dtype)
        entry["passes"] = {}
        for pass_name in case.passes:
            try:
                with explained_failures():
                    milliseconds = time_pass(pass_name, attend, inputs, timer)
                tflops = case.flops(pass_name) / milliseconds / 1e9
                entry["passes"][pass_name] = {"ms": milliseconds, "tflops": tflops}
            except ProviderError as failure:
                entry["passes"][pass_name] = {"error": str(failure)}
    return entry, output


def core_output(core, case, inputs: Inputs):
    """Core's forward output for the sweep that does not run core itself (None if core cannot)."""
    if core is None:
        return None
    try:
        with explained_failures():
            return core.attention(inputs.q, inputs.k, inputs.v, case).detach()
    except ProviderError:
        return None


def progress_line(case, provider, entry: dict, budget: Budget) -> str:
    head = f"[{budget.spent():6.1f}s] {case.id:<52} {LABELS[provider.name]:<9}"
    if "error" in entry:
        return f"{head} n/a: {entry['error'][:140]}"
    timings = " ".join(
        f"{name} {result['tflops']:7.1f}" if "tflops" in result else f"{name}     n/a"
        for name, result in entry["passes"].items()
    )
    check = entry.get("check")
    checked = "" if check is None else f" | diff {check.get('max_abs_diff', float('nan')):.1e}"
    suspect = " SUSPECT" if check and check["suspect"] else ""
    return f"{head} {timings}{checked}{suspect} | first call {entry['first_call_s']:.1f}s"


def run_plan(cases, providers, *, timer, device, budget: Budget, records: dict, save, log) -> str | None:
    """Fill `records[case.id]["providers"]`; return why the run stopped early, or None if it did not."""
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    core = next((provider for provider in providers if provider.name == "core"), None)
    sweeps = [[p for p in providers if p.sweep == rank] for rank in sorted({p.sweep for p in providers})]
    total = len(cases) * len(providers)
    done = 0
    for sweep in sweeps:
        for seed, case in enumerate(cases):
            inputs = make_inputs(case, device, seed)
            reference = None if core in sweep else core_output(core, case, inputs)
            for provider in sweep:
                if budget.exhausted():
                    save()
                    return (
                        f"time budget of {budget.seconds:.0f} s ran out after {done} of {total} provider runs"
                    )
                entry, output = run_provider(provider, case, inputs, reference, timer, synchronize)
                records[case.id]["providers"][provider.name] = entry
                log(progress_line(case, provider, entry, budget))
                if provider is core:
                    reference = output
                done += 1
            save()
    return None
