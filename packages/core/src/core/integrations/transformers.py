"""core as a Hugging Face transformers attention implementation, named "core".

    import core.integrations.transformers

    core.integrations.transformers.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="core")
    model.set_attn_implementation("core")  # or switch a model that is already loaded

`register()` adds `core_attention_forward` to transformers' `AttentionInterface` and `core_attention_mask`
to its `AttentionMaskInterface` (transformers 4.54 or newer; transformers stays an optional dependency,
imported only by `register()`). A model then runs each layer's attention through `core.attention`, with
GQA/MQA read in place (k and v are never repeated) and the output handed back as a view.

What core honours: causal attention, bottom-right aligned (so queries at the end of a KV cache, a single
decoded token included, see every key up to their own position), or full attention; in both cases
without padding. The mask function checks everything transformers would otherwise put into a mask,
once per forward, and hands over None; the attention function checks its keyword arguments. Nothing is
ignored silently: each of these raises a ValueError before anything is launched, naming what was asked
for and what is supported:

- a 2-D attention_mask that masks a key (padding), and a static cache (keys past the current position,
  masked by transformers' padded mask or found from the query offset);
- sequences packed into one row: position_ids that restart where transformers reads them as packing
  (no cache and no 2-D mask, the training case; SDPA reads them the same way), or the cu_seq_lens_q/k,
  max_length_q/k or seq_idx keyword arguments. Packed sequences and padding masks come with core's
  varlen support;
- a sliding window or chunked attention that hides keys (a window longer than the keys hides none and
  passes), logit soft-capping (softcap), attention sinks (s_aux), additive position biases,
  other mask overlays, explicit 4-D masks;
- dropout > 0 (core has no dropout; transformers passes 0 in eval mode) and output_attentions=True
  (core never forms the attention weights).

Keyword arguments accepted and ignored, because they do not change the attention: position_ids (they
feed the rotary embedding; their packing meaning reaches core through the mask function), cache_position,
use_cache, output_hidden_states, output_router_logits, return_dict, num_items_in_batch (loss
normalisation) and deterministic (core's backward always is). Any other keyword argument that is set
(not None or False) is a TypeError.

Reading a mask or position_ids costs a device sync, and under torch.compile a graph break, in the mask
function. That happens only where transformers hands over data to read: a 2-D attention_mask, or,
without a cache, position_ids that may be packed. A plain causal forward reads nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import core

__all__ = ["ATTENTION_NAME", "core_attention_forward", "core_attention_mask", "register"]

ATTENTION_NAME = "core"

_SUPPORTED = (
    "core honours causal attention (bottom-right aligned) or full attention, without padding; "
    "packed sequences and padding masks come with core's varlen support"
)

# transformers.masking_utils builds a mask pattern from named factories; these are the ones core knows.
_MASKING_UTILS = "transformers.masking_utils"
_PLAIN_PATTERNS = {"causal_mask_function": True, "bidirectional_mask_function": False}  # name -> causal
_LOCAL_OVERLAYS = frozenset(
    {
        "sliding_window_overlay",
        "sliding_window_bidirectional_overlay",
        "chunked_overlay",
        "_legacy_chunked_overlay",
    }
)
_PACKED_SEQUENCES = "packed_sequence_mask_function"

_IGNORED_KWARGS = frozenset(
    {
        "position_ids",
        "cache_position",
        "use_cache",
        "output_hidden_states",
        "output_router_logits",
        "return_dict",
        "num_items_in_batch",
        "deterministic",
    }
)
_PACKED = f"packed sequences (several sequences in one row) are not supported: {_SUPPORTED}"
_REFUSED_KWARGS = {
    "cu_seq_lens_q": _PACKED,
    "cu_seq_lens_k": _PACKED,
    "max_length_q": _PACKED,
    "max_length_k": _PACKED,
    "seq_idx": _PACKED,
    "output_attentions": "core never forms the attention weights; attn_implementation='eager' returns them",
    "s_aux": "attention sinks (s_aux) are not supported",
    "position_bias": "additive position biases are not supported",
    "block_table": "paged KV caches are not supported",
}


def register() -> None:
    """Make attn_implementation="core" available to every transformers model. Calling it again is harmless."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            "core.integrations.transformers.register() needs the optional dependency `transformers` "
            "(pip install transformers, or flashcore-attention[transformers])"
        ) from error
    from transformers import masking_utils

    # Before 4.54 transformers has no packed-sequence detection, so restarting position_ids would pass
    # unseen (4.53 also lacks set_attn_implementation; older ones, the mask interface itself).
    if not hasattr(masking_utils, "find_packed_sequence_indices"):
        raise ImportError(
            "core.integrations.transformers.register() needs transformers 4.54 or newer (its mask interface "
            f"and packed-sequence detection); found transformers {transformers.__version__}"
        )
    transformers.AttentionInterface.register(ATTENTION_NAME, core_attention_forward)
    transformers.AttentionMaskInterface.register(ATTENTION_NAME, core_attention_mask)


