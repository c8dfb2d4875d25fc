"""core's Triton kernels build for Hopper (sm_90), checked where the tests run, GPU or not.

The interpreter, which runs the kernels on the CPU, accepts code that Triton's compiler refuses: a merge
loop that rebound `_` (an int32 before the loop, a float inside it) passed every CPU test and failed to
compile on the GPU. compile_probe.py builds the decode and portable families' plans for a grid of
KV-cache and attention calls on CPU tensors, records their launches instead of running them, and
compiles each distinct kernel variant for sm_90 with Triton's own compiler, in a process without
TRITON_INTERPRET; the portable family's fused backward (behind its switch); and the Hopper family's
Gluon forwards (one program per tile, and persistent behind its switch) and its Gluon backward (behind
its switch) as its plans launch them
(Gluon's API moves between Triton releases: this is where CI's Triton meets it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).with_name("compile_probe.py")


@pytest.fixture(autouse=True)
def family():
    """The probe builds each family's plans itself: one run, not one per family."""
    yield "decode"


def test_every_probed_kernel_variant_compiles_for_sm90():
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    source = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (source, env.get("PYTHONPATH"))))
    done = subprocess.run(
        [sys.executable, str(PROBE)], env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    compiles = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    failed = [f"{c['kernel']} {c['constexprs']}: {c['error']}" for c in compiles if c["error"]]
    assert not failed, "kernels that do not compile for sm_90:\n" + "\n".join(failed)
    # The grids reach every switch named here (a change to their calls must keep them).
    switches = {(c["kernel"], name, value) for c in compiles for name, value in c["constexprs"].items()}
    for kernel, name, value in [
        ("decode_merge_kernel", "ONE_READ", True), ("decode_merge_kernel", "ONE_READ", False),
        ("decode_merge_kernel", "COMPENSATE", True), ("decode_split_kernel", "SINGLE_SPLIT", True),
        ("decode_split_kernel", "SINGLE_SPLIT", False), ("decode_split_kernel", "PAGED", True),
        ("decode_split_kernel", "SOFTCAP", True), ("decode_split_kernel", "WINDOW_LEFT", True),
        ("decode_split_kernel", "WINDOW_RIGHT", True), ("kvcache_append_kernel", "PAGED", True),
        ("decode_split_kernel", "LAUNCH_MERGE", True), ("decode_merge_kernel", "WAIT_FOR_SPLITS", True),
        ("attention_forward_kernel", "WINDOW", True), ("attention_forward_kernel", "SOFTCAP", True),
        ("backward_dkdv_kernel", "WINDOW", True), ("backward_dkdv_kernel", "SOFTCAP", True),
        ("backward_dkdv_kernel", "WHOLE_QUERY_BLOCKS", True), ("backward_dq_kernel", "WINDOW", True),
        ("backward_dkdv_kernel", "WHOLE_QUERY_BLOCKS", False),
        ("backward_preprocess_kernel", "PADDED_STATS", True),
        ("fused_backward_kernel", "DETERMINISTIC", True), ("fused_backward_kernel", "DETERMINISTIC", False),
        ("attention_forward_persistent_kernel", "CAUSAL", True),
        ("attention_forward_persistent_kernel", "CAUSAL", False),
        ("attention_forward_persistent_kernel", "WINDOW", True),
        ("attention_forward_persistent_kernel", "SOFTCAP", True),
        ("hopper_attention_forward_kernel", "CAUSAL", True),
        ("hopper_attention_forward_kernel", "CAUSAL", False),
        ("hopper_attention_forward_persistent_kernel", "CAUSAL", True),
        ("hopper_attention_forward_persistent_kernel", "CAUSAL", False),
        ("hopper_attention_forward_persistent_kernel", "HEAD_DIM", 64),
        ("hopper_attention_forward_persistent_kernel", "HEAD_DIM", 128),
        ("hopper_attention_backward_kernel", "DETERMINISTIC", True),
        ("hopper_attention_backward_kernel", "DETERMINISTIC", False),
        ("hopper_attention_backward_kernel", "HEAD_DIM", 64),
        ("hopper_attention_backward_kernel", "HEAD_DIM", 128),
        ("delta_from_p_and_dp_kernel", "LOW_PLANE", True), ("delta_from_p_and_dp_kernel", "LOW_PLANE", False),
        ("hopper_delta_kernel", "HEAD_DIM", 64), ("hopper_delta_kernel", "HEAD_DIM", 128),
        ("hopper_delta_kernel", "CAUSAL", True), ("hopper_delta_kernel", "CAUSAL", False),
    ]:  # fmt: skip
        assert (kernel, name, value) in switches, f"no {kernel} with {name}={value} in the probe's calls"
