"""core as a Hugging Face transformers attention implementation, named "core".

    import core.integrations.transformers

    core.integrations.transformers.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="core")
    model.set_attn_implementation("core")  # or switch a model that is already loaded

`register()` adds `core_attention_forward` to transformers' `AttentionInterface` and `core_attention_mask`
to its `AttentionMaskInterface` (transformers 4.54 or newer; transformers stays an optional dependency,
imported only by `register()`). A model then runs each layer's attention through `core.attention`, with
GQA/MQA read in place (k and v are never repeated) and the output handed back as a view.

What core honours, each the way transformers' FlashAttention integration reads it:

- causal attention, bottom-right aligned (so queries at the end of a KV cache, a single decoded token
  included, see every key up to their own position), or full attention;
- a causal sliding window (the attention function's `sliding_window`: a query sees the `sliding_window`
  keys ending at its own position, window_size=(sliding_window - 1, 0)) and logit soft-capping
  (`softcap`), as Mistral, Gemma 2/3, Qwen 2 and gpt-oss layers pass them;
- padding: a 2-D attention_mask that masks keys. The mask function hands it over (B, keys) and the
  attention function gathers the unmasked tokens into one packed batch (core.attention_varlen), each row
  a sequence, queries aligned to their row's last key, and scatters the output back (zeros at padded
  queries);
- sequences packed into rows: position_ids that restart where transformers reads them as packing (no
  cache and no 2-D mask; the mask function turns them into sequence boundaries), or the
  cu_seq_lens_q/k and max_length_q/k keyword arguments (DataCollatorWithFlattening with
  return_flash_attn_kwargs=True). Each sequence attends only within itself, positions counted from its
  own start.

Nothing is ignored silently: everything else raises a ValueError before anything is launched, naming
what was asked for and what is supported: a static cache (keys past the current position, masked by
transformers' padded mask or found from the query offset); bidirectional sliding windows and chunked
attention that hide keys (a window longer than the keys hides none and passes), attention sinks (s_aux),
additive position biases, paged caches, other mask overlays, explicit 4-D masks; seq_idx without
cu_seq_lens; dropout > 0 (core has no dropout; transformers passes 0 in eval mode) and
output_attentions=True (core never forms the attention weights).

Keyword arguments accepted and ignored, because they do not change the attention: position_ids (they
feed the rotary embedding; their packing meaning reaches core through the mask function), cache_position,
use_cache, output_hidden_states, output_router_logits, return_dict, num_items_in_batch (loss
normalisation) and seq_idx next to cu_seq_lens (the same boundaries). deterministic, as FlashAttention's
integration takes it, is core.attention's: a bool is passed on, None keeps core's default (True). Any
other keyword argument that is set (not None or False) is a TypeError.

Reading a mask or position_ids costs a device sync, and under torch.compile a graph break, in the mask
function; a padded batch costs two or three more per layer (the gathers' sizes and the grid's bounds).
That happens only where transformers hands over data to read: a 2-D attention_mask, or, without a
cache, position_ids that may be packed. A plain causal forward reads nothing. A batch packed by
position_ids sizes its grid by its longest sequence, found once per forward by the mask function (under
torch.compile, by the row length: the idle programs cost a little time, nothing else).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import core

__all__ = ["ATTENTION_NAME", "core_attention_forward", "core_attention_mask", "register"]

ATTENTION_NAME = "core"

_SUPPORTED = (
    "core honours causal attention (bottom-right aligned) or full attention, with a causal sliding window, "
    "logit soft-capping, padding masks (2-D attention_mask) and packed sequences (restarting position_ids, "
    "or cu_seq_lens_q/k with max_length_q/k)"
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
    }
)
# FlashAttention's packed-sequence keyword arguments: all four, or none.
_PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
_REFUSED_KWARGS = {
    "seq_idx": "seq_idx marks packed sequences, which core reads from cu_seq_lens_q/k and max_length_q/k "
    "(DataCollatorWithFlattening(return_flash_attn_kwargs=True)) or from restarting position_ids",
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
    Hq a multiple of Hkv, not repeated. Returns (attn_output (B, N, Hq, D), None). Without padding or
    packing, attn_output is a transposed view of core's output, which has the query's strides, so the
    model's usual reshape of it to (B, N, Hq * D) copies nothing when the query came from a
    (B, N, Hq * D) projection.

    attention_mask is what core_attention_mask handed over: None, a (B, Nk) boolean padding mask, or the
    int32 boundaries of sequences packed into the rows. is_causal, when not given, is the module's
    `is_causal` (default True), as transformers' SDPA and FlashAttention integrations decide it.
    """
    if dropout:
        raise ValueError(
            f"attention dropout {dropout} requested, but core has no dropout: set config.attention_dropout "
            "to 0.0 (transformers passes the dropout only in training mode)"
        )
    packed_kwargs = _packed_keyword_arguments(kwargs)
    deterministic = kwargs.pop("deterministic", None)
    _check_keyword_arguments(kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    options = dict(causal=causal, sm_scale=scaling, **_window_and_softcap(sliding_window, softcap, causal))
    if deterministic is not None:
        options["deterministic"] = deterministic
    queries = query.transpose(1, 2)  # (B, N, Hq, D), as the model reads the output
    keys, values = key.transpose(1, 2), value.transpose(1, 2)
    if packed_kwargs is not None:
        if attention_mask is not None:
            raise ValueError(f"cu_seq_lens_q/k came with an attention mask as well: {_SUPPORTED}")
        return _packed(queries, keys, values, *packed_kwargs, options), None
    if attention_mask is None:
        out = core.attention(query, key, value, **options)
        return out.transpose(1, 2), None
    if attention_mask.dtype == torch.int32 and attention_mask.dim() == 1:  # core_attention_mask's boundaries
        # The longest sequence, which the mask function found once per forward; the row length, a bound,
        # where the attribute did not survive (a compiled graph): it sizes the grid, nothing is read.
        longest = getattr(attention_mask, "longest_sequence", queries.shape[1])
        return _packed(queries, keys, values, attention_mask, attention_mask, longest, longest, options), None
    if attention_mask.dtype == torch.bool and attention_mask.shape == (key.shape[0], key.shape[2]):
        return _padded(queries, keys, values, attention_mask, options), None
    raise ValueError(
        f"core was handed an attention mask tensor of shape {tuple(attention_mask.shape)} and dtype "
        f"{attention_mask.dtype}. Its mask function hands over None, a (batch, keys) boolean padding mask or "
        "int32 sequence boundaries, so this one was built elsewhere (an explicit 4-D mask, or a model that "
        f"builds its own masks) and core cannot apply it: {_SUPPORTED}"
    )


def _packed(queries, keys, values, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, options):
    """Rows (B, N, H, D) holding sequences end to end, sequence boundaries over the flattened rows: one
    core.attention_varlen call. Returns (B, N, Hq, D)."""
    rows, length = queries.shape[:2]
    flat = [x.flatten(0, 1) for x in (queries, keys, values)]  # a view for one row (the packed case)
    out = core.attention_varlen(*flat, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **options)
    return out.unflatten(0, (rows, length))


def _padded(queries, keys, values, key_mask, options):
    """A padded batch: gather each row's unmasked queries and keys into one packed batch, run
    core.attention_varlen, scatter the output back (zeros at padded queries). The queries are the last
    Nq positions of the keys' mask (a KV cache's new tokens), so each row's queries end at its last key:
    bottom-right alignment per row, as core's causal mask is."""
    query_at, key_at, *boundaries_and_bounds = _unpadding(key_mask, queries.shape[1])
    out = core.attention_varlen(
        queries[query_at], keys[key_at], values[key_at], *boundaries_and_bounds, **options
    )
    padded = out.new_zeros(queries.shape)
    padded[query_at] = out
    return padded


@torch.compiler.disable
def _unpadding(key_mask: torch.Tensor, n_queries: int):
    """Where a (B, Nk) key mask's kept keys and its last n_queries positions' kept queries are (row and
    position index tensors, row by row), their int32 cumulative counts from 0, and the longest row of
    each (at least 1, as attention_varlen's bounds must be). Two or three syncs: the gathers' sizes
    and the bounds."""
    query_mask = key_mask[:, -n_queries:]
    key_at = key_mask.nonzero(as_tuple=True)
    query_at = key_at if n_queries == key_mask.shape[1] else query_mask.nonzero(as_tuple=True)
    lengths = torch.stack([query_mask.sum(dim=1), key_mask.sum(dim=1)])
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(dim=1, dtype=torch.int32), (1, 0))
    longest_q, longest_k = (max(n, 1) for n in lengths.max(dim=1).values.tolist())
    return query_at, key_at, cu_seqlens[0], cu_seqlens[1], longest_q, longest_k


