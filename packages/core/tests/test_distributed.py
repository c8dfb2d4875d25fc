"""core.distributed: ring and Ulysses attention against core.attention on the whole sequence and the
float64 truth, judged by the tolerance policy.

Two kinds of test:
- single process: the layouts, the ring's step plan, the LocalRing (the whole ring in this process, on
  DEVICE: the CPU interpreter here, one GPU where there is one), input errors;
- multi-process: gloo process groups of 2 and 4 CPU processes under the Triton interpreter. Spawning
  processes that import torch and triton costs seconds each, so each world size is spawned once (a
  module fixture) and runs every case of CASES in turn, for every kernel family; rank 0 writes what it
  measured to a JSON file and the tests here judge it, one test per case.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import time
import traceback
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
from filelock import FileLock
from torch.utils._python_dispatch import TorchDispatchMode

import core
import core.distributed as cd
import core.testing
from core.distributed import layout as layouts
from core.tolerance import judge, largest_finite

from .helpers import leaf_copy, make_qkv

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
QUANTITIES = ("out", "lse", "dq", "dk", "dv")


# ---------------------------------------------------------------------------------------------------------
# What every comparison does: one loss through ring (or Ulysses) attention on shards, the same loss through
# core.attention, the float64 truth and the eager same-dtype reference on the whole sequence.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    world_size: int
    scheme: str  # "ring" or "ulysses"
    layout: str  # the sharding; Ulysses takes "contiguous"
    causal: bool
    dtype: str
    q_heads: int
    kv_heads: int
    head_dim: int
    chunk: int  # tokens per layout chunk: N = chunk x (2W for zigzag, W for contiguous)
    batch: int = 1
    bshd: bool = False  # inputs as (B, N, H, D) storage, sharded with seq_dim=1
    lse_loss: bool = False  # the loss also uses the returned LSE (its gradient path)
    repeat: bool = False  # run twice and require bitwise-identical results

    @property
    def length(self) -> int:
        return self.chunk * layouts.chunk_count(self.layout, self.world_size)

    @property
    def name(self) -> str:
        parts = [f"{self.world_size}ranks", self.scheme]
        parts += [self.layout] if self.scheme == "ring" else []
        parts += ["causal" if self.causal else "full", self.dtype, f"h{self.q_heads}-{self.kv_heads}"]
        parts += [f"d{self.head_dim}", f"n{self.length}", f"b{self.batch}"]
        parts += [flag for flag in ("bshd", "lse_loss", "repeat") if getattr(self, flag)]
        return "-".join(parts)


def _inputs(case: Case):
    """The whole q, k, v, dO and dLSE, the same on every rank (a private generator per case)."""
    dtype = DTYPES[case.dtype]
    seed = sum(map(ord, case.name))
    q, k, v = make_qkv(
        case.batch, case.q_heads, case.kv_heads, case.length, case.length, case.head_dim, dtype,
        seed=seed, layout="bshd" if case.bshd else "bhsd", requires_grad=False,
    )  # fmt: skip
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    dout = torch.randn(q.shape, generator=gen).to(device=q.device, dtype=dtype)
    dlse = torch.randn(q.shape[:-1], generator=gen).to(q.device) if case.lse_loss else None
    return q, k, v, dout, dlse


def _loss(out, lse, dout, dlse):
    loss = (out.float() * dout.float()).sum()
    return loss + (lse * dlse).sum() if dlse is not None else loss


def _shard(x, group, case: Case):
    """x's shard(s) as leaves; BSHD inputs are sharded along N of their (B, N, H, D) storage, as a model
    holds them, and passed as (B, H, N, D) views of the shards."""
    if case.bshd:
        shards = cd.shard_sequence(x.transpose(1, 2), group=group, layout=case.layout, seq_dim=1)
        shards = [s.transpose(1, 2) for s in shards] if isinstance(shards, list) else shards.transpose(1, 2)
    else:
        shards = cd.shard_sequence(x, group=group, layout=case.layout)
    if isinstance(shards, list):
        return [s.detach().requires_grad_() for s in shards]
    return shards.detach().requires_grad_()


def _whole_sequence_results(case: Case, q, k, v, dout, dlse):
    """(core.attention, float64 truth, eager same-dtype) results, each [out, lse, dq, dk, dv]."""

    def run(fn, dtype):
        leaves = [leaf_copy(t, dtype).requires_grad_() for t in (q, k, v)]
        out, lse = fn(*leaves)
        _loss(out, lse, dout.to(out.dtype), None if dlse is None else dlse.to(lse.dtype)).backward()
        return [out.detach(), lse.detach(), *(t.grad for t in leaves)]

    options = {"causal": case.causal, "return_lse": True}
    kernel = run(lambda a, b, c: core.attention(a, b, c, **options), None)
    truth = run(lambda a, b, c: core.attention_reference(a, b, c, **options), torch.float64)
    eager = run(lambda a, b, c: core.attention_reference(a, b, c, compute_dtype=None, **options), None)
    return kernel, truth, eager


def _measure(case: Case, sharded, whole) -> list[dict]:
    """One record per quantity: the sharded result's verdict against the truth (with the eager yardstick)
    and its distance to core.attention's, which must be within the same bound."""
    kernel, truth, eager = whole
    gradient_scale = largest_finite(*truth[2:])
    records = []
    for index, quantity in enumerate(QUANTITIES):
        options = {"input_dtype": DTYPES[case.dtype]} if quantity == "lse" else {}
        if quantity.startswith("d"):
            options["family_scale"] = gradient_scale
        verdict = judge(quantity, sharded[index], truth[index], eager[index], **options)
        core_verdict = judge(quantity, kernel[index], truth[index], eager[index], **options)
        distance = (sharded[index].double() - kernel[index].double()).abs().max().item()
        records.append({
            "quantity": quantity, "error": verdict.error, "bound": verdict.bound, "ok": verdict.ok,
            "core_error": core_verdict.error, "distance_to_core": distance,
        })  # fmt: skip
    return records


