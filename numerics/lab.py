"""The run context of the experiments: where they run, what they record about the machine, where the
results go. Results are small JSON files; plots and docs are regenerated from them by numerics.report."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

__all__ = ["RESULTS", "Lab", "kernel_fingerprint", "load_results"]

RESULTS = Path(__file__).parent / "results"


def kernel_fingerprint() -> str:
    """A short hash of core's kernel sources (core.testing.kernel_fingerprint), saved with every result so
    that the report can tell runs of different kernels apart (the CPU and GPU parts are run at different
    times, on different machines)."""
    import core.testing

    return core.testing.kernel_fingerprint()


@dataclass
class Lab:
    mode: str  # "cpu": emulator + Triton interpreter at small sizes; "gpu": the compiled kernel
    out_dir: Path
    started: float = field(default_factory=time.time)

    @property
    def device(self) -> str:
        return "cuda" if self.mode == "gpu" else "cpu"

    @property
    def on_gpu(self) -> bool:
        return self.mode == "gpu"

    def pick(self, cpu, gpu):
        """The size (or list of sizes) of this mode."""
        return gpu if self.on_gpu else cpu

    def meta(self) -> dict:
        import triton

        if self.on_gpu:
            device = torch.cuda.get_device_name()
        else:
            device = f"{platform.processor() or platform.machine()} CPU (Triton interpreter)"
        return {
            "mode": self.mode,
            "device": device,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "core_kernels": kernel_fingerprint(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        }

    def save(self, name: str, payload: dict, wall_s: float) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{name}.json"
        record = _compact({"experiment": name, "meta": self.meta(), "wall_s": wall_s, **payload})
        # One line per list entry: small files that still diff line by line.
        text = json.dumps(record, separators=(",", ":")).replace('},{"', '},\n{"')
        path.write_text(text + "\n")
        return path


def _compact(x):
    """numpy scalars to Python, floats to 4 significant digits (errors need no more)."""
    if isinstance(x, dict):
        return {k: _compact(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_compact(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float):
        return float(f"{x:.4g}")
    return x


def load_results(directory: Path) -> dict[str, dict]:
    """experiment name -> its saved record, for every JSON file in `directory` (empty if none)."""
    if not directory.is_dir():
        return {}
    return {p.stem: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}
