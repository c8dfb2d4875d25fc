"""Input builders and the one comparison every accuracy test makes (kernel vs float64 vs eager)."""

from __future__ import annotations

import torch

import core
from core.tolerance import Verdict, judge, largest_finite

from .conftest import DEVICE

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def make_qkv(
    batch, q_heads, kv_heads, n_queries, n_keys, head_dim, dtype, *, seed, layout="bhsd", requires_grad=True
):
    """Random q (B, Hq, Nq, D), k, v (B, Hkv, Nk, D) from a private generator.

    layout "bhsd": contiguous. "bshd": views of (B, N, H, D) storage, as a model's projections produce.
    "sliced": every tensor is a strided slice of a larger one (heads and head dim with gaps), so
    neither the head nor the sequence stride is the dense one.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def one(heads, n):
        # Random values are drawn in float32 and cast before any view is taken, so the views stay views.
        def draw(*shape):
            return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)

        if layout == "bhsd":
            x = draw(batch, heads, n, head_dim)
        elif layout == "bshd":
            x = draw(batch, n, heads, head_dim).transpose(1, 2)
        elif layout == "sliced":
            x = draw(batch, 2 * heads, n + 3, head_dim + 5)[:, ::2, 3:, 2 : 2 + head_dim]
        else:
            raise ValueError(layout)
        return x.requires_grad_(requires_grad)

    return one(q_heads, n_queries), one(kv_heads, n_keys), one(kv_heads, n_keys)


def leaf_copy(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad)


def compare_with_reference(
    q, k, v, *, causal, sm_scale=None, grads=True, seed=0, window_size=(-1, -1), softcap=0.0
) -> list[Verdict]:
    """Run the kernel, the float64 truth and the eager same-dtype reference on the same inputs and
    return one tolerance verdict per quantity (out, lse and, with grads, dq/dk/dv)."""
    options = {"causal": causal, "sm_scale": sm_scale, "window_size": window_size, "softcap": softcap}
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    dout = torch.randn(q.shape, generator=gen).to(device=q.device, dtype=q.dtype)

    def run(fn, dtype):
        qq, kk, vv = leaf_copy(q, dtype), leaf_copy(k, dtype), leaf_copy(v, dtype)
        out, lse = fn(qq, kk, vv)
        if grads:
            (out * dout.to(out.dtype)).sum().backward()
        return out.detach(), lse.detach(), [t.grad for t in (qq, kk, vv)] if grads else []

    kernel = run(lambda a, b, c: core.attention(a, b, c, **options, return_lse=True), None)
    truth = run(lambda a, b, c: core.attention_reference(a, b, c, **options, return_lse=True), torch.float64)
    eager = run(
        lambda a, b, c: core.attention_reference(a, b, c, **options, return_lse=True, compute_dtype=None),
        None,
    )
    verdicts = [
        judge("out", kernel[0], truth[0], eager[0]),
        judge("lse", kernel[1], truth[1], eager[1], input_dtype=q.dtype),
    ]
    if grads:
        gradient_scale = largest_finite(*truth[2])
        for name, got, true, approx in zip(("dq", "dk", "dv"), kernel[2], truth[2], eager[2]):
            verdicts.append(judge(name, got, true, approx, family_scale=gradient_scale))
    return verdicts


def assert_all_within_tolerance(verdicts: list[Verdict]) -> None:
    failed = [str(v) for v in verdicts if not v.ok]
    assert not failed, "outside the tolerance policy:\n" + "\n".join(failed)
