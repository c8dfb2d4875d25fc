"""Tests of the benchmark harness itself, on CPU: flop counting, the plans, the runner's bookkeeping
(n/a, time budget, sweep order, checks) and the report generated from a results file.

    python -m pytest packages/core/benchmarks/test_bench_harness.py -q
"""

from __future__ import annotations

import contextlib
import itertools
import json
import warnings

import bench
import pytest
import torch
import torch.nn.functional as F
from attnbench.cases import MODEL_WIDTH, TOKENS, Case, full_plan, quick_plan
from attnbench.flops import forward_flops, visible_pairs
from attnbench.providers import MAX_REASON_CHARS, describe_failure
from attnbench.report import markdown_report, summary_text, target_tallies, write_docs
from attnbench.results import load_results, new_results, save_results
from attnbench.runner import Budget, compare, run_plan


def brute_force_pairs(q_len: int, kv_len: int) -> int:
    offset = kv_len - q_len
    return sum(1 for i in range(q_len) for j in range(kv_len) if j <= i + offset)


UNEQUAL_LENGTHS = [
    (q_len, kv_len)
    for q_len, kv_len in itertools.product((1, 2, 5, 16, 128, 333), (1, 3, 16, 100, 4096))
    if q_len != kv_len  # the square case follows the N^2 / 2 convention, tested below
]


@pytest.mark.parametrize(("q_len", "kv_len"), UNEQUAL_LENGTHS)
def test_causal_pairs_with_unequal_lengths_match_a_brute_force_count(q_len, kv_len):
    assert visible_pairs(q_len, kv_len, causal=True) == brute_force_pairs(q_len, kv_len)


def test_square_causal_counts_half_and_full_counts_all():
    assert visible_pairs(1024, 1024, causal=True) == 1024 * 1024 / 2
    assert visible_pairs(7, 9, causal=False) == 63


def test_single_query_row_sees_every_key():
    assert visible_pairs(1, 4096, causal=True) == 4096


def test_pass_flops_are_the_forward_count_times_1_2_5_and_3_5():
    case = Case("main", True, "bf16", 4, 16, 16, 4096, 4096, 128, ("fwd", "bwd", "fwd+bwd"))
    forward = 4 * 4 * 16 * (4096 * 4096 / 2) * 128
    assert forward_flops(4, 16, 4096, 4096, 128, causal=True) == forward
    assert case.flops("fwd") == forward
    assert case.flops("bwd") == 2.5 * forward
    assert case.flops("fwd+bwd") == 3.5 * forward


def test_gqa_flops_count_query_heads_and_bytes_count_kv_heads():
    mha = Case("gqa", False, "fp16", 1, 32, 32, 64, 64, 128, ("fwd",))
    gqa = Case("gqa", False, "fp16", 1, 32, 8, 64, 64, 128, ("fwd",))
    assert gqa.flops("fwd") == mha.flops("fwd")
    assert gqa.forward_bytes() == 2 * (2 * 32 * 64 * 128 + 2 * 8 * 64 * 128)


def test_quick_plan_is_issue_2s_subset():
    cases = quick_plan(("fp16", "bf16"))
    assert len(cases) == 12
    assert {(c.head_dim, c.q_len) for c in cases} == set(itertools.product((64, 128), (1024, 4096, 16384)))
    assert all(c.causal and c.passes == ("fwd", "bwd") for c in cases)


def test_full_plan_runs_the_target_rows_first_and_keeps_the_work_per_step_constant():
    cases = full_plan(("fp16", "bf16"))
    priorities = [c.priority for c in cases]
    assert priorities == sorted(priorities)
    first = {(c.dtype, c.head_dim, c.q_len, c.causal) for c in cases[:12]}
    assert first == {(c.dtype, c.head_dim, c.q_len, c.causal) for c in quick_plan(("fp16", "bf16"))}
    main = [c for c in cases if c.suite == "main"]
    assert len(main) == 2 * 2 * 3 * 7
    assert all(c.q_heads * c.head_dim == MODEL_WIDTH for c in main)
    assert all(c.batch * c.q_len == max(TOKENS, c.q_len) for c in main)
    assert all(c.passes == ("fwd",) and c.causal for c in cases if c.suite == "decode")


class StandInCore:
    """The role of core, played by SDPA's math path (same semantics for square causal cases)."""

    name = "core"
    sweep = 0

    def load(self):
        pass

    def context(self):
        return contextlib.nullcontext()

    def note(self, case):
        return None

    def attention(self, q, k, v, case):
        return F.scaled_dot_product_attention(q, k, v, is_causal=case.causal)


class Recording(StandInCore):
    """A provider that logs its calls, and can refuse every case or be off by a constant."""

    def __init__(self, name, calls, *, sweep=0, fails=False, offset=0.0):
        self.name, self.calls, self.sweep, self.fails, self.offset = name, calls, sweep, fails, offset

    def attention(self, q, k, v, case):
        self.calls.append((self.name, case.id))
        if self.fails:
            warnings.warn("this backend needs D <= 8", UserWarning, stacklevel=1)
            raise RuntimeError("No available kernel")
        return super().attention(q, k, v, case) + self.offset


def tiny_cases(count):
    return [
        Case("main", True, "fp16", 1, 2, 2, 8 * (i + 1), 8 * (i + 1), 16, ("fwd", "bwd", "fwd+bwd"))
        for i in range(count)
    ]


def constant_timer(fn, grad_to_none=()):
    fn()
    return 2.0


def run_tiny(providers, cases, budget):
    records = {case.id: {"providers": {}} for case in cases}
    stop = run_plan(
        cases,
        providers,
        timer=constant_timer,
        device="cpu",
        budget=budget,
        records=records,
        save=lambda: None,
        log=lambda line: None,
    )
    return stop, records


def test_runner_marks_failures_na_with_reasons_and_flags_wrong_outputs():
    calls = []
    providers = [
        Recording("core", calls),
        Recording("flash", calls, fails=True),
        Recording("cudnn", calls, offset=0.5),
    ]
    cases = tiny_cases(1)
    stop, records = run_tiny(providers, cases, Budget(None))
    entries = records[cases[0].id]["providers"]
    assert stop is None
    assert "No available kernel" in entries["flash"]["error"] and "D <= 8" in entries["flash"]["error"]
    assert entries["cudnn"]["check"]["suspect"] is True
    assert entries["core"]["passes"]["bwd"]["tflops"] == pytest.approx(cases[0].flops("bwd") / 2.0 / 1e9)


def test_runner_runs_the_second_sweep_after_the_whole_first_and_stops_on_budget():
    calls = []
    cases = tiny_cases(3)
    stop, _ = run_tiny([Recording("core", calls), Recording("flex", calls, sweep=1)], cases, Budget(None))
    assert stop is None
    assert ("core", cases[-1].id) in calls[: calls.index(("flex", cases[0].id))]

    calls = []  # the clock reads attention calls: 4 per provider and case (first call and 3 passes)
    budget = Budget(seconds=5, clock=lambda: float(len(calls)), started=0.0)
    providers = [Recording("core", calls), Recording("flex", calls, sweep=1)]
    stop, records = run_tiny(providers, cases, budget)
    assert stop is not None and "time budget" in stop
    ran = [name for record in records.values() for name in record["providers"]]
    assert ran == ["core", "core"]


def test_compare_scales_its_threshold_with_the_output():
    reference = torch.full((4,), 2.0)
    assert not compare(reference + 2.0**-10, reference, "fp16")["suspect"]
    assert compare(reference + 0.1, reference, "fp16")["suspect"]
    assert compare(reference * float("nan"), reference, "fp16")["suspect"]


def test_failure_description_carries_the_warnings():
    caught = [warnings.WarningMessage(UserWarning("Flash needs D <= 256"), UserWarning, "f", 1)]
    text = describe_failure(RuntimeError("No available kernel."), caught)
    assert text.startswith("RuntimeError: No available kernel.") and "Flash needs D <= 256" in text


def test_a_long_failure_keeps_its_start_and_its_cause_at_the_end():
    wrapped = "Dynamo failed to run FX node with fake tensors: " + "x" * 2000 + " got No available kernel."
    text = describe_failure(RuntimeError(wrapped), [])
    assert len(text) <= MAX_REASON_CHARS
    assert text.startswith("RuntimeError: Dynamo failed") and text.endswith("got No available kernel.")


