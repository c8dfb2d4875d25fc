"""One look for every figure of the lab (Agg backend: the runs are headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = ["COLORS", "MARKERS", "new", "plt", "save"]

# Colours by what produced a number, so the same source reads the same in every figure.
COLORS = {
    "kernel": "#1f77b4",
    "emulator": "#17becf",
    "standard": "#d62728",
    "floor": "#2ca02c",
    "low precision": "#ff7f0e",
    "remedy": "#9467bd",
    "bound": "#7f7f7f",
    "sdpa": "#8c564b",
}
MARKERS = {"cpu": "o", "gpu": "s"}

plt.rcParams.update(
    {
        "figure.dpi": 110,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "legend.fontsize": 7.5,
        "legend.frameon": False,
        "axes.titlesize": 10,
        "axes.labelsize": 9,
        "xtick.labelsize": 8,
        "ytick.labelsize": 8,
    }
)


def new(ncols: int = 1, nrows: int = 1, width: float = 4.6, height: float = 3.4):
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    return fig, axes.ravel()


def save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90, pil_kwargs={"optimize": True})
    plt.close(fig)