def _packed_keyword_arguments(kwargs: dict) -> tuple | None:
    """FlashAttention's packed-sequence keyword arguments (cu_seq_lens_q/k as int32 tensors, max_length_q/k
    as ints), taken out of kwargs, or None when none is set."""
    given = {name: kwargs.pop(name, None) for name in _PACKED_KWARGS}
    if all(value is None for value in given.values()):
        return None
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise ValueError(f"packed sequences need all of {list(_PACKED_KWARGS)}; {missing} missing")
    kwargs.pop("seq_idx", None)  # the same boundaries, for models with state-space layers
    cu_seqlens_q, cu_seqlens_k, max_length_q, max_length_k = given.values()
    return cu_seqlens_q, cu_seqlens_k, int(max_length_q), int(max_length_k)


def _check_keyword_arguments(kwargs: dict) -> None:
    for name, value in kwargs.items():
        if value is None or value is False or name in _IGNORED_KWARGS:
            continue
        if name in _REFUSED_KWARGS:
            raise ValueError(f"{name} was passed to core's attention: {_REFUSED_KWARGS[name]}")
        raise TypeError(
            f"core's attention got the keyword argument {name}={value!r}, which it does not know. It "
            f"honours dropout=0, scaling, is_causal, sliding_window, softcap and {list(_PACKED_KWARGS)}; "
            f"ignores {sorted(_IGNORED_KWARGS)}; refuses {sorted(_REFUSED_KWARGS)}"
        )


