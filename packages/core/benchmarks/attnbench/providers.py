"""The attention implementations compared, behind one small interface.

Each provider computes exactly the problem of the case (same causal alignment, same GQA grouping) or
says in `note` how it was asked to, and raises when it cannot: the runner turns that into "n/a" with
the reason. SDPA's `is_causal` is top-left aligned when Nq != Nk while ours is bottom-right, so
those rows need care:
- one query row: bottom-right causal sees every key, so SDPA runs non-causal (identical result);
- more query rows: EFFICIENT and CUDNN get an explicit bottom-right boolean mask; FLASH takes no mask
  through SDPA, but its own kernel op aligns causal bottom-right, so it is called directly.
The outputs are compared with core's before timing, so a provider that got this wrong shows up.

`sweep` orders the work when time is short (see runner): 0 for core and the two baselines the
performance targets are judged against, FLASH and CUDNN; 1 for EFFICIENT and Flex, which are there
for context (and Flex spends seconds compiling every shape).
"""

from __future__ import annotations

import contextlib
import importlib
import warnings

import torch
import torch.nn.functional as F

from attnbench.results import PROVIDER_ORDER

SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}
MAX_REASON_CHARS = 400


def describe_failure(error: BaseException, caught: list[warnings.WarningMessage]) -> str:
    """One line: the error plus the warnings raised with it (SDPA explains a refused backend only there).
    A long one keeps its start and its end, where a wrapped error (Dynamo's, say) names the cause."""
    parts = [f"{type(error).__name__}: {str(error).strip()}"]
    parts += [str(w.message).strip() for w in caught if str(w.message).strip() not in parts]
    text = " | ".join(" ".join(part.split()) for part in parts)
    if len(text) <= MAX_REASON_CHARS:
        return text
    head = MAX_REASON_CHARS // 3
    return text[:head] + " ... " + text[-(MAX_REASON_CHARS - head - 5) :]


@contextlib.contextmanager
def explained_failures():
    """Re-raise any error as a ProviderError whose message carries the warnings issued with it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        except Exception as error:
            raise ProviderError(describe_failure(error, caught)) from error


class ProviderError(RuntimeError):
    """A provider could not run a case; the message is the reason shown as "n/a"."""


class CoreAttention:
    """This repository's kernel, or any function with its signature (`--core-fn module:function`)."""

    name = "core"
    sweep = 0

    def __init__(self, target: str = "core:attention"):
        self.target = target
        self.function = None

    def load(self) -> None:
        module_name, _, function_name = self.target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as missing:
            hint = "run from the repository root with PYTHONPATH=packages/core/src"
            raise ModuleNotFoundError(f"{missing} ({hint})") from missing
        self.function = getattr(module, function_name)

    def context(self):
        return contextlib.nullcontext()

    def note(self, case) -> str | None:
        return None if self.target == "core:attention" else f"stand-in {self.target}"

    def attention(self, q, k, v, case):
        return self.function(q, k, v, causal=case.causal)


def needs_explicit_alignment(case) -> bool:
    """Causal with several queries and Nq != Nk: where SDPA's top-left `is_causal` would be wrong."""
    return case.causal and case.q_len not in (1, case.kv_len)


def bottom_right_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """Boolean (Nq, Nk), True where query i may see key j, i.e. j <= i + (Nk - Nq)."""
    rows = torch.arange(q_len, device=device)[:, None]
    cols = torch.arange(kv_len, device=device)[None, :]
    return cols <= rows + (kv_len - q_len)


class SdpaBackend:
    """`F.scaled_dot_product_attention` restricted to one backend with `sdpa_kernel`."""

    def __init__(self, name: str, sweep: int):
        self.name = name
        self.sweep = sweep
        self._masks: dict = {}

    def load(self) -> None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, SDPA_BACKENDS[self.name])
        self._context = lambda: sdpa_kernel(backend)

    def context(self):
        return self._context()

    def note(self, case) -> str | None:
        if needs_explicit_alignment(case):
            return "explicit bottom-right boolean mask"
        if case.causal and case.q_len != case.kv_len:
            return "non-causal (a single bottom-right causal query sees every key)"
        return None

    def attention(self, q, k, v, case):
        gqa = case.q_heads != case.kv_heads
        if needs_explicit_alignment(case):
            mask = self._mask(case, q.device)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        is_causal = case.causal and case.q_len == case.kv_len
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=gqa)

    def _mask(self, case, device) -> torch.Tensor:
        key = (case.q_len, case.kv_len, str(device))
        if key not in self._masks:
            self._masks[key] = bottom_right_mask(case.q_len, case.kv_len, device)
        return self._masks[key]


class FlashBackend(SdpaBackend):
    """SDPA's FlashAttention-2; for causal Nq != Nk its kernel op is called, which aligns bottom-right."""

    def __init__(self):
        super().__init__("flash", sweep=0)

    def note(self, case) -> str | None:
        if needs_explicit_alignment(case):
            return "aten flash op called directly (its causal is bottom-right aligned)"
        return super().note(case)

    def attention(self, q, k, v, case):
        if needs_explicit_alignment(case):
            if case.q_heads != case.kv_heads:
                raise ProviderError("the aten flash op takes no GQA; SDPA's is_causal would be top-left")
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True)[0]
        return super().attention(q, k, v, case)


class FlexAttention:
    """`flex_attention` compiled by torch.compile, one static compile per shape.

    Dynamo gives up compiling a function after a few recompiles and silently runs it eagerly (slow and
    memory-hungry for flex); the limits are raised so every shape compiles, and hitting them is made an
    error rather than a fallback. The backward pass is timed by calling backward repeatedly on one graph
    (retain_graph), which AOTAutograd's donated buffers forbid, so those are turned off.
    """

    name = "flex"
    sweep = 1

    def load(self) -> None:
        import torch._dynamo.config as dynamo_config
        import torch._functorch.config as functorch_config
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        dynamo_config.recompile_limit = 4096
        dynamo_config.accumulated_recompile_limit = 4096
        dynamo_config.fail_on_recompile_limit_hit = True
        functorch_config.donated_buffer = False
        self._create_block_mask = create_block_mask
        self._flex_attention = torch.compile(flex_attention, dynamic=False)
        self._block_masks: dict = {}

    def context(self):
        return contextlib.nullcontext()

    def note(self, case) -> str | None:
        return "bottom-right causal block mask, created once per shape" if case.causal else None

    def attention(self, q, k, v, case):
        block_mask = self._block_mask(case, q.device) if case.causal else None
        return self._flex_attention(q, k, v, block_mask=block_mask, enable_gqa=case.q_heads != case.kv_heads)

    def _block_mask(self, case, device):
        key = (case.q_len, case.kv_len, str(device))
        if key not in self._block_masks:
            offset = case.kv_len - case.q_len

            def bottom_right_causal(batch, head, q_idx, kv_idx):
                return kv_idx <= q_idx + offset

            self._block_masks[key] = self._create_block_mask(
                bottom_right_causal, None, None, case.q_len, case.kv_len, device=device
            )
        return self._block_masks[key]


def make_providers(names: list[str], core_target: str) -> list:
    """Providers in the fixed table order, core first (its output is what the others are checked against)."""
    build = {
        "core": lambda: CoreAttention(core_target),
        "flash": FlashBackend,
        "cudnn": lambda: SdpaBackend("cudnn", sweep=0),
        "efficient": lambda: SdpaBackend("efficient", sweep=1),
        "flex": FlexAttention,
    }
    return [build[name]() for name in PROVIDER_ORDER if name in names]
