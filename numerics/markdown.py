"""Small helpers that turn result numbers into the markdown of docs/numerics.md."""

from __future__ import annotations

import math

__all__ = ["e", "pct", "table"]


def e(x, digits: int = 1) -> str:
    """1.9e-04 style, or a dash for a missing value."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}e}"


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