def _window_and_softcap(sliding_window: int | None, softcap: float | None, causal: bool) -> dict:
    """core.attention's window_size and softcap for transformers' sliding_window and softcap.

    transformers' causal sliding window shows a query the `sliding_window` keys ending at its own
    position (its mask: key > query - sliding_window): window_size=(sliding_window - 1, 0). A window over
    fewer keys than that hides none, so passing it always is exact.
    """
    options = {}
    if sliding_window is not None:
        if not causal:
            raise ValueError(
                f"sliding_window={sliding_window} with full (bidirectional) attention: core takes causal "
                f"sliding windows; {_SUPPORTED}"
            )
        options["window_size"] = (sliding_window - 1, 0)
    if softcap:
        options["softcap"] = softcap
    return options


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
) -> torch.Tensor | None:
    """transformers' mask-function signature. Returns what core_attention_forward needs to apply the mask,
    or raises a ValueError for a mask core cannot honour: None for causal or full attention (a causal
    sliding window included: the attention function gets its size), the (B, kv_length) boolean mask of
    the keys for a padded batch, or the int32 boundaries of sequences packed into the rows (over the rows
    laid end to end) for restarting position_ids.

    transformers 5 describes the queries by q_length and q_offset; 4.54 to 4.57 by their positions,
    cache_position. tensor_options (allow_is_causal_skip, dtype, device, config, use_vmap, ...) say how
    to build a mask tensor, which core never needs.
    """
    # A plain pattern without a 2-D mask is decided from names alone, so torch.compile traces it; the
    # checks that read tensors or take the pattern apart run outside the graph (one graph break).
    handed_over = None
    causal = _plain_pattern_is_causal(mask_function)
    if causal is None:
        causal, handed_over = _check_pattern(mask_function, kv_length=kv_length, local_size=local_size)
    if attention_mask is not None:
        padding = _padding_mask(attention_mask, kv_length=kv_length, kv_offset=kv_offset)
        if padding is not None and handed_over is not None:  # transformers packs only without a mask
            raise ValueError(f"a padding mask over sequences packed into rows: {_SUPPORTED}")
        handed_over = padding if padding is not None else handed_over
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
    return handed_over


def _plain_pattern_is_causal(mask_function: Callable) -> bool | None:
    """True for transformers' causal pattern, False for its full (bidirectional) one, None for any other.
    Decided by name, not by importing masking_utils: Dynamo cannot trace an import that returns one of
    transformers' lazy modules (a graph break)."""
    if getattr(mask_function, "__module__", None) != _MASKING_UTILS:
        return None
    name = mask_function.__name__  # a factory's closure has its own name ("and_mask", ...)
    if name == "causal_mask_function":
        return True
    if name == "bidirectional_mask_function":  # transformers >= 5
        return False
    return None


@torch.compiler.disable
def _first_position(cache_position: torch.Tensor) -> int:
    return int(cache_position[0])


