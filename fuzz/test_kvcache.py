"""core.attention_with_kvcache against the float64 truth, on every cache the strategy reaches.

A `KvCase` draws what a serving engine hands the function: dense or paged caches (any page size from 16,
shuffled block tables), FlashAttention/vLLM-layout caches read through their transposed view, per-sequence
cached lengths from empty to full, new keys appended in place, one to sixteen queries (speculative
decoding), GQA/MQA, windows, softcapping, scales and explicit split counts. Each example checks:

- out and the LSE within the tolerance policy of `core.attention_with_kvcache_reference` (float64), where
  the eager same-dtype reference gives the policy a finite yardstick;
- the caches after the call: the appended keys and values bit for bit where they belong, every other
  slot untouched (an out-of-place write shows here);
- a second run gives the same bits (the splits merge in a fixed order).
"""

from __future__ import annotations

import math

import torch
from hypothesis import event, given, settings, target

import core
from fuzz import profiles, report
from fuzz.cases import KvInputs
from fuzz.oracle import DEVICE, run_kvcache
from fuzz.strategies import kvcache_cases

# Examples per profile (the property runs as one test item, on one worker): the CPU profiles' share keeps
# an example near a second of interpreted kernels. On a GPU most examples compile a new variant of the
# kernels (each mask, page size, head dim and dtype is one), which bounds the time-boxed profile.
EXAMPLES = {"ci": 40, "ci-shrink": 40, "dev": 20, "pinned": 1, "gpu-1k": 50, "nightly": 1500}


@settings(profiles.active().settings, max_examples=EXAMPLES.get(profiles.active().name, 20))
@given(case=kvcache_cases())
def test_kvcache_within_policy_exact_appends_and_repeatable(case):
    report.count_example("kvcache")
    built = KvInputs(case, DEVICE)
    before = (built.k_cache.clone(), built.v_cache.clone())
    truth = run_kvcache(case, built, compute_dtype=torch.float64)
    eager = run_kvcache(case, built, compute_dtype=None)
    out, lse = run_kvcache(case, built)

    expected_k, expected_v = (c.clone() for c in before)
    for b, start in enumerate(case.cached):
        for t in range(case.n_new):
            row, slot = built.slot(case, b, start + t)
            expected_k[row, :, slot] = built.k[b, :, t]
            expected_v[row, :, slot] = built.v[b, :, t]
    assert torch.equal(built.k_cache, expected_k), "k_cache after the call: wrong, missing or stray writes"
    assert torch.equal(built.v_cache, expected_v), "v_cache after the call: wrong, missing or stray writes"

    failures = []
    for name, actual, true, plain in (("out", out, truth[0], eager[0]), ("lse", lse, truth[1], eager[1])):
        verdict = core.tolerance.judge(name, actual, true, plain, input_dtype=case.dtype)
        if not math.isfinite(verdict.eager_error):
            event(f"{name}: eager {case.dtype} reference overflowed, policy comparison skipped")
            continue
        if math.isfinite(verdict.ratio):
            target(verdict.ratio, label=f"kvcache {name} error / bound")
        if not verdict.ok:
            failures.append(str(verdict))
    assert not failures, "outside the tolerance policy:\n  " + "\n  ".join(failures)

    again = run_kvcache(case, built)  # appends the same keys to the same slots again
    assert torch.equal(again[0], out) and torch.equal(again[1], lse), "a second run gave other bits"
