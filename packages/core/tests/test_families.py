"""The kernel families' contract (core.kernels) and their parity: on every call two families both support,
each is within the tolerance policy of the float64 truth, forward and backward (a family without a
backward of its own hands its forward's LSE to another's, so this also checks the shared conventions)."""

from __future__ import annotations

import itertools

import pytest
import torch

import core
import core.testing

from .helpers import assert_all_within_tolerance, compare_with_reference, make_qkv

PAIRS = list(itertools.combinations(core.testing.families(), 2))
SHAPES = [(2, 4, 2, 200, 200, 64), (1, 8, 8, 333, 512, 128), (1, 2, 1, 1, 300, 64)]


def test_every_family_keeps_the_contract():
    for name in core.testing.families():
        family = core.testing.family(name)
        assert name == family.NAME
        assert callable(family.supports) and callable(family.ForwardPlan)


def test_forcing_an_unknown_family_is_refused():
    with pytest.raises(ValueError, match="unknown kernel family"), core.testing.use_family("no-such-family"):
        pass


@pytest.mark.skipif(not PAIRS, reason="one kernel family on this machine")
@pytest.mark.parametrize("first,second", PAIRS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
def test_families_agree_within_the_policy(first, second, shape, causal):
    q, k, v = make_qkv(*shape, torch.bfloat16, seed=7)
    for name in (first, second):
        with core.testing.use_family(name):
            try:
                verdicts = compare_with_reference(q, k, v, causal=causal)
            except ValueError as refused:  # a family that does not take this call
                assert "does not support" in str(refused)
                pytest.skip(f"{name} does not take {shape}")
        assert_all_within_tolerance(verdicts)
