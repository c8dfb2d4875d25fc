"""Access to the real kernel (packages/core): compiled on a GPU, or under Triton's CPU interpreter.

The interpreter must be chosen before core's @triton.jit kernels are imported, so `load` is the one
place that imports core and every experiment reaches the kernel through this module.
"""

from __future__ import annotations

import math
import os

import torch

__all__ = ["block_config", "forward", "forward_backward", "load"]

_core = None


def load(mode: str):
    """Import core for `mode` ("cpu": interpreter, "gpu": compiled) and return it."""
    global _core
    if _core is None:
        if mode == "cpu":
            os.environ["TRITON_INTERPRET"] = "1"
        import core

        if core.is_interpreted() != (mode == "cpu"):
            raise RuntimeError(f"core was imported for the other mode than {mode!r} (TRITON_INTERPRET)")
        _core = core
    return _core


def block_config(block_m: int, block_n: int, head_dim: int = 64):
    """A launch config with these tiles: one warp under the interpreter, a sensible GPU setting otherwise."""
    from core._config import KernelConfig

    if _core.is_interpreted():
        return KernelConfig(block_m, block_n, num_warps=1, num_stages=1)
    return KernelConfig(block_m, block_n, num_warps=8 if block_m * head_dim >= 128 * 128 else 4, num_stages=2)


def forward(q, k, v, *, causal: bool = False, sm_scale: float | None = None, config=None):
    """(out, lse2) of the kernel, lse2 the base-2 LSE it saves (natural LSE = lse2 * ln 2); `config`
    (block_config) overrides the default tiles."""
    from core import _launch

    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    with torch.no_grad():
        return _launch.attention_forward(q, k, v, causal, scale, config)


def forward_backward(q, k, v, dout, *, causal: bool = False, sm_scale: float | None = None) -> dict:
    """out, lse2 and the gradients of sum(out * dout), through the autograd function behind
    core.attention (default tiles), which hands out the base-2 LSE the backward reads."""
    from core._autograd import FlashAttentionFunction

    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, lse2 = FlashAttentionFunction.apply(*leaves, causal, scale)
    out.backward(dout)
    grads = [x.grad for x in leaves]
    return {"out": out.detach(), "lse2": lse2.detach(), "dq": grads[0], "dk": grads[1], "dv": grads[2]}


def arithmetic(input_format: str, block_m: int, block_n: int):
    """The emulator settings that reproduce the kernel as it runs here, with these tiles: the defaults
    (round to nearest everywhere, a Kahan-compensated row sum) and, for fp32 inputs, Kahan-summed dots.

    Under the interpreter core patches Triton's bf16 casts to round to nearest (`core._runtime`), so the
    interpreted kernel and the compiled one round alike and one setting serves both.
    """
    from numerics.emulator import KERNEL

    return KERNEL.with_(block_m=block_m, block_n=block_n, kahan=input_format == "fp32")
