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
def patch_interpreter_bf16_dot() -> None:
    """Make the interpreter's `tl.dot` multiply bf16 values instead of their bit patterns.

    The interpreter stores bf16 as uint16 and hands those raw integers to numpy's matmul
    (triton-lang/triton#11584, open). Converting each bf16 operand to float32 first is exact (every
    bf16 is a float32), and a float32 matmul of the widened values is what the GPU's bf16 tensor-core
    dot computes: exact products summed in float32. Only the interpreter is patched; the compiled GPU
    kernel is untouched.
    """
    import triton.language as tl
    from triton.runtime import interpreter

    builder_cls = interpreter.InterpreterBuilder
    original_dot = builder_cls.create_dot

    def widen(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        as_f32 = (handle.data.astype(np.uint32) << 16).view(np.float32)
        return interpreter.TensorHandle(as_f32, tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    builder_cls.create_dot = create_dot
