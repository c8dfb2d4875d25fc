"""Where the kernels run: compiled on a CUDA GPU, or under Triton's CPU interpreter.

The interpreter is chosen by Triton itself when `TRITON_INTERPRET=1` is set before the kernel modules
are imported; `is_interpreted()` reads that decision off a kernel object rather than guessing.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.cache
def is_interpreted() -> bool:
    """True when core's kernels were built for Triton's CPU interpreter."""
    from core.kernels.portable.forward import attention_forward_kernel

    return type(attention_forward_kernel).__name__ == "InterpretedFunction"


def install_scratch_allocator() -> None:
    """Give Triton an allocator for the global scratch memory in which kernels build their tensor
    descriptors, unless the caller has set one (triton.set_allocator). Triton keeps its allocator in a
    context variable, so this runs per launch (a lookup) rather than once at import."""
    from triton.runtime import _allocation

    if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
        _allocation._allocator.set(_reused_scratch)


# Per device: the largest scratch buffer handed out so far on its default stream, and that stream's
# handle. Launches on one stream run one after another, so they can share the buffer; each program writes
# its descriptors before it reads them.
_SCRATCH: dict = {}
_DEFAULT_STREAMS: dict = {}


def _reused_scratch(size: int, alignment: int, stream: int):
    """Triton's allocator protocol. A fresh torch.empty per launch costs a large part of a small
    call's host time; reusing the default stream's buffer costs two dict lookups.
    A launch on any other stream gets a fresh buffer: CUDA graphs capture on a side stream (a
    graph-private buffer, so replays never share memory with launches outside the graph), and
    torch.compile's CUDA graph trees warm up on a side stream whose allocations land in the graph's
    private pool, where a buffer kept here would be a live allocation the graph does not own (which
    the trees refuse)."""
    import torch

    device = torch.cuda.current_device()
    default_stream = _DEFAULT_STREAMS.get(device)
    if default_stream is None:
        default_stream = _DEFAULT_STREAMS[device] = torch.cuda.default_stream(device).cuda_stream
    if stream != default_stream:
        return torch.empty(size, dtype=torch.int8, device="cuda")
    buffer = _SCRATCH.get(device)
    if buffer is None or buffer.numel() < size:
        # The old buffer (if any) goes back to PyTorch's pool in this stream's order, after its last use.
        buffer = _SCRATCH[device] = torch.empty(size, dtype=torch.int8, device="cuda")
    return buffer


def float64_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b in float64, every element summed in the same order (k ascending) in long double whatever
    the shapes: numpy's matmul takes its plain loop, not BLAS, for long double. The numerics emulator
    computes the float32 kernels' score dots with this too."""
    return np.matmul(a.astype(np.longdouble), b.astype(np.longdouble)).astype(np.float64)


@functools.cache
def patch_interpreter() -> None:
    """Make the interpreter's arithmetic what the GPU's is, where the kernels' correctness depends on it.

    - `tl.dot` on bf16 hands the raw uint16 bit patterns to numpy's matmul
      (triton-lang/triton#11584, open). Widening each bf16 operand to float32 first is exact (every
      bf16 is a float32).
    - `tl.dot` is one BLAS matmul per call, whose summation order depends on the operands' shapes and
      positions: element (i, j) of q @ k^T and element (j, i) of k @ q^T can differ in the last bit.
      The kernels rely on such pairs agreeing exactly, as they do on the GPU, where an element's sum
      does not depend on the tile shape (and float32 head-dim dots are float64 dots rounded once,
      core.kernels.shared._dot_parts): the scores that the backward recomputes must be the forward's
      (else a peaky row's P = exp(s - LSE) is off by eps32 * |s| relative), and Delta = rowsum(dO * O)
      must equal dP = dO . v for a one-hot row, whose O is v (else dS keeps noise that sm_scale
      multiplies into dq and dk, where eager attention gets exactly 0). Both were found by the fuzzer.
      Here every dot sums its exact products in float64 and rounds once to float32, which no summation
      order can change (short of a float64 sum landing within 1e-16 of a float32 rounding boundary).
      float32 kernels take their dots in float64 and keep the score dot's rounding error to float32
      (core.kernels.shared._scores), which does see a float64 sum's last bits: those dots sum in one fixed
      order, k ascending in extended precision (numpy's non-BLAS long double matmul), whatever the
      operands' shapes.
    - float32 -> bf16 casts truncate the mantissa instead of rounding to nearest even as the GPU does,
      which biases every rounded P, dS and output towards zero (the numerics lab, experiment 0,
      measured 2x the GPU's error on bf16 outputs).
    - Before Triton 3.9, a scalar used as a Python index (a loop bound) is converted by int() on its
      one-element array, which numpy 2.4 and later refuse for arrays of one dimension: every kernel
      with a computed loop bound fails. Triton 3.9 squeezes the array first; so does this.

    Only the interpreter is patched; the compiled GPU kernels are untouched.
    """
    import triton.language as tl
    from triton.runtime import interpreter

    builder_cls = interpreter.InterpreterBuilder
    original_dot = builder_cls.create_dot
    original_cast = builder_cls.cast_impl

    def as_float64(handle) -> np.ndarray:
        if handle.dtype.scalar == tl.bfloat16:
            return (handle.data.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        return handle.data.astype(np.float64)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if not (a.dtype.scalar.is_floating() and a.dtype.scalar.primitive_bitwidth >= 16):
            return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        exact_sum = (
            float64_dot(a.data, b.data)
            if a.dtype.scalar == tl.float64
            else np.matmul(as_float64(a), as_float64(b))
        )
        return interpreter.TensorHandle(exact_sum.astype(d.data.dtype) + d.data, d.dtype.scalar)

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

    original_patch_tensor = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope) -> None:
        original_patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor
