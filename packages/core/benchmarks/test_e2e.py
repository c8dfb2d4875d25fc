"""Tests of the end-to-end training benchmark's harness (e2e.py), on CPU: the plans, the command line, the
order of configurations, which kernels count as attention, the table, a failing configuration, and a
dry run of the whole script on a tiny model.

    python -m pytest packages/core/benchmarks/test_e2e.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import e2e
import pytest

pytest.importorskip("transformers", minversion="4.54")

REPO_ROOT = Path(__file__).resolve().parents[3]


def test_full_plan_is_the_issue_model_with_16k_tokens_per_step_or_one_longer_sequence():
    args = e2e.parse_args([])
    plan = args.plan_settings
    assert (plan.layers, plan.hidden, plan.heads, plan.kv_heads, plan.head_dim) == (8, 2048, 16, 4, 128)
    assert [plan.batch(n) for n in plan.lengths] == [8, 2, 1]
    assert plan.device == "cuda" and plan.compile_backend == "inductor"


def test_quick_plan_has_fewer_layers_and_steps_on_the_same_shapes():
    quick, full = e2e.parse_args(["--quick"]).plan_settings, e2e.PLANS["full"]
    assert quick.layers < full.layers and quick.timed_steps < full.timed_steps
    assert (quick.hidden, quick.lengths, quick.tokens_per_step) == (
        full.hidden,
        full.lengths,
        full.tokens_per_step,
    )


def test_lengths_can_be_chosen_but_must_divide_the_tokens_of_a_step(capsys):
    assert e2e.parse_args(["--lengths", "4096,16384"]).plan_settings.lengths == (4096, 16384)
    with pytest.raises(SystemExit):
        e2e.parse_args(["--lengths", "3000"])
    assert "does not divide" in capsys.readouterr().err


def test_unknown_attentions_and_modes_are_refused(capsys):
    for flag, value in (("--attentions", "core,flex"), ("--modes", "eager,graphs")):
        with pytest.raises(SystemExit):
            e2e.parse_args([flag, value])
        assert "unknown" in capsys.readouterr().err


def test_configurations_run_each_length_in_turn_and_keep_the_chosen_ones():
    plan = e2e.PLANS["full"]
    runs = e2e.configurations(plan, ["sdpa", "core"], ["compiled", "eager"])
    assert len(runs) == 3 * 2 * 2
    assert [run["n"] for run in runs] == sorted(run["n"] for run in runs)
    first_length = [(run["mode"], run["attention"]) for run in runs[:4]]
    assert first_length == [("eager", "core"), ("eager", "sdpa"), ("compiled", "core"), ("compiled", "sdpa")]
    assert [run["batch"] * run["n"] for run in runs[::4]] == [16384, 16384, 32768]


@pytest.mark.parametrize(
    ("name", "is_attention"),
    [
        ("attention_forward_kernel", True),
        ("backward_dkdv_kernel", True),
        ("backward_dq_kernel", True),
        ("backward_preprocess_kernel", True),
        (
            "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>(Params)",
            True,
        ),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1", True),
        ("fmha_cutlassB_bf16_aligned_64x64_k128_sm80", True),
        ("triton_poi_fused__scaled_dot_product_flash_attention_transpose_0", False),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", False),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNN", False),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", False),
    ],
)
def test_attention_kernels_are_told_apart_by_name(name, is_attention):
    assert e2e.is_attention_kernel(name) is is_attention


def test_attention_share_sums_the_attention_kernels_over_all_kernels():
    share = e2e.attention_share(
        [("attention_forward_kernel", 30.0), ("gemm", 50.0), ("backward_dq_kernel", 20.0), ("gemm", 100.0)]
    )
    assert share["share"] == pytest.approx(50 / 200)
    assert share["attention_kernels"] == {"attention_forward_kernel": 30.0, "backward_dq_kernel": 20.0}
    assert e2e.attention_share([])["share"] is None


def synthetic_results() -> dict:
    meta = {
        "model": "Llama",
        "card": "NVIDIA H100 80GB HBM3",
        "torch": "2.11",
        "triton": "3.6",
        "transformers": "4.57.1",
        "date": "2026-12-06 12:00 UTC",
    }
    common = {
        "n": 2048,
        "batch": 8,
        "mode": "eager",
        "step_ms": 100.0,
        "first_loss": 10.4,
        "peak_memory_gib": 20.0,
    }
    return {
        "meta": meta,
        "runs": [
            {**common, "attention": "core", "tokens_per_s": 180000.0, "attention_time": {"share": 0.25}},
            {**common, "attention": "sdpa", "tokens_per_s": 150000.0, "attention_time": {"share": 0.3}},
            {
                "n": 2048,
                "batch": 8,
                "mode": "compiled",
                "attention": "core",
                "error": "InternalTorchDynamoError: x",
            },
        ],
    }


def test_table_names_the_card_and_versions_and_shows_errors_and_ratios_to_sdpa():
    table = e2e.format_table(synthetic_results())
    lines = table.splitlines()
    assert (
        "NVIDIA H100 80GB HBM3" in lines[1] and "transformers 4.57.1" in lines[1] and "2026-12-06" in lines[1]
    )
    core_row = next(line for line in lines if " core " in line and "eager" in line)
    assert "180000" in core_row and "1.20x" in core_row and "25.0" in core_row
    assert "error: InternalTorchDynamoError: x" in table


def test_a_failing_configuration_is_recorded_and_the_run_goes_on(monkeypatch, tmp_path):
    def measure(plan, configuration):
        if configuration["attention"] == "core":
            raise RuntimeError("compile crashed")
        return {"tokens_per_s": 1.0, "step_ms": 1.0, "first_loss": 1.0}

    monkeypatch.setattr(e2e, "measure", measure)
    out = tmp_path / "e2e.json"
    results = e2e.main(["--dry-run", "--lengths", "16", "--modes", "eager", "--out", str(out)])
    errors = {run["attention"]: run.get("error") for run in results["runs"]}
    assert errors == {"core": "RuntimeError: compile crashed", "sdpa": None, "sdpa-flash": None}
    assert json.loads(out.read_text())["runs"] == results["runs"]


def test_dry_run_trains_core_and_sdpa_on_the_same_weights(tmp_path):
    """The script end to end on a CPU (core under the Triton interpreter): the same weights and tokens give
    the same first loss through core and through SDPA."""
    out = tmp_path / "e2e.json"
    command = [sys.executable, str(Path(e2e.__file__)), "--dry-run", "--lengths", "16", "--modes", "eager"]
    command += ["--attentions", "core,sdpa", "--out", str(out)]
    source = os.pathsep.join([str(REPO_ROOT / "packages" / "core" / "src"), os.environ.get("PYTHONPATH", "")])
    environment = {**os.environ, "PYTHONPATH": source, "TRITON_INTERPRET": "1"}
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert [run["attention"] for run in runs] == ["core", "sdpa"]
    assert all(run["tokens_per_s"] > 0 and "error" not in run for run in runs)
    assert runs[0]["first_loss"] == pytest.approx(runs[1]["first_loss"], rel=1e-2)
    assert "tokens/s" in completed.stdout and "transformers" in completed.stdout