def _check(records: list[dict]) -> None:
    failures = []
    for r in records:
        if not r["ok"]:
            failures.append(f"{r['quantity']}: error {r['error']:.3e} vs bound {r['bound']:.3e}")
        if not r["distance_to_core"] <= r["bound"]:  # NaN fails
            failures.append(
                f"{r['quantity']}: {r['distance_to_core']:.3e} from core.attention, bound {r['bound']:.3e}"
            )
    assert not failures, "outside the tolerance policy:\n" + "\n".join(failures)


# ---------------------------------------------------------------------------------------------------------
# Single process: layouts and the ring's plan
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", layouts.LAYOUTS)
@pytest.mark.parametrize("causal", [True, False])
def test_ring_blocks_cover_every_visible_pair_exactly_once(world_size, layout, causal):
    """Summing every (rank, step) block, each with its own mask, gives the whole sequence's mask."""
    chunk = 3
    n_local = chunk * layouts.chunk_count(layout, world_size) // world_size
    length = n_local * world_size
    # positions[rank]: the global token index of each of that rank's local rows
    positions = [
        layouts.shard(torch.arange(length)[None], layout, r, world_size, 1)[0] for r in range(world_size)
    ]
    covered = torch.zeros(length, length, dtype=torch.int64)
    for rank in range(world_size):
        for step in range(world_size):
            source = (rank - step) % world_size
            block = layouts.ring_block(layout, causal, rank, source, n_local)
            if block is None:
                continue
            rows, keys = positions[rank][block.rows], positions[source][block.keys]
            mask = core.reference.visible_keys_mask(len(rows), len(keys), block.causal).long()
            covered[rows[:, None], keys[None, :]] += mask
    expected = core.reference.visible_keys_mask(length, length, causal).long()
    assert torch.equal(covered, expected)


def test_zigzag_gives_rank_r_chunks_r_and_2w_minus_1_minus_r():
    x = torch.arange(16).view(1, 1, 16, 1)
    assert cd.shard_sequence(x, group=cd.LocalRing(4))[1].flatten().tolist() == [2, 3, 12, 13]
    assert cd.shard_sequence(x, group=cd.LocalRing(4), layout="contiguous")[1].flatten().tolist() == [
        4,
        5,
        6,
        7,
    ]


