"""The fuzzer's profiles: how many examples, how large, how reproducible.

A profile is two things that must change together: the hypothesis settings (every field written out, so
that nothing depends on hypothesis' defaults of the day) and the limits of the problems the strategies
draw. Choose one with `--profile NAME` or FUZZ_PROFILE=NAME; docs/fuzzing.md says which to use when.

Example budgets are per property test (hypothesis counts examples per test function); the tables below
are the whole budget of a run, and `fuzz/conftest.py` prints what actually ran.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from hypothesis import HealthCheck, Phase, Verbosity, settings
from hypothesis.database import DirectoryBasedExampleDatabase

from fuzz import sharding
from fuzz.cases import Layout

REPO = Path(__file__).resolve().parents[1]
# One device call is 10 minutes: this leaves room for the session's start, its report and the examples
# still running when the time box ends (one may be compiling a float32 backward, the slowest compile).
DEVICE_CALL_TIME_BOX = 360.0


@dataclass(frozen=True)
class Limits:
    """The largest problem a profile draws.

    The interpreter runs a 16 x 16 tile in numpy, so CPU profiles cap the work per example
    (B * Hq * Nq * Nk * D) to keep an example near a second; GPU profiles cap the scores the float64
    reference materialises (B * Hq * Nq * Nk) to keep it within memory with several workers per GPU.
    """

    max_batch: int
    max_kv_heads: int
    max_group: int  # Hq // Hkv
    max_seq: int
    max_head_dim: int
    max_scores: int  # B * Hq * Nq * Nk
    max_work: int  # B * Hq * Nq * Nk * D
    # Menus instead of the full ranges, for time-boxed GPU runs. Triton compiles the four kernels (seconds
    # each) once per head dim, dtype and mask, and again for every new pattern of which strides are 1 or
    # multiples of 16 and which pointers are 16-byte aligned: freely drawn layouts make almost every
    # example a new compilation. The nightly run leaves both menus unset and draws everything.
    head_dims: Mapping[torch.dtype, tuple[int, ...]] | None = None  # per dtype
    layouts: tuple[Layout, ...] | None = None  # for q, k, v and dO; the dLSE is then contiguous


@dataclass(frozen=True)
class Profile:
    name: str
    needs_gpu: bool
    limits: Limits
    examples: dict[str, int]  # examples per property (over all its kernel families), by test name
    settings: settings
    nonfinite: bool = False  # fuzz inputs holding inf/NaN (test_nonfinite.py) without --nonfinite
    # Seconds into the run after which no new example is drawn: each test item finishes the example it
    # is running and stops, items not yet started are skipped. Sized to one device call; --time-box.
    time_box: float | None = None
    # Runs in slices (--slice K/N): the example budgets are divided by N, and each slice draws head
    # dims and layouts from its own menus (strategies.slice_menus), so that each slice compiles few
    # kernel variants and the slices of a run together cover many.
    sliced: bool = False

    @property
    def total_examples(self) -> int:
        return sum(self.examples.values())


def _database(name: str) -> DirectoryBasedExampleDatabase:
    """A directory database under .hypothesis/ (git-ignored), or FUZZ_DATABASE when set (several
    profiles may share one: a failure saved by one replays first in the others)."""
    return DirectoryBasedExampleDatabase(
        os.environ.get("FUZZ_DATABASE", REPO / ".hypothesis" / f"fuzz-{name}")
    )


def _settings(
    *,
    derandomize: bool,
    database,
    climb: bool,
    shrink: bool,
    explain: bool,
    multiple_bugs: bool,
    generate: bool = True,
) -> settings:
    phases = [Phase.explicit, Phase.reuse, Phase.generate] if generate else [Phase.explicit]
    # The target phase hill-climbs the error/bound ratios that the properties report with target().
    # It may run far past max_examples once it meets a failure (hypothesis keeps climbing the target it
    # is on), so time-boxed profiles leave it out; their failures still print the best target scores.
    if climb:
        phases.append(Phase.target)
    if shrink:
        phases.append(Phase.shrink)
    if explain:  # re-runs the failing example many times: affordable only where examples are cheap
        phases.append(Phase.explain)
    return settings(
        max_examples=100,  # overridden per test from Profile.examples
        derandomize=derandomize,
        database=database,
        verbosity=Verbosity.normal,
        phases=phases,
        stateful_step_count=50,  # no stateful tests; written out so that every field is explicit
        report_multiple_bugs=multiple_bugs,
        # Interpreted kernels take seconds and GPU examples may include a Triton compile: a deadline
        # would only measure the machine. Hangs in validation are caught by test_bad_inputs itself.
        deadline=None,
        # Session-scoped fixtures only (NaN-poisoned buffers), and generation is plain dataclasses, so
        # no health check needs silencing (for_run adds one for time-boxed runs).
        suppress_health_check=[],
        print_blob=True,  # every failure prints its @reproduce_failure blob
        backend="hypothesis",
    )


CPU_SMALL = Limits(
    max_batch=2,
    max_kv_heads=2,
    max_group=3,
    max_seq=80,
    max_head_dim=256,
    max_scores=4 * 80 * 80,
    max_work=2 * 64 * 64 * 64,
)
GPU_LARGE = Limits(
    max_batch=4,
    max_kv_heads=8,
    max_group=8,
    max_seq=4096,
    max_head_dim=256,
    max_scores=2**26,  # 512 MiB per float64 score matrix: a few GiB per worker for the reference
    max_work=2**34,
)
# Every block-D tier of core/_config.py (64, 128, 256) and a masked head dim (80 in BLOCK_D 128) whose
# strides still divide by 16; float32 (full-precision dots, no tensor cores, by far the slowest to
# compile: 80 s per backward at D = 256) at 64 and 128 only. Contiguous and BSHD inputs; MHA, GQA and
# MQA with at most 2 + 2 heads. A simulation of this profile's draws gives about 60 forward and 135
# backward compilations (against 860 and 520 unrestricted): some 1,900 CPU-seconds of Triton + ptxas,
# at most ~7 minutes of it in any one (dtype, causal) family.
GPU_SMOKE = Limits(
    **{
        **GPU_LARGE.__dict__,
        "max_kv_heads": 2,
        "max_group": 2,
        "max_scores": 2**25,
        "head_dims": {
            torch.float16: (64, 80, 128, 256),
            torch.bfloat16: (64, 80, 128, 256),
            torch.float32: (64, 128),
        },
        "layouts": (Layout(), Layout(order=(0, 2, 1, 3))),
    }
)


def _examples(forward, gradients, extreme_scales, invariants, bad_inputs, nonfinite) -> dict[str, int]:
    """Examples per property test; `invariants` for each of the four bitwise properties."""
    return {
        "forward": forward,
        "gradients": gradients,
        "extreme_scales": extreme_scales,
        **dict.fromkeys(("determinism", "gqa", "permutation", "linearity"), invariants),
        "bad_inputs": bad_inputs,
        "nonfinite": nonfinite,
        # fuzz/test_window_varlen.py: windows and softcaps (and their bad values) at a third of the
        # gradients' budget; the varlen property (a batch of dense calls per example) at an invariant's.
        "window_softcap": max(6, gradients // 3),
        "varlen": max(6, invariants),
    }


PROFILES = {
    p.name: p
    for p in (
        # CPU interpreter, the same examples every run: 5.5-7 minutes with -n 2. No shrinking, so a
        # red run is as quick as a green one (shrinking an interpreted failure takes up to 5 minutes per
        # failing item): `ci-shrink` draws the very same examples and shrinks what fails.
        *(
            Profile(
                name=name,
                needs_gpu=False,
                limits=CPU_SMALL,
                examples=_examples(160, 130, 35, 30, 300, 20),
                settings=_settings(
                    derandomize=True,
                    database=None,
                    climb=False,
                    shrink=shrink,
                    explain=False,
                    multiple_bugs=False,
                ),
            )
            for name, shrink in (("ci", False), ("ci-shrink", True))
        ),
        # Local work on either machine: new examples each run, failures kept in .hypothesis/fuzz-dev.
        Profile(
            name="dev",
            needs_gpu=False,
            limits=CPU_SMALL,
            examples=_examples(40, 30, 10, 6, 100, 10),
            settings=_settings(
                derandomize=False,
                database=_database("dev"),
                climb=True,
                shrink=True,
                explain=True,
                multiple_bugs=True,
            ),
        ),
        # The pinned cases alone (every @example: the failures found so far, each with where it came
        # from), on either machine: a fix for a GPU finding is confirmed on the GPU in a minute or two.
        Profile(
            name="pinned",
            needs_gpu=False,
            limits=GPU_LARGE,
            examples=_examples(1, 1, 1, 1, 1, 1),  # nothing is generated; hypothesis wants a budget
            settings=_settings(
                derandomize=True,
                database=None,
                climb=False,
                shrink=False,
                explain=False,
                multiple_bugs=True,
                generate=False,
            ),
        ),
        # The GPU smoke run, sized to one device call: 1,082 examples (250 of them invalid calls, which
        # cost microseconds), half of what the old gpu-2k ran per test item, with its menus
        # (GPU_SMOKE), inf/NaN inputs included, and the time box as a guard. docs/fuzzing.md: sizing.
        # No shrinking: a failure file holds the example at once, and the nightly run (same database
        # directory if FUZZ_DATABASE / --db is shared) shrinks it.
        Profile(
            name="gpu-1k",
            needs_gpu=True,
            limits=GPU_SMOKE,
            examples=_examples(350, 200, 30, 48, 250, 60),
            settings=_settings(
                derandomize=False,
                database=_database("gpu"),
                climb=False,
                shrink=False,
                explain=False,
                multiple_bugs=True,
            ),
            nonfinite=True,
            time_box=DEVICE_CALL_TIME_BOX,
        ),
        # GPU, everything, in slices of one device call each (--slice K/N, every slice with the same
        # --fuzz-seed and database): 13,800 examples over all slices (4,000 of them invalid calls),
        # inf/NaN inputs included; each slice draws its own head-dim and layout menus. The database
        # keeps every failure, which replays first in the next slice; climbing and shrinking on.
        Profile(
            name="nightly",
            needs_gpu=True,
            limits=GPU_LARGE,
            examples=_examples(4000, 3000, 300, 500, 4000, 500),
            settings=_settings(
                derandomize=False,
                database=_database("nightly"),
                climb=True,
                shrink=True,
                explain=True,
                multiple_bugs=True,
            ),
            nonfinite=True,
            time_box=DEVICE_CALL_TIME_BOX,
            sliced=True,
        ),
    )
}

DEFAULT = "dev"
_active: Profile | None = None


@dataclass(frozen=True)
class Slice:
    index: int  # 1..count
    count: int
    seed: int  # shared by the slices of one run: their menus are drawn from it

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def for_run(
    name: str,
    slice_: Slice | None = None,
    database: str | None = None,
    time_box: float | None = None,
    budget_scale: float | None = None,
) -> Profile:
    """The profile `name` as this run uses it: one slice of it, another example database directory,
    another time box (0: none), every example budget scaled (a device call whose Triton cache is warm
    from an earlier call compiles little and has time for several times a profile's examples, drawn from
    the same menus). Raises ValueError for an option the profile does not take."""
    profile = PROFILES[name]
    if budget_scale is not None:
        if not (budget_scale > 0 and math.isfinite(budget_scale)):
            raise ValueError(f"--budget-scale {budget_scale}: expected a positive number")
        scaled = {test: max(1, math.ceil(n * budget_scale)) for test, n in profile.examples.items()}
        profile = replace(profile, examples=scaled)
    if slice_ is not None:
        if not profile.sliced:
            sliced = ", ".join(p.name for p in PROFILES.values() if p.sliced)
            raise ValueError(f"--slice: profile {name} does not run in slices ({sliced} does)")
        if not 1 <= slice_.index <= slice_.count:
            raise ValueError(f"--slice {slice_}: K must be in 1..N")
        from fuzz.strategies import slice_menus  # strategies imports this module

        profile = replace(
            profile,
            limits=slice_menus(profile.limits, slice_),
            examples={test: math.ceil(n / slice_.count) for test, n in profile.examples.items()},
        )
    if database is not None:
        if profile.settings.database is None:
            raise ValueError(f"--db: profile {name} keeps no example database (it is derandomized)")
        profile = replace(
            profile, settings=settings(profile.settings, database=DirectoryBasedExampleDatabase(database))
        )
    if time_box is not None:
        profile = replace(profile, time_box=time_box or None)
    if profile.time_box:
        # The time box rejects examples unrun (fuzz/failures.py): no strategy filtering too much.
        quiet = settings(profile.settings, suppress_health_check=[HealthCheck.filter_too_much])
        profile = replace(profile, settings=quiet)
    return profile


def activate(profile: Profile | str) -> Profile:
    """Load `profile` as hypothesis' default settings and as the limits the strategies draw within."""
    global _active
    _active = PROFILES[profile] if isinstance(profile, str) else profile
    settings.register_profile(_active.name, _active.settings)
    settings.load_profile(_active.name)
    return _active


def active() -> Profile:
    if _active is None:
        raise RuntimeError("no fuzz profile is active: run the fuzzer through pytest (fuzz/conftest.py)")
    return _active


def budget(test: str, sharded: bool = True) -> settings:
    """The settings of one property test: the active profile with that test's example budget, split
    evenly over the kernel families when the test runs once per family (fuzz/sharding.py)."""
    examples = active().examples[test]
    if sharded:
        examples = math.ceil(examples / len(sharding.KERNELS))
    return settings(active().settings, max_examples=examples)
