"""The compute-sanitizer sweep's CPU side (fuzz/sanitize.py): drawing the problems, reading the sanitizer's
summaries, writing the table, and one sweep end to end with a stand-in for compute-sanitizer that runs
the child (under the interpreter here) and prints a clean summary."""

from __future__ import annotations

import json
import stat
import sys
import tarfile

import torch

import core.testing
from fuzz import sanitize, sanitize_sites, sharding
from fuzz.cases import Case, KvCase, Layout, Problem, VarlenCase


def test_the_problems_cover_every_route_family_and_kind_of_layout():
    taken = sanitize.routes()
    assert {"descriptors", "pointers", "window-softcap", "varlen", "kvcache", "decode"} <= set(taken)
    count = 12 * len(taken)  # every route meets each of its (dtype, causal) families
    problems = sanitize.draw_problems(count, seed=0)
    assert len(problems) == count
    for route in taken:
        drawn = {(dtype_and_causal(p.case), p.route) for p in problems if p.route == route}
        kernels = [k for k in sharding.KERNELS if not (route in sanitize.HALF_ONLY and k[0] == torch.float32)]
        assert {k for k, _ in drawn} == set(kernels), route
    dense = [p.case.problem for p in problems if p.route in ("descriptors", "pointers")]
    assert any(s.q_heads > s.kv_heads for s in dense), "GQA"
    assert any(s.n_queries % 2 and s.n_keys % 2 for s in dense), "odd lengths"
    head_dims = [p.case.problem.head_dim if isinstance(p.case, Case) else p.case.head_dim for p in problems]
    assert min(head_dims) <= 8 and max(head_dims) >= 200
    layouts = {layout for p in problems if hasattr(p.case, "layouts") for layout in p.case.layouts}
    assert Layout() in layouts and Layout(order=(0, 2, 1, 3)) in layouts
    assert any(layout.steps or layout.pads or layout.broadcast for layout in layouts), "sliced views"
    least = core.testing.decode.config.min_keys_for_attention(core.testing.is_interpreted())
    for p in problems:
        if p.route == "decode":
            assert p.case.problem.n_queries <= 4 and p.case.problem.n_keys >= least
        if p.route == "window-softcap":
            assert p.case.problem.window_size != (-1, -1) or p.case.problem.softcap > 0
    assert any(p.case.page for p in problems if p.route == "kvcache"), "a paged cache"
    assert [p.case for p in sanitize.draw_problems(6, seed=0)] == [p.case for p in problems[:6]]


def test_hopper_problems_are_ones_the_family_takes():
    """Drawn here too, though only an sm_90 GPU runs them: head dims the family takes at that
    causality and length, two query tiles or more, layouts the copy engine reads."""
    hopper = core.testing.family("hopper")
    for index in range(8):
        case = sanitize.draw_problem(index, "hopper", torch.bfloat16, bool(index % 2), seed=0).case
        problem = case.problem
        assert problem.dtype == torch.bfloat16 and problem.head_dim in hopper.KERNEL_HEAD_DIMS
        assert hopper.faster_than_portable(problem.head_dim, problem.causal, problem.n_keys)
        assert problem.n_queries >= 2 * hopper.tile_config(problem.head_dim).block_m
        assert set(case.layouts) <= {Layout(), Layout(order=(0, 2, 1, 3))}


