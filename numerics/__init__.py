"""The numerics lab: where the kernel's rounding error comes from, how it grows, and what tolerances it
justifies. `python -m numerics` runs it (see numerics/__main__.py); docs/numerics.md is its report.

Importing this package imports neither torch's kernels nor core: the run decides first whether core's
kernels are built for the Triton interpreter or the GPU (numerics.kernel.load).
"""
