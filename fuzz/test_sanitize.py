"""The compute-sanitizer sweep's CPU side (fuzz/sanitize.py): drawing the problems, reading the sanitizer's
summaries, writing the table, and one sweep end to end with a stand-in for compute-sanitizer that runs
the child (under the interpreter here) and prints a clean summary."""

from __future__ import annotations

import json
import stat
import sys

import torch

from fuzz import sanitize, sharding
from fuzz.cases import Case, Layout, Problem


def test_the_problems_cover_every_family_path_and_kind_of_layout():
    problems = sanitize.draw_problems(50, seed=0)
    assert len(problems) == 50
    families = {(p.case.problem.dtype, p.case.problem.causal, p.path) for p in problems}
    for dtype, causal in sharding.KERNELS:
        paths = {"pointers"} if dtype == torch.float32 else {"pointers", "descriptors"}
        assert {path for d, c, path in families if (d, c) == (dtype, causal)} == paths
    shapes = [p.case.problem for p in problems]
    assert any(s.q_heads > s.kv_heads for s in shapes), "GQA"
    assert any(s.n_queries % 2 and s.n_keys % 2 for s in shapes), "odd lengths"
    assert min(s.head_dim for s in shapes) <= 8 and max(s.head_dim for s in shapes) >= 200
    layouts = {layout for p in problems for layout in p.case.layouts}
    assert Layout() in layouts and Layout(order=(0, 2, 1, 3)) in layouts
    assert any(layout.steps or layout.pads or layout.broadcast for layout in layouts), "sliced views"
    assert [p.case for p in sanitize.draw_problems(6, seed=0)] == [p.case for p in problems[:6]]


MEMCHECK_CLEAN = """\
========= COMPUTE-SANITIZER
KERNEL_PATH {"forward": {"plan": "core.kernels.portable.plans", "launch": {"TENSOR_DESCRIPTORS": true}}, \
"backward": {"plan": "core.kernels.portable.plans", "preprocess": {}, "dq": {"TENSOR_DESCRIPTORS": false}, \
"dkdv": {"TENSOR_DESCRIPTORS": true}}}
SANITIZE_CHILD_DONE
========= ERROR SUMMARY: 0 errors
"""
MEMCHECK_ERRORS = """\
========= Invalid __global__ read of size 2 bytes
=========     at attention_forward_kernel+0x1c30
SANITIZE_CHILD_DONE
========= ERROR SUMMARY: 3 errors
"""
RACECHECK = """\
SANITIZE_CHILD_DONE
========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)
"""
CRASHED = "========= Program hit cudaErrorIllegalAddress\n========= ERROR SUMMARY: 0 errors\n"


def test_the_summaries_are_read_with_the_child_s_own_lines():
    clean = sanitize.parse_output(MEMCHECK_CLEAN)
    assert (clean.errors, clean.warnings, clean.finished) == (0, 0, True)
    assert sanitize.path_taken(clean.kernel_path) == "descriptors (fwd, dkdv)"
    assert sanitize.status_of(clean, 0) == "clean"
    errors = sanitize.parse_output(MEMCHECK_ERRORS)
    assert errors.errors == 3 and sanitize.status_of(errors, 0) == "ERRORS"
    races = sanitize.parse_output(RACECHECK)
    assert (races.errors, races.warnings) == (1, 1) and sanitize.status_of(races, 0) == "ERRORS"
    crashed = sanitize.parse_output(CRASHED)  # "0 errors", but the child never got to its end
    assert crashed.errors == 0 and sanitize.status_of(crashed, 1) == "child failed (exit 1)"
    assert sanitize.status_of(sanitize.parse_output(""), 0) == "child failed (exit 0)"
    assert sanitize.path_taken(None) == "?"


def test_the_table_has_a_row_per_run_and_lists_the_runs_that_were_not_clean():
    case = Case(problem=Problem(batch=2, q_heads=4, kv_heads=2, n_queries=37, n_keys=53, head_dim=72),
                layouts=(Layout(), Layout(order=(0, 2, 1, 3)), Layout(steps=(1, 2, 1, 1))))  # fmt: skip
    problem = sanitize.Problem(7, case, "descriptors")
    runs = [
        sanitize.Run(problem, "memcheck", "clean", 0, 0, 12.4, "descriptors (fwd)", "07-memcheck.log"),
        sanitize.Run(problem, "racecheck", "ERRORS", 2, 1, 30.0, "descriptors (fwd)", "07-racecheck.log"),
        sanitize.Run(problem, "synccheck"),
    ]
    text = sanitize.table(runs, ["# sweep"])
    rows = [line for line in text.splitlines() if line.startswith("| 7 |")]
    assert [row.split(" | ")[4] for row in rows] == ["memcheck", "synccheck", "racecheck"]
    assert (
        "| B2 H4/2 N37/53 D72 causal dense,bshd,view | float16 | descriptors (fwd) | memcheck | 0 |" in text
    )
    assert "| 2 (+1 warn) | ERRORS |" in text and "not run (time budget)" in text
    assert "- #7 racecheck: ERRORS, logs/07-racecheck.log" in text


def test_a_sweep_end_to_end_with_a_stand_in_sanitizer(tmp_path):
    stand_in = tmp_path / "compute-sanitizer"
    stand_in.write_text(
        f"#!{sys.executable}\n"
        "import subprocess, sys\n"
        "args = sys.argv[1:]\n"
        "code = subprocess.call(args[args.index('--print-limit') + 2 :])\n"
        "print('========= ERROR SUMMARY: 0 errors', flush=True)\n"
        "sys.exit(code)\n"
    )
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IXUSR)
    out = tmp_path / "out"
    arguments = ["--out", str(out), "--problems", "1", "--tools", "memcheck", "--jobs", "1"]
    code = sanitize.main([*arguments, "--sanitizer", str(stand_in), "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    (result,) = json.loads((out / "results.json").read_text())
    assert result["status"] == "clean" and result["errors"] == 0, (out / "logs" / result["log"]).read_text()
    assert result["path"].startswith("descriptors"), "problem 0 is fp16 with descriptors forced on"
    assert "| 0 | " in (out / "sanitize.md").read_text()
