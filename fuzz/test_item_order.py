"""The fuzzer's item order (fuzz/conftest.py): round-robin over the properties, so that a time box that
ends a GPU run skips every property's last families rather than the last properties altogether."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fuzz.conftest import _interleave_by_property


@dataclass
class Item:
    path: Path
    originalname: str
    family: str

    @property
    def nodeid(self) -> str:
        return f"{self.path}::{self.originalname}[{self.family}]"


def test_items_take_turns_by_property_and_keep_their_own_order():
    items = [
        Item(Path("fuzz/test_a.py"), "test_one", family)
        for family in ("f16-causal", "f16-full", "f32-causal")
    ] + [Item(Path("fuzz/test_a.py"), "test_two", "f16-causal")] + [
        Item(Path("fuzz/test_b.py"), "test_three", family) for family in ("f16-causal", "f16-full")
    ]  # fmt: skip
    _interleave_by_property(items)
    assert [(i.originalname, i.family) for i in items] == [
        ("test_one", "f16-causal"), ("test_two", "f16-causal"), ("test_three", "f16-causal"),
        ("test_one", "f16-full"), ("test_three", "f16-full"),
        ("test_one", "f32-causal"),
    ]  # fmt: skip