def synthetic_results():
    cases = [
        Case("main", True, "bf16", 4, 16, 16, 4096, 4096, 128, ("fwd", "bwd")),
        Case("main", True, "bf16", 16, 16, 16, 1024, 1024, 128, ("fwd", "bwd")),
        Case("decode", True, "bf16", 8, 16, 16, 16, 4096, 128, ("fwd",)),
    ]
    meta = {
        "card": "NVIDIA H100 80GB HBM3",
        "card_slug": "nvidia-h100",
        "sm_count": 132,
        "memory_gib": 79.1,
        "torch": "2.11.0",
        "triton": "3.6.0",
        "cuda": "12.8",
        "cudnn": 91000,
        "date": "2026-01-01 00:00 UTC",
        "mode": "full",
        "timer": {"kind": "do_bench median", "warmup_ms": 10, "rep_ms": 50},
        "providers": ["core", "flash", "cudnn", "flex"],
        "unavailable": {},
        "complete": False,
        "stop_reason": "time budget of 420 s ran out after 11 of 12 provider runs",
        "elapsed_s": 421.0,
    }
    results = new_results(meta, cases)
    results["ceilings"] = {
        "matmul_bf16": {"size": 8192, "tflops": 760.0},
        "copy": {"bytes": 2**30, "gbps": 2900.0},
    }
    results["host"] = {
        "shape": [1, 1, 16, 64],
        "dtype": "fp16",
        "target_us": 20,
        "core": {"us": 14.0},
        "core_requires_grad": {"us": 22.0},
        "sdpa": {"us": 9.0},
        "cuda_graph": {"captured": True, "replay_max_abs_diff": 0.0, "replay_us": 3.0},
    }

    def timed(tflops_by_pass, suspect=False):
        return {
            "note": None,
            "first_call_s": 1.0,
            "check": {"max_abs_diff": 0.5 if suspect else 1e-3, "ref_max_abs": 1.0, "suspect": suspect},
            "passes": {name: {"ms": 1.0, "tflops": value} for name, value in tflops_by_pass.items()},
        }

    big, small, decode = results["cases"]
    big["providers"] = {
        "core": timed({"fwd": 450.0, "bwd": 300.0}),
        "flash": timed({"fwd": 300.0, "bwd": 320.0}),
        "cudnn": {"note": None, "error": "RuntimeError: cuDNN refuses this shape"},
        "flex": timed({"fwd": 400.0, "bwd": 200.0}, suspect=True),
    }
    small["providers"] = {
        "core": timed({"fwd": 200.0, "bwd": 100.0}),
        "flash": timed({"fwd": 100.0, "bwd": 50.0}),
        "cudnn": timed({"fwd": 400.0, "bwd": 200.0}),
    }
    decode["providers"] = {
        "core": {"note": None, "first_call_s": 0.1, "passes": {"fwd": {"ms": 0.5, "tflops": 1}}}
    }
    return results


def test_report_from_a_results_file_has_ratios_reasons_and_plots(tmp_path):
    path = tmp_path / "run.json"
    save_results(synthetic_results(), path)
    results = load_results(path)
    page = write_docs(results, "results/run.json", tmp_path / "docs")
    text = page.read_text()

    assert "NVIDIA H100 80GB HBM3" in text and "torch 2.11.0, triton 3.6.0" in text
    assert "760.0 TFLOP/s" in text and "2900 GB/s" in text and "14.0 us per call" in text
    assert "stopped early: time budget" in text
    big_forward = next(line for line in text.splitlines() if line.startswith("| causal | bf16 | 128 | 4k |"))
    assert "| 450.0 | 300.0 | n/a [1] | 400.0 (!) | 1.50x |  |" in big_forward
    assert "1. RuntimeError: cuDNN refuses this shape" in text
    small_forward = next(
        line for line in text.splitlines() if line.startswith("| causal | bf16 | 128 | 1k |")
    )
    assert small_forward.endswith("| 200.0 | 100.0 | 400.0 | — | 2.00x | 0.50x |")
    decode_bytes = results["cases"][2]["forward_bytes"]
    assert f"| {decode_bytes / 0.5 / 1e6:.1f} |" in text
    assert (tmp_path / "docs" / "img" / "bench" / "main-fwd.png").stat().st_size > 1000
    assert "![main bwd](img/bench/main-bwd.png)" in text


def test_target_tallies_list_the_rows_below_each_baseline():
    tallies = {(t.pass_name, t.baseline): t for t in target_tallies(synthetic_results())}
    assert (tallies["fwd", "flash"].met, tallies["fwd", "flash"].measured) == (2, 2)
    assert tallies["bwd", "flash"].below == [("bf16 D128 N4k", pytest.approx(300 / 320))]
    assert (tallies["fwd", "cudnn"].met, tallies["fwd", "cudnn"].measured) == (0, 1)