@torch.compiler.disable
def _check_pattern(
    mask_function: Callable, *, kv_length: int, local_size: int | None
) -> tuple[bool, torch.Tensor | None]:
    """Refuse a mask pattern core cannot compute. Returns whether it is causal (else it is full attention)
    and, when it packs several sequences into a row, their int32 boundaries (else None)."""
    parts = _intersected_parts(mask_function)
    names = [_factory_name(part) for part in parts]
    known = (*_PLAIN_PATTERNS, *_LOCAL_OVERLAYS, _PACKED_SEQUENCES)
    if not any(name in _PLAIN_PATTERNS for name in names) or any(name not in known for name in names):
        described = ", ".join(getattr(part, "__qualname__", repr(part)) for part in parts)
        raise ValueError(
            f"the model asks for a mask made of [{described}], which core cannot make: {_SUPPORTED}"
        )
    causal = any(_PLAIN_PATTERNS.get(name, False) for name in names)
    # A causal sliding window reaches core through the attention function's sliding_window argument, as
    # it reaches FlashAttention. Other local patterns pass only where they hide nothing (transformers' own
    # test, which lets SDPA drop the mask too).
    honoured = {"sliding_window_overlay"} if causal else set()
    hiding = [name for name in names if name in _LOCAL_OVERLAYS and name not in honoured]
    if hiding and (local_size is None or kv_length >= local_size):
        raise ValueError(
            f"the model asks for {hiding[0]} (size {local_size}) over {kv_length} keys, which core does not "
            f"support: {_SUPPORTED}"
        )
    boundaries = None
    for part, name in zip(parts, names):
        if name == _PACKED_SEQUENCES:
            boundaries = _packed_boundaries(_closure(part)["packed_sequence_mask"])
    return causal, boundaries


def _packed_boundaries(sequence_index: torch.Tensor) -> torch.Tensor | None:
    """transformers' packed-sequence mask, (B, N): each token's sequence within its row, counted from 0.
    Returns the int32 offsets where sequences start in the rows laid end to end, and their total B * N
    (attention_varlen's cu_seqlens), or None when no row holds more than one sequence. The tensor carries
    the longest sequence's length as its `longest_sequence` attribute."""
    if not bool((sequence_index[:, -1] != 0).any()):
        return None
    flat = sequence_index.flatten()
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[:: sequence_index.shape[1]] = True  # every row starts a sequence, whatever its index
    offsets = starts.nonzero().flatten()
    boundaries = torch.cat([offsets, offsets.new_tensor([flat.numel()])]).to(torch.int32)
    boundaries.longest_sequence = int(boundaries.diff().max())  # every layer's grid size, read here once
    return boundaries


def _intersected_parts(mask_function: Callable) -> list[Callable]:
    """The mask functions whose intersection (transformers' and_masks) `mask_function` is, with the position
    remapping transformers wraps around a pattern for packed sequences taken off: it counts positions from
    each sequence's start, as attention_varlen does."""
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
def _padding_mask(attention_mask: torch.Tensor, *, kv_length: int, kv_offset: int) -> torch.Tensor | None:
    """A 2-D mask (B, positions) over the keys at positions kv_offset to kv_offset + kv_length - 1, as a
    (B, kv_length) boolean tensor, or None when it masks none of them. transformers counts positions
    past the mask's end as masked: the unused tail of a static cache, which core refuses."""
    keys_end = kv_offset + kv_length
    if attention_mask.shape[-1] < keys_end:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[-1]} positions but the keys run to position "
            f"{keys_end} (a static cache's unused tail counts as masked): {_SUPPORTED}"
        )
    keys = attention_mask[:, kv_offset:keys_end].bool()
    return None if bool(keys.all()) else keys


def _check_queries_end_at_the_last_key(q_length: int, q_offset: int, *, kv_length: int, kv_offset: int):
    """core's causal mask is bottom-right aligned: the last query sits on the last key. A DynamicCache
    grows that way; a static cache holds keys past the current position, which need a mask."""
    if q_offset + q_length != kv_offset + kv_length:
        raise ValueError(
            f"the queries end at position {q_offset + q_length} but the keys at {kv_offset + kv_length}: "
            "core's causal mask is bottom-right aligned (the last query sees the last key), as a "
            f"DynamicCache grows; a static cache needs a mask for its unused tail: {_SUPPORTED}"
        )
