"""Bad input: a clear TypeError/ValueError before anything is launched."""

from __future__ import annotations

import pytest
import torch

import core
import core.testing

from .conftest import DEVICE, ON_GPU


@pytest.fixture(autouse=True)
def no_launch():
    """Any attempt to reach a kernel launcher fails the test loudly."""
    with core.testing.launches_forbidden():
        yield


def qkv(b=1, hq=2, hkv=2, nq=8, nk=8, d=16, dtype=torch.float16, device=DEVICE):
    return (
        torch.randn(b, hq, nq, d, device=device).to(dtype),
        torch.randn(b, hkv, nk, d, device=device).to(dtype),
        torch.randn(b, hkv, nk, d, device=device).to(dtype),
    )


def expect(error, match, q, k, v, **kwargs):
    with pytest.raises(error, match=match):
        core.attention(q, k, v, **kwargs)


def test_not_a_tensor():
    q, k, v = qkv()
    expect(TypeError, "k must be a torch.Tensor", q, k.tolist(), v)


@pytest.mark.parametrize("which", [0, 1, 2])
def test_wrong_rank(which):
    tensors = list(qkv())
    tensors[which] = tensors[which][0]
    expect(ValueError, "must have 4 dims", *tensors)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool, torch.complex64, torch.float64])
def test_unsupported_dtype(dtype):
    q, k, v = qkv()
    expect(TypeError, "accepts float16, bfloat16 or float32", q.to(dtype), k.to(dtype), v.to(dtype))


def test_mixed_dtypes():
    q, k, v = qkv()
    expect(TypeError, "share one dtype", q, k.bfloat16(), v)


def test_mismatched_batch():
    q, _, _ = qkv(b=2)
    _, k, v = qkv(b=3)
    expect(ValueError, "batch size differs", q, k, v)


def test_mismatched_head_dim():
    q, _, _ = qkv(d=16)
    _, k, v = qkv(d=32)
    expect(ValueError, "head dim differs", q, k, v)


def test_k_v_shapes_differ():
    q, k, _ = qkv()
    _, _, v = qkv(nk=9)
    expect(ValueError, "k and v must have the same shape", q, k, v)


def test_heads_not_a_multiple():
    q, k, v = qkv(hq=6, hkv=4)
    expect(ValueError, "not a multiple", q, k, v)


def test_head_dim_too_large():
    q, k, v = qkv(d=257)
    expect(ValueError, "1..256", q, k, v)


@pytest.mark.parametrize("field", ["b", "hq", "nq", "nk", "d"])
def test_empty_dimension(field):
    sizes = {"b": 1, "hq": 2, "hkv": 2, "nq": 8, "nk": 8, "d": 16}
    sizes[field] = 0
    if field == "hq":
        sizes["hkv"] = 0
    expect(ValueError, "is 0", *qkv(**sizes))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"causal": 1}, TypeError, "causal must be a bool"),
        ({"return_lse": "yes"}, TypeError, "return_lse must be a bool"),
        ({"deterministic": None}, TypeError, "deterministic must be a bool"),
        ({"sm_scale": float("nan")}, ValueError, "finite"),
        ({"sm_scale": 10**400}, ValueError, "finite"),
        ({"sm_scale": -3e38}, ValueError, "at most"),
        ({"sm_scale": 1e300}, ValueError, "at most"),
        ({"sm_scale": "0.1"}, TypeError, "real number"),
        ({"sm_scale": torch.tensor(0.1, requires_grad=True)}, TypeError, "not a tensor"),
    ],
)
def test_bad_options(kwargs, error, match):
    expect(error, match, *qkv(), **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device next to the CPU")
def test_mixed_devices():
    q, k, v = qkv(device="cuda")
    expect(ValueError, "one device", q, k.cpu(), v)


@pytest.mark.skipif(not ON_GPU, reason="under the interpreter CPU tensors are the supported path")
def test_cpu_tensors_without_interpreter_say_how_to_run_on_cpu():
    expect(ValueError, "TRITON_INTERPRET=1", *qkv(device="cpu"))


@pytest.mark.skipif(ON_GPU, reason="the meta device check needs no GPU")
def test_unsupported_device():
    expect(ValueError, "unsupported device", *qkv(device="meta"))


def test_sparse_tensor():
    q, k, v = qkv()
    expect(TypeError, "strided", q.to_sparse(), k, v)


@pytest.mark.parametrize("n_queries", [1, 64], ids=["decode-shaped", "prefill-shaped"])
def test_the_guard_catches_a_valid_call_of_every_family(n_queries):
    """no_launch is live: a valid call reaches an allocation or a launch, whichever family takes it."""
    with pytest.raises(AssertionError, match="allocated a kernel output or launched"):
        core.attention(*qkv(nq=n_queries, nk=64))