def test_summary_names_the_card_and_ends_with_the_results_path():
    lines = summary_text(synthetic_results(), "results/run.json", "docs/benchmarks.md").splitlines()
    assert "NVIDIA H100 80GB HBM3" in lines[0] and "PARTIAL" in lines[0]
    assert any(line.startswith("target bwd core >= FLASH: 1/2 rows") for line in lines)
    assert lines[-1] == "results: results/run.json | docs: docs/benchmarks.md"


def test_report_mode_of_the_cli_regenerates_docs_without_a_gpu(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(synthetic_results()))
    bench.main(["--report", str(path), "--docs", str(tmp_path / "docs")])
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith(f"results: {path}")
    assert "core/FLASH" in markdown_report(load_results(path), "x", {}, tmp_path)


def test_ab_loads_its_baseline_as_a_package_of_its_own():
    """ab.py times a baseline copy of core beside core: the copy must not fall back on core's modules
    (then both sides would run the same kernels and every A/B would read 1.00x)."""
    import pathlib
    import sys

    import ab

    import core
    import core.testing

    baseline = ab.load_baseline(pathlib.Path(core.__file__).parent)
    assert baseline.__name__ == "core_baseline"
    ours, theirs = core.testing.portable, baseline.testing.portable
    assert theirs.plans.backward_dkdv_kernel is theirs.backward.backward_dkdv_kernel
    assert theirs.backward.backward_dkdv_kernel is not ours.backward.backward_dkdv_kernel
    assert theirs.plans.BackwardPlan is not ours.plans.BackwardPlan
    copies = [module for name, module in sys.modules.items() if name.startswith("core_baseline.")]
    assert len(copies) >= 8
    for module in copies:  # every module of the copy imports the copy's modules, never core's
        assert module.__file__.startswith(str(pathlib.Path(baseline.__file__).parent))
        source = pathlib.Path(module.__file__).read_text()
        assert "from core." not in source and "from core import" not in source, module.__name__


def test_bitwise_finds_the_working_tree_equal_to_its_own_copy_and_reports_a_difference(capsys, monkeypatch):
    """run.py bitwise against a copy of the working tree's core: every case equal; with the baseline's
    output moved, the case is reported and the exit status is 1."""
    import pathlib

    import bitwise

    import core
    import core.testing

    if not (core.testing.is_interpreted() or torch.cuda.is_available()):
        pytest.skip("core's kernels run nowhere here: no GPU, and TRITON_INTERPRET=1 was unset at import")
    source = str(pathlib.Path(core.__file__).parent)
    bitwise.main(["--baseline", source, "--quick"])
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith(f"{len(bitwise.cases(True))}/")
    original = bitwise.results

    def nudged(package, *args):
        found = original(package, *args)
        if package is not core:
            found[0] = found[0] + 1
        return found

    monkeypatch.setattr(bitwise, "results", nudged)
    with pytest.raises(SystemExit) as stopped:
        bitwise.main(["--baseline", source, "--quick"])
    assert stopped.value.code == 1
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert lines[-1].startswith(f"0/{len(bitwise.cases(True))} cases bitwise equal")
    assert all(line.startswith("differs: ") and "out by" in line for line in lines[:-1])


def test_portable_persistent_check_rows_and_table():
    """Its rows are the portable family's shapes (the Hopper family takes plain fp16/bf16 D 64 and
    128), and its table flags a row whose two kernels disagree."""
    import portable_persistent_check as check

    quick = check.rows(quick=True)
    assert {(r["dtype"], r["d"]) for r in quick} == {("bf16", 128), ("bf16", 96), ("bf16", 256), ("fp32", 64)}
    assert {r["n"] for r in quick} == {512, 2048} and {r["causal"] for r in quick} == {True, False}
    assert any("window" in r for r in quick) and any("softcap" in r for r in quick)
    assert len(check.rows(quick=False)) > len(quick)
    measured = {"one_tile_tflops": 100.0, "persistent_tflops": 125.0, "ratio": 1.25}
    text = check.table(
        [quick[0] | measured | {"same_bits": True}, quick[1] | measured | {"same_bits": False}], "H100"
    )
    assert "H100" in text and text.count("1.25") == 2 and text.splitlines()[-1].endswith("NO")
