"""Access to the real kernel (packages/core): compiled on a GPU, or under Triton's CPU interpreter.

The interpreter must be chosen before core's @triton.jit kernels are imported, so `load` is the one
place that imports core and every experiment reaches the kernel through this module.
"""

from __future__ import annotations

import os

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
    from core.testing import portable

    KernelConfig = portable.config.KernelConfig

    if _core.is_interpreted():
        return KernelConfig(block_m, block_n, num_warps=1, num_stages=1)
    return KernelConfig(block_m, block_n, num_warps=8 if block_m * head_dim >= 128 * 128 else 4, num_stages=2)


def forward(q, k, v, *, causal: bool = False, sm_scale: float | None = None, config=None):
    """(out, lse, lse_low) of the kernel as core.testing.forward returns them: lse the LSE it
    saves, in its base (base 2 for fp16/bf16: natural LSE = lse * ln 2; natural for fp32), lse_low its
    low parts ((1 or 2, B, H, N), core.ops). `config` (block_config) overrides the
    default tiles."""
    import core.testing

    return core.testing.forward(q, k, v, causal=causal, sm_scale=sm_scale, config=config)


def forward_backward(q, k, v, dout, *, causal: bool = False, sm_scale: float | None = None) -> dict:
    """out, lse, lse_low (as `forward` returns them) and the gradients of sum(out * dout), by core's
    launchers with the default tiles, as core.attention's autograd function calls them when only out is
    used (no LSE gradient). The launchers, not the autograd function, because it keeps lse_low to itself."""
    import core.testing

    out, lse, lse_low = core.testing.forward(q, k, v, causal=causal, sm_scale=sm_scale)
    dq, dk, dv = core.testing.backward(
        dout, None, q, k, v, out, lse, lse_low, causal=causal, sm_scale=sm_scale
    )
    return {"out": out, "lse": lse, "lse_low": lse_low, "dq": dq, "dk": dk, "dv": dv}


def arithmetic(input_format: str, block_m: int, block_n: int):
    """The emulator settings that reproduce the kernel as it runs here, with these tiles: the defaults
    (base 2, round to nearest everywhere, a Kahan-compensated row sum) and, for fp32 inputs, natural
    base, Kahan-summed dots, two-part scores and running max (the dot's and the scale's rounding errors);
    a two-part LSE for every format, whose low part fp16/bf16 drop below |LSE2| = 2^8, and for fp32 the
    backward's Delta summed from P * dP (core.testing.uses_base_2; the portable forward kernel's
    COMPENSATE and _scores; the portable backward's _probabilities and backward_dq_kernel). The fp32
    dots are float64 dots rounded once to float32, the exact-sum dot the emulator takes for every
    dot, so they need no setting.

    Under the interpreter core patches Triton's bf16 casts to round to nearest and its dots to round
    their exact sums once (`core._runtime.patch_interpreter`), so the interpreted kernel and the compiled
    one round alike and one setting serves both.
    """
    from numerics.emulator import KERNEL

    fp32 = input_format == "fp32"
    return KERNEL.with_(
        block_m=block_m,
        block_n=block_n,
        exp="exp" if fp32 else "exp2",
        kahan=fp32,
        two_part_scores=fp32,
        two_part_lse=True,
        lse_low_negligible_below=0.0 if fp32 else 256.0,
        delta="p_dp" if fp32 else "p_dp_blocks",
    )
