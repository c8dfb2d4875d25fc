"""A model of the Hopper backward's synchronisation (core.kernels.hopper.backward: _produce, _consume),
run on the CPU over random interleavings of several programs: the kernel cannot run here, and a protocol
error on the GPU is a hang or a dQ summed out of order.

Each program (one key block) has three agents, generators that yield what they wait on: an mbarrier
phase (a wait on parity P passes once the phase of that parity has completed; a fresh barrier has
completed the phase "before its first"), or a turn counter reaching a value. Copy-engine transfers land
at random later moments. Programs start in grid order, at most `resident` at once (one per SM, and the
GPU dispatches in increasing program id), a new one when one ends. The model follows the kernel line
for line in what it waits on and arrives at; a change to one is a change to the other."""

from __future__ import annotations

import random

import pytest

from .mbarriers import Barrier


def visits(key_block: int, n_query_blocks: int, members: int, causal: bool) -> list[tuple[int, int]]:
    """The (group member, query block) steps of one program, in the kernel's order: each member's query
    blocks from the last down to the first that sees the program's keys (two query blocks a key block,
    Nq = Nk, when causal)."""
    first = min(2 * key_block, n_query_blocks) if causal else 0
    return [(m, b) for m in range(members) for b in range(n_query_blocks - 1, first - 1, -1)]


def run(n_key_blocks, n_query_blocks, members, causal, stages, resident, seed, deterministic=True,
        order=None):  # fmt: skip
    """("ok" or "deadlock", the adds as (member, query block, key block) in the order they landed).
    `order`: the programs' dispatch order (the grid's by default)."""
    rng = random.Random(seed)
    turns: dict[tuple[int, int], int] = {}
    adds, transfers = [], []

    def program(key_block):
        steps = visits(key_block, n_query_blocks, members, causal)
        kv_ready, dq_ready, dq_free = Barrier(1), Barrier(1), Barrier(1)
        q_ready, do_ready = [Barrier(1) for _ in range(stages)], [Barrier(1) for _ in range(stages)]
        qdo_empty = [Barrier(2) for _ in range(stages)]

        def producer():
            transfers.append(kv_ready)
            for step in range(len(steps)):
                stage = step % stages
                yield ("barrier", qdo_empty[stage], ((step // stages) & 1) ^ 1)
                transfers.extend((q_ready[stage], do_ready[stage]))

        def consumer(c):
            yield ("barrier", kv_ready, 0)
            for step, (member, block) in enumerate(steps):
                stage, phase = step % stages, (step // stages) & 1
                yield ("barrier", q_ready[stage], phase)
                yield ("barrier", do_ready[stage], phase)
                if c == 0:
                    qdo_empty[stage].arrive()
                    yield ("barrier", dq_free, (step & 1) ^ 1)
                    dq_ready.arrive()
                else:
                    yield ("barrier", dq_ready, step & 1)
                    dq_free.arrive()
                    qdo_empty[stage].arrive()
                    if deterministic:
                        yield ("turn", (member, block), key_block)
                    adds.append((member, block, key_block))
                    if deterministic:
                        turns[(member, block)] = key_block + 1

        return [producer(), consumer(0), consumer(1)]

    def ready(wait) -> bool:
        kind, what, value = wait
        if kind == "barrier":
            return what.passes(value)
        return turns.get(what, 0) == value

    waiting = list(order if order is not None else range(n_key_blocks))
    running: list[list] = []  # per resident program: its agents as [generator, current wait]
    while waiting or running:
        while waiting and len(running) < resident:
            agents = [[agent, None] for agent in program(waiting.pop(0))]
            for entry in agents:
                entry[1] = next(entry[0], "done")
            running.append(agents)
        runnable = [e for agents in running for e in agents if e[1] != "done" and ready(e[1])]
        if not runnable and not transfers:
            return "deadlock", adds
        if transfers and (not runnable or rng.random() < 0.3):
            transfers.pop(rng.randrange(len(transfers))).arrive()
            continue
        entry = rng.choice(runnable)
        entry[1] = next(entry[0], "done")
        running = [agents for agents in running if any(e[1] != "done" for e in agents)]
    return "ok", adds


SHAPES = [
    # (key blocks, query blocks, group members, causal): Nq = 2 Nk (64-row query blocks, 128-key
    # blocks); GQA groups; more query blocks than a program's ring.
    (4, 8, 1, True),
    (4, 8, 1, False),
    (3, 6, 2, True),
    (5, 10, 3, False),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("resident", [1, 2, 3])
def test_no_deadlock_and_adds_in_key_block_order(shape, resident):
    n_key_blocks, n_query_blocks, members, causal = shape
    for seed in range(150):
        outcome, adds = run(n_key_blocks, n_query_blocks, members, causal, 2, resident, seed)
        assert outcome == "ok", f"deadlock: seed {seed}"
        expected = {}
        for key_block in range(n_key_blocks):
            for step in visits(key_block, n_query_blocks, members, causal):
                expected.setdefault(step, []).append(key_block)
        landed = {}
        for member, block, key_block in adds:
            landed.setdefault((member, block), []).append(key_block)
        assert landed == expected, f"adds out of key block order or missing: seed {seed}"


def test_unordered_mode_adds_everything_once():
    for seed in range(100):
        outcome, adds = run(4, 8, 2, True, 2, 3, seed, deterministic=False)
        assert outcome == "ok"
        assert sorted(adds) == sorted((m, b, kb) for kb in range(4) for m, b in visits(kb, 8, 2, True))


def test_the_model_finds_a_deadlock_when_dispatch_is_out_of_order():
    """The check can fail: a program that waits for a later key block's turn, alone on the GPU, hangs."""
    outcomes = {run(3, 6, 1, False, 2, 1, seed, order=[1, 0, 2])[0] for seed in range(20)}
    assert outcomes == {"deadlock"}