@pytest.mark.parametrize("layout", layouts.LAYOUTS)
@pytest.mark.parametrize("seq_dim", [1, 2])
def test_shard_then_unshard_is_the_identity(layout, seq_dim):
    ring = cd.LocalRing(3)
    x = torch.randn(2, 12, 4, 5) if seq_dim == 1 else torch.randn(2, 4, 12, 5)
    shards = cd.shard_sequence(x, group=ring, layout=layout, seq_dim=seq_dim)
    assert all(s.shape[seq_dim] == 4 for s in shards)
    assert torch.equal(cd.unshard_sequence(shards, group=ring, layout=layout, seq_dim=seq_dim), x)


def test_sharding_refuses_lengths_the_layout_cannot_split():
    with pytest.raises(ValueError, match="multiple of 6"):
        cd.shard_sequence(torch.zeros(1, 1, 8, 4), group=cd.LocalRing(3))
    with pytest.raises(ValueError, match="layout must be one of"):
        cd.shard_sequence(torch.zeros(1, 1, 8, 4), group=cd.LocalRing(2), layout="striped")
    with pytest.raises(ValueError, match="seq_dim"):
        cd.shard_sequence(torch.zeros(1, 1, 8, 4), group=cd.LocalRing(2), seq_dim=4)


# ---------------------------------------------------------------------------------------------------------
# Single process: the LocalRing (the same ring code, every rank in this process)
# ---------------------------------------------------------------------------------------------------------

LOCAL_CASES = [
    Case(3, "ring", "zigzag", True, "bf16", 4, 2, 16, 2, lse_loss=True),
    Case(2, "ring", "zigzag", True, "fp32", 2, 1, 24, 4, bshd=True),
    Case(2, "ring", "contiguous", False, "fp16", 2, 2, 16, 6),
]


def _local_ring_run(case: Case, inputs):
    ring = cd.LocalRing(case.world_size)
    q, k, v, dout, dlse = inputs
    leaves = [_shard(x, ring, case) for x in (q, k, v)]
    options = {"causal": case.causal, "layout": case.layout, "return_lse": True}
    outs, lses = cd.ring_attention(*leaves, group=ring, **options)
    sent_forward = list(ring.sent_bytes)
    whole = [cd.unshard_sequence(x, group=ring, layout=case.layout) for x in (outs, lses)]
    _loss(*whole, dout, dlse).backward()
    grads = [cd.unshard_sequence([s.grad for s in x], group=ring, layout=case.layout) for x in leaves]
    return [t.detach() for t in whole] + grads, leaves, sent_forward, list(ring.sent_bytes)


@pytest.mark.parametrize("case", LOCAL_CASES, ids=lambda c: c.name)
def test_local_ring_matches_core_and_the_truth(case):
    inputs = _inputs(case)
    sharded, *_ = _local_ring_run(case, inputs)
    _check(_measure(case, sharded, _whole_sequence_results(case, *inputs)))


def test_local_ring_is_bitwise_deterministic():
    case = LOCAL_CASES[1]
    inputs = _inputs(case)
    first, second = _local_ring_run(case, inputs)[0], _local_ring_run(case, inputs)[0]
    for quantity, a, b in zip(QUANTITIES, first, second):
        assert torch.equal(a, b), f"{quantity} differs between two runs"


def test_local_ring_sends_what_ring_volume_says():
    case = Case(3, "ring", "zigzag", True, "fp16", 1, 1, 16, 2)
    _, leaves, sent_forward, sent_total = _local_ring_run(case, _inputs(case))
    volume = cd.ring_volume(leaves[0][0], leaves[1][0], case.world_size)
    assert sent_forward == [volume.forward_bytes] * case.world_size
    assert [t - f for t, f in zip(sent_total, sent_forward)] == [volume.backward_bytes] * case.world_size


class _LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op returns inside the block."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return result


def test_no_rank_materialises_more_than_its_shard():
    """Every tensor the ring makes, forward and backward, is at most one rank's share of the sequence
    (the largest: a float32 output accumulator of the rank's rows)."""
    ring = cd.LocalRing(4)
    q, k, v = make_qkv(1, 2, 1, 32, 32, 16, torch.bfloat16, seed=5, requires_grad=False)
    leaves = [[s.requires_grad_() for s in cd.shard_sequence(x, group=ring)] for x in (q, k, v)]
    with _LargestTensor() as probe:
        outs = cd.ring_attention(*leaves, group=ring)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    assert 0 < probe.largest <= leaves[0][0].numel()