def core_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (B, Hq, N, D), key and value (B, Hkv, Nk, D) with
    Hq a multiple of Hkv, not repeated. Returns (attn_output (B, N, Hq, D), None). attn_output is a
    transposed view of core's output, which has the query's strides, so the model's usual reshape of it
    to (B, N, Hq * D) copies nothing when the query came from a (B, N, Hq * D) projection.

    is_causal, when not given, is the module's `is_causal` (default True), as transformers' SDPA and
    FlashAttention integrations decide it; causal attention is bottom-right aligned.
    """
    if attention_mask is not None:
        raise ValueError(
            f"core was handed an attention mask tensor of shape {tuple(attention_mask.shape)}. Its mask "
            "function hands over None for every mask core honours, so this one was built elsewhere (an "
            f"explicit 4-D mask, or a model that builds its own masks) and core cannot apply it: {_SUPPORTED}"
        )
    if dropout:
        raise ValueError(
            f"attention dropout {dropout} requested, but core has no dropout: set config.attention_dropout "
            "to 0.0 (transformers passes the dropout only in training mode)"
        )
    _check_keyword_arguments(kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window_and_softcap = _window_and_softcap(sliding_window, softcap, n_keys=key.shape[2])
    out = core.attention(query, key, value, causal=causal, sm_scale=scaling, **window_and_softcap)
    return out.transpose(1, 2), None


def _check_keyword_arguments(kwargs: dict) -> None:
    for name, value in kwargs.items():
        if value is None or value is False or name in _IGNORED_KWARGS:
            continue
        if name in _REFUSED_KWARGS:
            raise ValueError(f"{name} was passed to core's attention: {_REFUSED_KWARGS[name]}")
        raise TypeError(
            f"core's attention got the keyword argument {name}={value!r}, which it does not know. It "
            f"honours dropout=0, scaling and is_causal; ignores {sorted(_IGNORED_KWARGS)}; refuses "
            f"{sorted(_REFUSED_KWARGS)}, sliding windows and softcap"
        )


def _window_and_softcap(sliding_window: int | None, softcap: float | None, *, n_keys: int) -> dict:
    """The keyword arguments that carry a sliding window and logit soft-capping to core.attention.

    core has neither yet, so a window that hides a key, or a softcap, is refused, and nothing needs
    passing otherwise. Once core.attention takes FlashAttention's window_size=(left, right) and softcap=,
    this returns {"window_size": (sliding_window - 1, sliding_window - 1), "softcap": softcap} for the
    ones that are set: transformers' sliding window shows a query the `sliding_window` keys ending at its
    own position, and that is its FlashAttention integration's mapping.
    """
    # A causal query sees at most n_keys keys, so a window of n_keys or more hides none (the test
    # transformers' FlashAttention integration makes before passing a window on).
    if sliding_window is not None and n_keys > sliding_window:
        raise ValueError(
            f"sliding_window={sliding_window} over {n_keys} keys: sliding-window attention is not "
            f"supported yet; {_SUPPORTED}"
        )
    if softcap:
        raise ValueError(f"softcap={softcap}: logit soft-capping is not supported yet; {_SUPPORTED}")
    return {}


def core_attention_mask(
    batch_size: int,
    *,
    kv_length: int,
    kv_offset: int = 0,
    mask_function: Callable,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    q_length: int | None = None,
    q_offset: int | torch.Tensor = 0,
    cache_position: torch.Tensor | None = None,
    **tensor_options,
) -> None:
    """transformers' mask-function signature. Returns None (core needs no mask tensor) for a mask core
    honours and raises a ValueError for any other.

    transformers 5 describes the queries by q_length and q_offset; 4.54 to 4.57 by their positions,
    cache_position. tensor_options (allow_is_causal_skip, dtype, device, config, use_vmap, ...) say how
    to build a mask tensor, which core never needs.
    """
    # A plain pattern without a 2-D mask is decided from names alone, so torch.compile traces it; the
    # checks that read tensors or take the pattern apart run outside the graph (one graph break).
    causal = _plain_pattern_is_causal(mask_function)
    if causal is None:
        causal = _check_pattern(mask_function, kv_length=kv_length, local_size=local_size)
    if attention_mask is not None:
        _check_no_padding(attention_mask, kv_length=kv_length, kv_offset=kv_offset)
    if isinstance(q_offset, torch.Tensor):  # transformers 5 keeps a static cache's offset in a tensor
        raise ValueError(
            f"a static cache keeps keys past the current position, which need masking: {_SUPPORTED}. "
            "Use a DynamicCache."
        )
    if causal:
        if cache_position is not None:
            q_length = cache_position.shape[0]
            # q_length consecutive positions inside a window of q_length keys fill it; otherwise read the
            # first one (decoding under transformers 4.5x).
            q_offset = kv_offset if kv_length == q_length else _first_position(cache_position)
        _check_queries_end_at_the_last_key(q_length, q_offset, kv_length=kv_length, kv_offset=kv_offset)
    return None


def _plain_pattern_is_causal(mask_function: Callable) -> bool | None:
    """True for transformers' causal pattern, False for its full (bidirectional) one, None for any other."""
    from transformers import masking_utils  # imported already: transformers is the caller

    if mask_function is masking_utils.causal_mask_function:
        return True
    if mask_function is getattr(masking_utils, "bidirectional_mask_function", None):  # transformers >= 5
        return False
    return None


