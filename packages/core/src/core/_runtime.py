"""Where the kernels run: compiled on a CUDA GPU, or under Triton's CPU interpreter.

The interpreter is chosen by Triton itself when `TRITON_INTERPRET=1` is set before the kernel modules
are imported; `is_interpreted()` reads that decision off a kernel object rather than guessing.
"""

from __future__ import annotations

import functools

import numpy as np


def is_interpreted() -> bool:
    """True when core's kernels were built for Triton's CPU interpreter."""
    from core._fwd_kernel import attention_forward_kernel

    return type(attention_forward_kernel).__name__ == "InterpretedFunction"


@functools.cache
def patch_interpreter_bf16() -> None:
    """Make the interpreter's bf16 arithmetic what the GPU's is. Two upstream interpreter bugs:

    - `tl.dot` on bf16 hands the raw uint16 bit patterns to numpy's matmul
      (triton-lang/triton#11584, open). Widening each bf16 operand to float32 first is exact (every
      bf16 is a float32), and a float32 matmul of the widened values is what the GPU's bf16
      tensor-core dot computes: exact products summed in float32.
    - float32 -> bf16 casts truncate the mantissa instead of rounding to nearest even as the GPU does,
      which biases every rounded P, dS and output towards zero (the numerics lab, experiment 0,
      measured 2x the GPU's error on bf16 outputs).

    Only the interpreter is patched; the compiled GPU kernels are untouched.
    """
    import triton.language as tl
    from triton.runtime import interpreter

    builder_cls = interpreter.InterpreterBuilder
    original_dot = builder_cls.create_dot
    original_cast = builder_cls.cast_impl

    def widen(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        as_f32 = (handle.data.astype(np.uint32) << 16).view(np.float32)
        return interpreter.TensorHandle(as_f32, tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if not (src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16):
            return original_cast(self, src, dst_type)
        bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
        # Round to nearest, ties to even: add 0x7FFF plus the lowest kept bit, then drop 16 bits.
        rounded = ((bits.astype(np.uint64) + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        quiet_nan = ((bits >> 16) | 0x0040).astype(np.uint16)  # keep NaNs NaN (rounding could make inf)
        return interpreter.TensorHandle(np.where(np.isnan(src.data), quiet_nan, rounded), tl.bfloat16)

    builder_cls.create_dot = create_dot
    builder_cls.cast_impl = cast_impl