# ---------------------------------------------------------------------------------------------------------
# Single process: errors
# ---------------------------------------------------------------------------------------------------------


def _local_shards(world_size=2, n=8, heads=(2, 2), dtype=torch.float16):
    q, k, v = make_qkv(1, heads[0], heads[1], n, n, 16, dtype, seed=0, requires_grad=False)
    ring = cd.LocalRing(world_size)
    return ring, [cd.shard_sequence(x, group=ring, layout="contiguous") for x in (q, k, v)]


def test_ring_refuses_an_odd_zigzag_shard():
    ring, (qs, ks, vs) = _local_shards(n=6)
    with pytest.raises(ValueError, match="even length"):
        cd.ring_attention(qs, ks, vs, group=ring, layout="zigzag")


def test_ring_refuses_causal_shards_of_different_lengths():
    ring, (qs, _, _) = _local_shards()
    _, (_, ks, vs) = _local_shards(n=12)
    with pytest.raises(ValueError, match="same length"):
        cd.ring_attention(qs, ks, vs, group=ring, causal=True)


def test_ring_refuses_shards_that_differ_between_ranks():
    ring, (qs, ks, vs) = _local_shards()
    qs[1] = qs[1][:, :, :2]
    with pytest.raises(ValueError, match="every rank's shards must share"):
        cd.ring_attention(qs, ks, vs, group=ring, causal=False)


def test_ring_refuses_bad_arguments():
    ring, (qs, ks, vs) = _local_shards()
    with pytest.raises(TypeError, match="list of every rank's shard"):
        cd.ring_attention(qs[0], ks[0], vs[0], group=ring)
    with pytest.raises(TypeError, match="list of every rank's shard"):
        cd.ring_attention(qs[:1], ks[:1], vs[:1], group=ring)
    with pytest.raises(ValueError, match="layout must be one of"):
        cd.ring_attention(qs, ks, vs, group=ring, layout="striped")
    with pytest.raises(TypeError, match="group must be"):
        cd.ring_attention(qs[0], ks[0], vs[0], group="world")
    with pytest.raises(TypeError, match="share one dtype"):  # core's own validation, per rank
        cd.ring_attention(qs, [k.float() for k in ks], [v.float() for v in vs], group=ring)
    with pytest.raises(ValueError, match="world_size"):
        cd.LocalRing(0)


def test_without_a_process_group_the_schemes_say_how_to_get_one():
    _, ([q, _], [k, _], [v, _]) = _local_shards()
    with pytest.raises(RuntimeError, match="init_process_group"):
        cd.ring_attention(q, k, v)
    with pytest.raises(RuntimeError, match="init_process_group"):
        cd.ulysses_attention(q, k, v)
    with pytest.raises(TypeError, match="only ring_attention"):
        cd.ulysses_attention(q, k, v, group=cd.LocalRing(2))


# ---------------------------------------------------------------------------------------------------------
# Multi-process: gloo groups of 2 and 4 CPU processes
# ---------------------------------------------------------------------------------------------------------