def dtype_and_causal(case) -> tuple[torch.dtype, bool]:
    if isinstance(case, Case):
        return case.problem.dtype, case.problem.causal
    return case.dtype, case.causal


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
    assert sanitize.path_taken({"route": "varlen"}) == "varlen"
    decode = {
        "forward": {"plan": "core.kernels.decode.plans", "attend.split": {}},
        "backward": {"plan": "core.kernels.portable.plans", "dq": {"TENSOR_DESCRIPTORS": True}},
    }
    assert sanitize.path_taken(decode) == "decode fwd, descriptors (dq)"


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
    packed = VarlenCase(lens_q=(3, 0), lens_k=(5, 2), q_heads=2, window_size=(4, 0), dtype=torch.bfloat16)
    cache = KvCase(batch=2, q_heads=4, kv_heads=2, n_queries=1, head_dim=64, dtype=torch.float32,
                   capacity=64, page=16, bshd=False, row_map=False, cached=(3, 60), n_new=4, causal=True,
                   window=(-1, -1), softcap=30.0, sm_scale=None, num_splits=None, seed=1)  # fmt: skip
    other = sanitize.table(
        [sanitize.Run(sanitize.Problem(8, packed, "varlen"), "memcheck", "clean", 0, 0, 1.0, "varlen"),
         sanitize.Run(sanitize.Problem(9, cache, "kvcache"), "memcheck", "clean", 0, 0, 1.0, "kvcache")],
        ["# sweep"],
    )  # fmt: skip
    assert "| 8 | varlen 2 seqs, Nq 3/0, Nk 5/2, H2/1 D16 causal window 4,0 | bfloat16 | varlen |" in other
    paged = "| 9 | kvcache B2 H4/2 Nq1 cache 64 paged 16 +4 D64 causal softcap 30 | float32 | kvcache |"
    assert paged in other


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
    taken = sanitize.routes()
    arguments = ["--out", str(out), "--problems", str(len(taken)), "--tools", "memcheck", "--jobs", "2"]
    code = sanitize.main([*arguments, "--sanitizer", str(stand_in), "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["route"] for r in results] == list(taken), "one problem per route"
    for result in results:
        log = (out / "logs" / result["log"]).read_text()
        assert result["status"] == "clean" and result["errors"] == 0, log
    paths = {r["route"]: r["path"] for r in results}
    assert paths["descriptors"].startswith("descriptors"), "problem 0 is fp16 with descriptors forced on"
    assert paths["pointers"] == "pointers" and paths["decode"].startswith("decode fwd")
    assert paths["varlen"] == "varlen" and paths["kvcache"] == "kvcache"
    assert "| 0 | " in (out / "sanitize.md").read_text()
    with tarfile.open(out / "logs.tar.gz") as archive:
        names = set(archive.getnames())
    assert {f"logs/{r['log']}" for r in results} <= names and "problems/00.json" in names


RACECHECK_LOG = """\
========= COMPUTE-SANITIZER
========= Error: Race reported between Read access at hopper_attention_forward_kernel+0x150 in forward.py:273
=========     and Write access at hopper_attention_forward_kernel+0xbf00 in forward.py:273 [36 hazards]
=========     and Write access at hopper_attention_forward_kernel+0x16750 in forward.py:326 [11 hazards]
=========
= Error: Race reported between Write access at hopper_attention_forward_kernel+0xbf00 in forward.py:273
=========     and Read access at hopper_attention_forward_kernel+0x820 in forward.py:273 [8 hazards]
========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)
"""

# cuobjdump -sass lines (with their encoding comments) of two compiled variants of one kernel.
SASS_OF = {
    "causal": """
        /*0150*/                   LDS.U8 R2, [R2+UR4+0x2811c] ;            /* 0x02811c0402027984 */
        /*0820*/                   LDS R5, [UR7+0x28000] ;                  /* 0x02800007ff057984 */
        /*bf00*/                   STS.64 [UR6+0x28120], R4 ;               /* 0x02812004ff007988 */
        /*16750*/                  STS.64 [UR4+0x28120], R2 ;               /* 0x02812002ff007988 */
    """,
    "full": """
        /*0150*/                   S2UR UR6, SR_CgaCtaId ;                  /* 0x0000000000067919 */
        /*0820*/                   LDS R5, [UR7+0x28000] ;                  /* 0x02800007ff057984 */
    """,
}


def test_hazard_sites_are_read_from_the_log_once_each():
    sites = sanitize_sites.hazard_sites(RACECHECK_LOG)
    assert [(s.kind, s.offset, s.source) for s in sites] == [
        ("Read", 0x150, "forward.py:273"),
        ("Write", 0xBF00, "forward.py:273"),
        ("Write", 0x16750, "forward.py:326"),
        ("Read", 0x820, "forward.py:273"),
    ]
    assert {s.kernel for s in sites} == {"hopper_attention_forward_kernel"}


def test_the_sites_are_described_from_the_variant_that_has_shared_accesses_there(tmp_path, monkeypatch):
    for variant in SASS_OF:
        (tmp_path / variant).mkdir()
        (tmp_path / variant / "hopper_attention_forward_kernel.cubin").write_bytes(b"")
    monkeypatch.setattr(sanitize_sites, "disassemble", lambda cubin: SASS_OF[cubin.parent.name])
    log = tmp_path / "06-racecheck.log"
    log.write_text(RACECHECK_LOG)
    lines = sanitize_sites.annotate(log, tmp_path)
    assert lines[0] == "hopper_attention_forward_kernel (causal, of 2 variants):"
    assert lines[1] == "  Read  +0x150 (forward.py:273): LDS.U8 R2, [R2+UR4+0x2811c]"
    assert lines[3] == "  Write +0x16750 (forward.py:326): STS.64 [UR4+0x28120], R2"
    assert len(lines) == 5
