"""Ways to break a valid call of core.attention, each with the error it must raise.

A call is a dict of core.attention's arguments. A `Breakage` rewrites some of them (`touches`) in one of
several forms; the bad-input property combines breakages that touch disjoint arguments, so whichever
check core runs first, the error must be one of theirs: the documented type (TypeError for what a
value is, ValueError for what it holds) and a message that names the problem.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

import numpy as np
import torch

import core

Call = dict


@dataclass(frozen=True)
class Breakage:
    touches: frozenset[str]
    error: type[Exception]
    message: str  # a regular expression the error message must match
    forms: tuple[Callable[[Call], None], ...]


def _replace(name: str, transform) -> Callable[[Call], None]:
    def apply(call: Call) -> None:
        call[name] = transform(call[name])

    return apply


def _replace_all(transform, names="qkv") -> Callable[[Call], None]:
    def apply(call: Call) -> None:
        for name in names:
            call[name] = transform(call[name])

    return apply


def _set(name: str, value) -> Callable[[Call], None]:
    return _replace(name, lambda _: value)


def _grow(dim: int, by: int = 1):
    """The tensor with `by` more entries along `dim` (copies of its first ones)."""
    return lambda t: torch.cat(
        [t, t.narrow(dim, 0, 1).expand(*(by if d == dim else -1 for d in range(t.dim())))], dim
    )


def _heads(q_heads: int, kv_heads: int) -> Callable[[Call], None]:
    """q with q_heads heads and k, v with kv_heads, everything else unchanged."""

    def apply(call: Call) -> None:
        for name, heads in (("q", q_heads), ("k", kv_heads), ("v", kv_heads)):
            t = call[name]
            call[name] = t.detach()[:, :1].expand(t.shape[0], heads, *t.shape[2:])

    return apply


def _expanded_to(batch: int, q_heads: int) -> Callable[[Call], None]:
    """Batch and query heads past CUDA's grid limit, at no memory cost (stride-0 views)."""

    def apply(call: Call) -> None:
        for name in "qkv":
            t = call[name].detach()[:1, :1]
            call[name] = t.expand(batch, q_heads if name == "q" else 1, *t.shape[2:])

    return apply


def _jagged(t: torch.Tensor) -> torch.Tensor:
    """A nested (jagged) tensor of the same rank: one (N, H, D) component per batch entry."""
    return torch.nested.as_nested_tensor([x.detach().transpose(0, 1) for x in t], layout=torch.jagged)


_NOT_TENSORS = (
    lambda t: t.tolist(),
    lambda t: t.detach().float().cpu().numpy(),
    lambda t: None,
    lambda t: 1.0,
)
_UNSUPPORTED_DTYPES = (torch.float64, torch.int32, torch.int8, torch.bool, torch.complex64, torch.uint8)
# CPU tensors are valid under the interpreter; on a GPU they are an off-device input like meta ones.
_OTHER_DEVICES = ("meta",) if core.is_interpreted() else ("meta", "cpu")


def _other_float(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32 if t.dtype != torch.float32 else torch.float16)