@torch.compiler.disable
def _first_position(cache_position: torch.Tensor) -> int:
    return int(cache_position[0])


@torch.compiler.disable
def _check_pattern(mask_function: Callable, *, kv_length: int, local_size: int | None) -> bool:
    """Refuse a mask pattern core cannot compute; return whether it is causal (else it is full attention)."""
    parts = _intersected_parts(mask_function)
    names = [_factory_name(part) for part in parts]
    known = (*_PLAIN_PATTERNS, *_LOCAL_OVERLAYS, _PACKED_SEQUENCES)
    if not any(name in _PLAIN_PATTERNS for name in names) or any(name not in known for name in names):
        described = ", ".join(getattr(part, "__qualname__", repr(part)) for part in parts)
        raise ValueError(
            f"the model asks for a mask made of [{described}], which core cannot make: {_SUPPORTED}"
        )
    # transformers' own test for a window or chunk that hides nothing (it lets SDPA drop the mask too).
    # Once core.attention takes a window, sliding-window overlays pass here and the window reaches core
    # through the attention function's sliding_window argument (_window_and_softcap).
    if any(name in _LOCAL_OVERLAYS for name in names) and (local_size is None or kv_length >= local_size):
        raise ValueError(
            f"the model asks for sliding-window or chunked attention (size {local_size}) over {kv_length} "
            f"keys, which core does not support yet; {_SUPPORTED}"
        )
    for part, name in zip(parts, names):
        # The index of each token's sequence within its row, counted from 0: a row whose position_ids
        # restart ends past sequence 0.
        if name == _PACKED_SEQUENCES and bool((_closure(part)["packed_sequence_mask"][:, -1] != 0).any()):
            raise ValueError(
                "position_ids restart within a row, which transformers reads as several sequences packed "
                f"into that row: {_SUPPORTED}"
            )
    return any(_PLAIN_PATTERNS.get(name, False) for name in names)


def _intersected_parts(mask_function: Callable) -> list[Callable]:
    """The mask functions whose intersection (transformers' and_masks) `mask_function` is, with the position
    remapping transformers wraps around a pattern for packed sequences taken off: it changes nothing
    unless the sequences are packed, which the packed-sequence part that comes with it refuses."""
    name = _factory_name(mask_function)
    if name == "and_masks":
        inner = _closure(mask_function)["mask_functions"]
        return [part for function in inner for part in _intersected_parts(function)]
    if name == "remap_positions_for_packed_sequence":
        return _intersected_parts(_closure(mask_function)["mask_function"])
    return [mask_function]


def _factory_name(mask_function: Callable) -> str:
    """The transformers.masking_utils function that made `mask_function` ("causal_mask_function",
    "and_masks", "sliding_window_overlay", ...), or "" for a function from elsewhere."""
    if getattr(mask_function, "__module__", None) != _MASKING_UTILS:
        return ""
    return mask_function.__qualname__.split(".<locals>.")[0]


def _closure(function: Callable) -> dict[str, object]:
    cells = function.__closure__ or ()
    return dict(zip(function.__code__.co_freevars, (cell.cell_contents for cell in cells)))


@torch.compiler.disable
def _check_no_padding(attention_mask: torch.Tensor, *, kv_length: int, kv_offset: int) -> None:
    """Refuse a 2-D mask (B, positions) that masks one of the keys, at positions kv_offset to
    kv_offset + kv_length - 1. transformers counts positions past the mask's end as masked: the
    unused tail of a static cache."""
    keys_end = kv_offset + kv_length
    if attention_mask.shape[-1] < keys_end:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[-1]} positions but the keys run to position "
            f"{keys_end} (a static cache's unused tail counts as masked): {_SUPPORTED}"
        )
    if not bool(attention_mask[:, kv_offset:keys_end].all()):
        raise ValueError(f"attention_mask masks some keys (padding): {_SUPPORTED}")


def _check_queries_end_at_the_last_key(q_length: int, q_offset: int, *, kv_length: int, kv_offset: int):
    """core's causal mask is bottom-right aligned: the last query sits on the last key. A DynamicCache
    grows that way; a static cache holds keys past the current position, which need a mask."""
    if q_offset + q_length != kv_offset + kv_length:
        raise ValueError(
            f"the queries end at position {q_offset + q_length} but the keys at {kv_offset + kv_length}: "
            "core's causal mask is bottom-right aligned (the last query sees the last key), as a "
            f"DynamicCache grows; a static cache needs a mask for its unused tail: {_SUPPORTED}"
        )
