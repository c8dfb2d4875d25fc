"""What gets measured: the benchmark cases of each mode, most important first.

A case is one problem (shape, dtype, masking) plus the passes timed on it. The main sweep keeps the
work per step constant the way the issue's table does: 16k tokens (B = 16384 // N, at least 1, so
N = 32k runs one sequence of 32k tokens) and a model width H x D = 2048. The full mode can run out of
time, so its cases carry a priority and run in that order: the issue's target rows first (causal,
D 64/128, N 1k-16k), the rarer shapes last.
"""

from __future__ import annotations

from dataclasses import dataclass

from attnbench.flops import PASS_FLOP_FACTOR, forward_bytes, forward_flops

ELEMENT_SIZE = {"fp16": 2, "bf16": 2}
DTYPE_NAMES = tuple(ELEMENT_SIZE)
TRAINING_PASSES = ("fwd", "bwd", "fwd+bwd")
TOKENS = 16384
MODEL_WIDTH = 2048
GQA_WIDTH, GQA_GROUP = 4096, 4  # Hq = 32, Hkv = 8 at D = 128, as in Llama-style models
DECODE_BATCH, DECODE_HEADS, DECODE_HEAD_DIM = 8, 16, 128
SEQ_LENS = (512, 1024, 2048, 4096, 8192, 16384, 32768)


@dataclass(frozen=True)
class Case:
    suite: str  # "main" (the N sweep), "gqa" (grouped-query heads) or "decode" (few queries, long KV)
    causal: bool
    dtype: str  # "fp16" or "bf16"
    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    passes: tuple[str, ...]
    priority: int = 0

    @property
    def id(self) -> str:
        masking = "causal" if self.causal else "full"
        return (
            f"{self.suite}-{masking}-{self.dtype}-d{self.head_dim}-b{self.batch}"
            f"-h{self.q_heads}x{self.kv_heads}-q{self.q_len}-k{self.kv_len}"
        )

    @property
    def needs_grad(self) -> bool:
        return any(name != "fwd" for name in self.passes)

    def flops(self, pass_name: str) -> float:
        one_forward = forward_flops(
            self.batch, self.q_heads, self.q_len, self.kv_len, self.head_dim, self.causal
        )
        return PASS_FLOP_FACTOR[pass_name] * one_forward

    def forward_bytes(self) -> int:
        return forward_bytes(
            self.batch,
            self.q_heads,
            self.kv_heads,
            self.q_len,
            self.kv_len,
            self.head_dim,
            ELEMENT_SIZE[self.dtype],
        )

    def as_dict(self) -> dict:
        return {
            "id": self.id,
            "suite": self.suite,
            "causal": self.causal,
            "dtype": self.dtype,
            "batch": self.batch,
            "q_heads": self.q_heads,
            "kv_heads": self.kv_heads,
            "q_len": self.q_len,
            "kv_len": self.kv_len,
            "head_dim": self.head_dim,
            "passes": list(self.passes),
            "priority": self.priority,
            "flops": {name: self.flops(name) for name in self.passes},
            "forward_bytes": self.forward_bytes(),
        }


def sweep_case(
    causal: bool,
    dtype: str,
    head_dim: int,
    seq_len: int,
    passes: tuple[str, ...],
    priority: int,
    *,
    suite: str = "main",
    tokens: int = TOKENS,
    width: int = MODEL_WIDTH,
    kv_group: int = 1,
) -> Case:
    """A square (Nq = Nk) case at a fixed token count and width; kv_group > 1 makes it GQA."""
    heads = width // head_dim
    return Case(
        suite=suite,
        causal=causal,
        dtype=dtype,
        batch=max(1, tokens // seq_len),
        q_heads=heads,
        kv_heads=heads // kv_group,
        q_len=seq_len,
        kv_len=seq_len,
        head_dim=head_dim,
        passes=passes,
        priority=priority,
    )


def decode_case(dtype: str, q_len: int, kv_len: int, priority: int, *, batch: int, heads: int, head_dim: int):
    """A few new queries against a long KV cache: causal (bottom-right aligned), forward only, no grad."""
    return Case(
        suite="decode",
        causal=True,
        dtype=dtype,
        batch=batch,
        q_heads=heads,
        kv_heads=heads,
        q_len=q_len,
        kv_len=kv_len,
        head_dim=head_dim,
        passes=("fwd",),
        priority=priority,
    )


def quick_plan(dtypes: tuple[str, ...]) -> list[Case]:
    """The first side-by-side of issue 2: causal, D 64/128, N 1k/4k/16k, forward and backward."""
    return [
        sweep_case(True, dtype, head_dim, seq_len, ("fwd", "bwd"), priority=0)
        for dtype in dtypes
        for head_dim in (64, 128)
        for seq_len in (1024, 4096, 16384)
    ]


def full_plan(dtypes: tuple[str, ...]) -> list[Case]:
    """Everything issue 5 asks for, ordered so that a run cut short by its time budget still holds
    the rows the performance targets are judged on."""
    # Priorities: 0 the target rows at issue 2's lengths, 1 the other causal lengths (target ones
    # first, N = 512 last), 2 GQA, 3 non-causal, 4 decode-like, 5 D = 256.
    target_lens = (1024, 4096, 16384)
    other_lens = (2048, 8192, 32768, 512)
    cases = [
        sweep_case(causal, dtype, head_dim, seq_len, TRAINING_PASSES, priority)
        for priority, causal, head_dims, seq_lens in (
            (0, True, (64, 128), target_lens),
            (1, True, (64, 128), other_lens),
            (3, False, (64, 128), SEQ_LENS),
            (5, True, (256,), SEQ_LENS),
            (5, False, (256,), SEQ_LENS),
        )
        for dtype in dtypes
        for head_dim in head_dims
        for seq_len in seq_lens
    ]
    cases += [
        sweep_case(
            True, dtype, 128, seq_len, TRAINING_PASSES, 2, suite="gqa", width=GQA_WIDTH, kv_group=GQA_GROUP
        )
        for dtype in dtypes
        for seq_len in target_lens
    ]
    cases += [
        decode_case(dtype, q_len, kv_len, 4, batch=DECODE_BATCH, heads=DECODE_HEADS, head_dim=DECODE_HEAD_DIM)
        for dtype in dtypes
        for q_len in (1, 16, 128)
        for kv_len in (4096, 16384, 32768)
    ]
    return sorted(cases, key=lambda case: case.priority)


def dry_run_plan(dtypes: tuple[str, ...]) -> list[Case]:
    """Tiny shapes that walk every code path of the harness on a CPU in a minute or two."""
    cases = [
        sweep_case(causal, dtype, 16, seq_len, TRAINING_PASSES, 0, tokens=64, width=32)
        for causal in (True, False)
        for dtype in dtypes
        for seq_len in (16, 32)
    ]
    cases += [
        sweep_case(True, dtype, 16, 32, TRAINING_PASSES, 1, suite="gqa", tokens=64, width=64, kv_group=2)
        for dtype in dtypes
    ]
    cases += [
        decode_case(dtype, q_len, 48, 2, batch=2, heads=2, head_dim=16)
        for dtype in dtypes
        for q_len in (1, 4)
    ]
    return cases


PLANS = {"quick": quick_plan, "full": full_plan, "dry-run": dry_run_plan}