CASES = [
    Case(2, "ring", "zigzag", True, "bf16", 4, 2, 16, 4, lse_loss=True, repeat=True),
    Case(2, "ring", "zigzag", True, "fp32", 4, 1, 24, 4, lse_loss=True, repeat=True),
    Case(2, "ring", "zigzag", True, "fp16", 2, 2, 16, 4, bshd=True),
    Case(2, "ring", "zigzag", False, "bf16", 4, 2, 16, 3, batch=2),
    Case(2, "ring", "contiguous", True, "fp32", 4, 2, 16, 8),
    Case(2, "ring", "contiguous", True, "fp16", 2, 2, 16, 8, lse_loss=True),
    Case(2, "ulysses", "contiguous", True, "bf16", 4, 2, 16, 8, repeat=True),
    Case(2, "ulysses", "contiguous", True, "fp32", 2, 2, 24, 8, lse_loss=True),
    Case(2, "ulysses", "contiguous", False, "fp16", 4, 2, 16, 8, bshd=True),
    Case(4, "ring", "zigzag", True, "bf16", 4, 2, 16, 2, lse_loss=True, repeat=True),
    Case(4, "ring", "zigzag", True, "fp32", 2, 1, 16, 2),
    Case(4, "ring", "contiguous", True, "fp16", 4, 2, 16, 4),
    Case(4, "ring", "zigzag", False, "fp32", 2, 2, 16, 2),
    Case(4, "ulysses", "contiguous", True, "bf16", 8, 4, 16, 4, repeat=True),
    Case(4, "ulysses", "contiguous", False, "fp32", 4, 4, 16, 4, lse_loss=True),
]
WORLD_SIZES = sorted({case.world_size for case in CASES})


def _attend(case: Case, q, k, v, group=None):
    options = {"group": group, "causal": case.causal, "return_lse": True}
    if case.scheme == "ring":
        return cd.ring_attention(q, k, v, layout=case.layout, **options)
    return cd.ulysses_attention(q, k, v, **options)


def _distributed_run(case: Case, inputs, group=None):
    """This rank's part of one case: shards, attention, loss, backward; the gathered results
    [out, lse, dq, dk, dv] on every rank, and this rank's own (for the bitwise repeat)."""
    q, k, v, dout, dlse = inputs
    leaves = [_shard(x, group, case) for x in (q, k, v)]
    out, lse = _attend(case, *leaves, group=group)
    my_dout = cd.shard_sequence(dout, group=group, layout=case.layout)
    my_dlse = None if dlse is None else cd.shard_sequence(dlse, group=group, layout=case.layout)
    _loss(out, lse, my_dout, my_dlse).backward()
    local = [out.detach(), lse.detach(), *(t.grad for t in leaves)]
    gathered = [cd.unshard_sequence(t, group=group, layout=case.layout) for t in local]
    return gathered, local


def _subgroup_check(world_size: int) -> dict:
    """Ring attention on subgroups, whose ring neighbours are not the world's: pairs of ranks in a world
    of 4, single ranks in a world of 2."""
    size = world_size // 2
    groups = [dist.new_group(list(range(start, start + size))) for start in range(0, world_size, size)]
    case = Case(size, "ring", "zigzag", True, "bf16", 2, 1, 16, 4)
    inputs = _inputs(case)
    gathered, _ = _distributed_run(case, inputs, groups[dist.get_rank() // size])
    return {"records": _measure(case, gathered, _whole_sequence_results(case, *inputs))}


def _compile_check() -> dict:
    """Ulysses traces whole (fullgraph), ring attention runs eagerly inside a compiled function (a graph
    break); both must equal eager bitwise."""
    import torch._dynamo

    results = {}
    q, k, v = make_qkv(1, 2, 2, 16, 16, 16, torch.float16, seed=3, requires_grad=False)
    for scheme, fullgraph in (("ulysses", True), ("ring", False)):
        case = Case(dist.get_world_size(), scheme, "contiguous", True, "fp16", 2, 2, 16, 8)

        def step(a, b, c, case=case):
            out, lse = _attend(case, a, b, c)
            return out.float().sum() + lse.sum()

        runs = []
        for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=fullgraph)):
            leaves = [_shard(x, None, case) for x in (q, k, v)]
            fn(*leaves).backward()
            runs.append([t.grad for t in leaves])
        torch._dynamo.reset()
        results[scheme] = all(torch.equal(a, b) for a, b in zip(*runs))
    return results


def _mismatch_check() -> str:
    """Ranks passing shards of different lengths must all get a ValueError, not a hang."""
    n_local = 8 if dist.get_rank() == 0 else 4
    q = torch.zeros(1, 2, n_local, 16, dtype=torch.float16)
    messages = {}
    for name, fn in (("ring", cd.ring_attention), ("ulysses", cd.ulysses_attention)):
        try:
            fn(q, q, q, causal=False)
            messages[name] = "no error"
        except ValueError as error:
            messages[name] = str(error)
    return messages


