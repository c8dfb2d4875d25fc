"""The experiments, in report order.

Each module has a TITLE, `run(lab) -> dict` (the measurements of one mode, saved as JSON by the
caller) and `section(cpu, gpu, figure) -> (markdown, findings)`, which draws its figure from the saved
CPU and/or GPU records and says in words what they show.
"""

from __future__ import annotations

import importlib

NAMES = [
    "e0_fidelity",
    "e1_fa3_table",
    "e2_growth_with_n",
    "e3_rescales",
    "e4_entropy",
    "e5_p_cast",
    "e6_ties",
    "e7_backward",
    "e8_tolerance",
    "e9_closing_the_gap",
    "e10_softcap_window",
    "e11_delta",
]


def load(name: str):
    return importlib.import_module(f"numerics.experiments.{name}")
