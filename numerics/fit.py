"""Fitted laws: error = c * x^gamma, with a confidence interval on gamma."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

__all__ = ["PowerLaw", "power_law"]


@dataclass(frozen=True)
class PowerLaw:
    exponent: float
    low: float  # confidence interval of the exponent
    high: float
    prefactor: float
    r2: float
    points: int

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.exponent:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def power_law(x, y, confidence: float = 0.95) -> PowerLaw:
    """Least squares on log y = log c + gamma log x over every (x, y) point (seeds are separate points,
    so their scatter enters the interval). The interval is Student-t on the slope's standard error."""
    lx, ly = np.log(np.asarray(x, dtype=float)), np.log(np.asarray(y, dtype=float))
    fit = stats.linregress(lx, ly)
    half = stats.t.ppf(0.5 + confidence / 2, len(lx) - 2) * fit.stderr
    return PowerLaw(
        float(fit.slope),
        float(fit.slope - half),
        float(fit.slope + half),
        float(np.exp(fit.intercept)),
        float(fit.rvalue**2),
        len(lx),
    )