def _worker(rank: int, world_size: int, rendezvous: str, results_path: str) -> None:
    """One rank of a spawned gloo group: runs every case of its world size, for every kernel family."""
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=120),
    )  # fmt: skip
    torch.set_num_threads(1)
    report: dict = {"cases": {}, "families": core.testing.families()}
    try:
        with core.testing.poisoned_outputs():
            for family in core.testing.families():
                with core.testing.use_family(family, strict=False):
                    for case in (c for c in CASES if c.world_size == world_size):
                        report["cases"][f"{family}/{case.name}"] = _run_case(case)
            report["subgroups"] = _guarded(_subgroup_check, world_size)
            if world_size == 2:
                report["compile"] = _guarded(_compile_check)
                report["mismatch"] = _guarded(_mismatch_check)
    finally:
        if rank == 0:
            with open(results_path, "w") as file:
                json.dump(report, file)
        dist.destroy_process_group()


def _guarded(check, *args):
    try:
        return check(*args)
    except Exception:
        return {"error": traceback.format_exc()}


def _run_case(case: Case) -> dict:
    started = time.perf_counter()
    try:
        inputs = _inputs(case)
        gathered, local = _distributed_run(case, inputs)
        result = {"records": _measure(case, gathered, _whole_sequence_results(case, *inputs))}
        if case.repeat:
            _, again = _distributed_run(case, inputs)
            same = torch.tensor([all(torch.equal(a, b) for a, b in zip(local, again))], dtype=torch.int64)
            dist.all_reduce(same, op=dist.ReduceOp.MIN)
            result["bitwise_repeat"] = bool(same.item())
        result["seconds"] = time.perf_counter() - started
        return result
    except Exception:
        return {"error": traceback.format_exc()}


@contextlib.contextmanager
def _environment(**variables):
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


def _spawn_group(world_size: int, directory) -> dict:
    """Run every case of one world size in a freshly spawned gloo group; what rank 0 measured."""
    results_path = directory / f"gloo{world_size}.json"
    # The children import core from scratch: interpreted kernels on CPU tensors, also on a GPU machine.
    with _environment(TRITON_INTERPRET="1", OMP_NUM_THREADS="1"):
        torch.multiprocessing.spawn(
            _worker,
            args=(world_size, str(directory / f"rendezvous{world_size}"), str(results_path)),
            nprocs=world_size,
        )
    return json.loads(results_path.read_text())


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """world size -> what its group measured. Each group is spawned once per test session, also under
    pytest-xdist: the first worker to need it spawns it under a file lock, the others read its results."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the directory all xdist workers' temporary directories share
    results: dict[int, dict] = {}

    def results_of(world_size: int) -> dict:
        if world_size not in results:
            path = shared / f"gloo{world_size}.json"
            with FileLock(str(path) + ".lock"):
                if not path.exists():
                    _spawn_group(world_size, shared)
                results[world_size] = json.loads(path.read_text())
        return results[world_size]

    return results_of


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_distributed_matches_core_and_the_truth(case, spawned, family):
    group = spawned(case.world_size)
    if family not in group["families"]:  # e.g. the Gluon (hopper) family on a GPU machine
        pytest.skip(
            f"the gloo ranks run interpreted on CPU, where the {family} family does not run; "
            "test_local_ring_matches_core_and_the_truth runs it here"
        )
    result = group["cases"].get(f"{family}/{case.name}")
    assert result is not None, "the group stopped before this case (its failure is reported by another test)"
    assert "error" not in result, result.get("error")
    _check(result["records"])
    if case.repeat:
        assert result["bitwise_repeat"], "two runs differ"


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_ring_attention_on_subgroups(spawned, world_size):
    result = spawned(world_size)["subgroups"]
    assert "error" not in result, result.get("error")
    _check(result["records"])


def test_distributed_under_torch_compile(spawned):
    assert spawned(2)["compile"] == {"ulysses": True, "ring": True}


def test_ranks_with_different_shapes_all_get_an_error(spawned):
    for scheme in ("ring", "ulysses"):
        message = spawned(2)["mismatch"][scheme]
        assert "different shapes" in message and "rank 1: ((1, 2, 4, 16)" in message, message
