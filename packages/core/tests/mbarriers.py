"""An mbarrier's phases, for the models of the Hopper kernels' protocols (test_hopper_turns.py,
test_hopper_backward_protocol.py): a phase completes when its expected arrivals are in, and a wait on
parity P passes once the phase of that parity has completed (a fresh barrier has completed the phase
"before its first")."""

from __future__ import annotations


class Barrier:
    def __init__(self, count: int):
        self.count, self.pending, self.phase = count, 0, 0

    def arrive(self):
        self.pending += 1
        if self.pending == self.count:
            self.pending, self.phase = 0, self.phase + 1

    def passes(self, parity: int) -> bool:
        return (self.phase & 1) != parity
