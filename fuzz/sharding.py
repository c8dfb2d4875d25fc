"""Every kernel property runs as six pytest items, one per (dtype, causal) kernel family.

Why: pytest-xdist spreads test items, not examples, over its workers, and on a GPU the cost of an example
is mostly Triton compiling the kernels for a family it has not seen. One item per family lets the
families compile in parallel, and reports failures per dtype and mask.

How: the test is parametrized with `kernel`; fuzz/conftest.py makes that family the current one while
hypothesis draws, and `strategies.problems()` draws its dtype and mask from it. Pinned @example cases
carry their own family and run only in it (`assume(belongs(kernel, case))`).
"""

from __future__ import annotations

import contextvars

import pytest
import torch

from fuzz.cases import Case

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNELS = tuple((dtype, causal) for dtype in DTYPES for causal in (True, False))

_current: contextvars.ContextVar[tuple[torch.dtype, bool] | None] = contextvars.ContextVar(
    "kernel", default=None
)


def _name(kernel: tuple[torch.dtype, bool]) -> str:
    dtype, causal = kernel
    return f"{str(dtype).removeprefix('torch.')}-{'causal' if causal else 'full'}"


per_kernel = pytest.mark.parametrize("kernel", KERNELS, ids=_name)


def current() -> tuple[torch.dtype, bool] | None:
    """The (dtype, causal) family of the running test item, or None outside a sharded test."""
    return _current.get()


def entered(kernel: tuple[torch.dtype, bool] | None) -> contextvars.Token:
    return _current.set(kernel)


def left(token: contextvars.Token) -> None:
    _current.reset(token)


def belongs(kernel: tuple[torch.dtype, bool], case: Case) -> bool:
    return (case.problem.dtype, case.problem.causal) == kernel