CATALOGUE: dict[str, Breakage] = {
    **{
        f"{name}_not_a_tensor": Breakage(
            frozenset(name),
            TypeError,
            rf"{name} must be a torch\.Tensor",
            tuple(_replace(name, f) for f in _NOT_TENSORS),
        )
        for name in "qkv"
    },
    "wrong_rank": Breakage(
        frozenset("qkv"),
        ValueError,
        r"must have 4 dims",
        (
            _replace("q", lambda t: t[0]),
            _replace("k", lambda t: t[None]),
            _replace("v", lambda t: t[..., None]),
            _replace_all(lambda t: t[0, 0]),
        ),
    ),
    "unsupported_dtype": Breakage(
        frozenset("qkv"),
        TypeError,
        r"has dtype .*accepts float16, bfloat16 or float32",
        (
            *(_replace_all(lambda t, d=d: t.detach().to(d)) for d in _UNSUPPORTED_DTYPES),
            _replace("v", lambda t: t.detach().double()),
        ),
    ),
    "mixed_dtypes": Breakage(
        frozenset("kv"),
        TypeError,
        r"share one dtype",
        (_replace("k", _other_float), _replace("v", _other_float)),
    ),
    "off_device": Breakage(
        frozenset("qkv"),
        ValueError,
        r"device|CPU tensors",
        tuple(
            f
            for d in _OTHER_DEVICES
            for f in (_replace_all(lambda t, d=d: t.to(d)), _replace("k", lambda t, d=d: t.to(d)))
        ),
    ),
    "k_v_shapes_differ": Breakage(
        frozenset("v"),
        ValueError,
        r"k and v must have the same shape",
        tuple(_replace("v", _grow(d)) for d in (1, 2, 3)),
    ),
    "batch_differs": Breakage(
        frozenset("kv"), ValueError, r"batch size differs", (_replace_all(_grow(0), "kv"),)
    ),
    "head_dim_differs": Breakage(
        frozenset("kv"),
        ValueError,
        r"head dim differs",
        (_replace_all(_grow(3), "kv"), _replace_all(_grow(3, 7), "kv")),
    ),
    "empty_dim": Breakage(
        frozenset("qkv"),
        ValueError,
        r"is 0; every dimension",
        (
            _replace_all(lambda t: t[:0]),
            _replace("q", lambda t: t[:, :0]),
            _replace_all(lambda t: t[:, :0], "kv"),
            _replace("q", lambda t: t[:, :, :0]),
            _replace_all(lambda t: t[:, :, :0], "kv"),
            _replace_all(lambda t: t[..., :0]),
        ),
    ),
    "head_dim_too_large": Breakage(
        frozenset("qkv"),
        ValueError,
        r"larger than the supported maximum",
        (
            _replace_all(lambda t: t.new_zeros(*t.shape[:3], 257)),
            _replace_all(lambda t: t.new_zeros(*t.shape[:3], 512)),
        ),
    ),
    "heads_not_a_multiple": Breakage(
        frozenset("qkv"), ValueError, r"not a multiple", (_heads(3, 2), _heads(5, 3), _heads(2, 4))
    ),
    "grid_too_large": Breakage(
        frozenset("qkv"), ValueError, r"at most 65535", (_expanded_to(65536, 1), _expanded_to(1, 65536))
    ),
    "causal_not_bool": Breakage(
        frozenset({"causal"}),
        TypeError,
        r"causal must be a bool",
        tuple(_set("causal", x) for x in (0, 1, None, "True", np.bool_(True), torch.tensor(True))),
    ),
    "return_lse_not_bool": Breakage(
        frozenset({"return_lse"}),
        TypeError,
        r"return_lse must be a bool",
        tuple(_set("return_lse", x) for x in (0, 1, None, "yes", np.bool_(False), torch.tensor(False))),
    ),
    "sm_scale_is_a_tensor": Breakage(
        frozenset({"sm_scale"}),
        TypeError,
        r"not a tensor",
        tuple(_set("sm_scale", x) for x in (torch.tensor(0.5), torch.tensor([0.5]), torch.tensor(1))),
    ),
    "sm_scale_not_real": Breakage(
        frozenset({"sm_scale"}),
        TypeError,
        r"sm_scale must be a real number",
        tuple(_set("sm_scale", x) for x in ("0.5", 1j, True, Decimal("0.5"), [0.5], np.complex64(1))),
    ),
    "sm_scale_not_finite": Breakage(
        frozenset({"sm_scale"}),
        ValueError,
        r"sm_scale must be finite",
        tuple(
            _set("sm_scale", x)
            for x in (float("nan"), float("inf"), -float("inf"), np.float32("inf"), 10**400)
        ),
    ),
    # The kernels take the scale as a float32 with log2(e) folded in: beyond 2.36e38 it is inf.
    "sm_scale_beyond_float32": Breakage(
        frozenset({"sm_scale"}),
        ValueError,
        r"\|sm_scale\| must be at most",
        tuple(_set("sm_scale", x) for x in (2.4e38, -2.4e38, 3.5e38, 1e300, np.float64(-1e39))),
    ),
    # Sparse and nested tensors have no strides for the kernels to read.
    "not_strided": Breakage(
        frozenset("qkv"),
        TypeError,
        r"strided|layout|sparse|nested",
        (
            _replace("q", lambda t: t.detach().to_sparse()),
            _replace_all(lambda t: t.detach().to_sparse()),
            _replace_all(_jagged),
        ),
    ),
}
