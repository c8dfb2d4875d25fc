"""core as a transformers attention implementation (core.integrations.transformers), on a tiny random Llama
with GQA: the same weights run through "core", the same-dtype "eager" model (the policy's yardstick) and
a float64 "eager" model (the truth), forward, backward and generate(); then everything core refuses.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="4.54")  # register() needs 4.54

import core  # noqa: E402
import core.integrations.transformers as integration  # noqa: E402
from core.tolerance import judge  # noqa: E402

from .conftest import DEVICE  # noqa: E402

SEQUENCE = 16
BATCH = 2


@pytest.fixture(autouse=True, scope="module")
def registered():
    integration.register()


def tiny_config(config_class=transformers.LlamaConfig, **overrides):
    """2 layers, hidden 64, 4 query heads over 2 key/value heads of dim 16 (GQA), vocabulary 128."""
    settings = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    return config_class(**{**settings, **overrides})


def tiny_model(attn_implementation="core", dtype=torch.float32, *, config=None, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        config or tiny_config(), attn_implementation=attn_implementation
    )
    return model.to(device=DEVICE, dtype=dtype).eval()


def same_weights(model, attn_implementation, dtype=None):
    twin = copy.deepcopy(model)
    twin.set_attn_implementation(attn_implementation)
    return twin.to(dtype) if dtype is not None else twin


def token_ids(seed=1, *, length=SEQUENCE, batch=BATCH):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, 128, (batch, length), generator=generator).to(DEVICE)


def logits_and_gradients(model, ids):
    """Logits and the gradients of the language-model loss w.r.t. every attention projection."""
    model.zero_grad(set_to_none=True)
    output = model(ids, labels=ids)
    output.loss.backward()
    projections = {
        name.removeprefix("_orig_mod."): parameter.grad  # a compiled model's names carry its wrapper's
        for name, parameter in model.named_parameters()
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"))
    }
    return output.logits.detach(), projections


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_logits_and_gradients_are_within_the_policy_against_a_float64_model(dtype):
    """The whole model is judged as the tolerance policy judges a kernel: core's error against the float64
    model is at most factor x the same-dtype eager model's error + floor (logits: the output rule; each
    projection's weight gradient: the gradient rule). Each weight gradient is its own family: their scales
    differ by orders of magnitude (q and k far below v and o), and one shared floor would leave the small
    ones unjudged."""
    model = tiny_model("core", dtype)
    ids = token_ids()
    logits, gradients = logits_and_gradients(model, ids)
    true_logits, true_gradients = logits_and_gradients(same_weights(model, "eager", torch.float64), ids)
    eager_logits, eager_gradients = logits_and_gradients(same_weights(model, "eager"), ids)

    assert len(gradients) == 8
    verdicts = [judge("out", logits, true_logits, eager_logits)]
    for name, gradient in gradients.items():
        verdicts.append(judge("dq", gradient, true_gradients[name], eager_gradients[name]))
    failed = [str(v) for v in verdicts if not v.ok]
    assert not failed, "outside the tolerance policy:\n" + "\n".join(failed)


def test_every_layer_runs_core(monkeypatch):
    """attn_implementation="core" reaches core.attention once per layer (no silent fallback)."""
    calls = []
    attention = core.attention

    def counting_attention(*args, **kwargs):
        calls.append(kwargs)
        return attention(*args, **kwargs)

    monkeypatch.setattr(core, "attention", counting_attention)
    tiny_model("core")(token_ids())
    assert len(calls) == 2
    assert all(call["causal"] is True and call["sm_scale"] == 16**-0.5 for call in calls)


def test_set_attn_implementation_switches_a_loaded_model_to_core():
    model = tiny_model("sdpa")
    model.set_attn_implementation("core")
    assert model.config._attn_implementation == "core"
    ids = token_ids()
    built_with_core = tiny_model("core")
    assert torch.equal(model(ids).logits, built_with_core(ids).logits)


def test_generate_with_a_kv_cache_matches_sdpa_and_each_step_is_within_the_policy():
    """Greedy decoding: the prompt's forward (Nq = Nk) and then one query against the growing cache
    (Nq = 1, Nk > 1, bottom-right aligned). Every step's logits are judged against a float64 forward of
    the whole sequence without a cache; the tokens must equal SDPA's."""
    new_tokens = 4
    model = tiny_model("core", seed=3)
    prompt = token_ids(seed=4, length=10)

    def greedy(attn_model):
        result = attn_model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        return result.sequences, torch.stack(result.logits, dim=1)

    sequences, step_logits = greedy(model)
    sdpa_sequences, _ = greedy(same_weights(model, "sdpa"))
    _, eager_step_logits = greedy(same_weights(model, "eager"))

    truth = same_weights(model, "eager", torch.float64)
    with torch.no_grad():
        true_logits = truth(sequences[:, :-1]).logits[:, prompt.shape[1] - 1 :]
    # Greedy choices must be clear for equal tokens to be a fair demand: the top two true logits of
    # each step lie further apart than any difference a correct kernel can make.
    top_two = true_logits.topk(2, dim=-1).values
    assert (top_two[..., 0] - top_two[..., 1]).min() > 1e-3

    assert torch.equal(sequences, sdpa_sequences)
    for step in range(new_tokens):
        verdict = judge("out", step_logits[:, step], true_logits[:, step], eager_step_logits[:, step])
        assert verdict.ok, f"step {step}: {verdict}"


def test_attention_output_is_a_view_in_the_models_layout():
    """The returned (B, N, Hq, D) output is a transpose of core's, which keeps the query's BSHD strides:
    contiguous, so the model's reshape to (B, N, Hq * D) copies nothing."""
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(2, 7, 4, 16, generator=generator).to(DEVICE).transpose(1, 2)
    k = torch.randn(2, 2, 7, 16, generator=generator).to(DEVICE)
    v = torch.randn(2, 2, 7, 16, generator=generator).to(DEVICE)
    module = torch.nn.Module()
    output, weights = integration.core_attention_forward(module, q, k, v, None, scaling=0.3)
    assert weights is None
    assert output.shape == (2, 7, 4, 16) and output.is_contiguous() and output._is_view()
    assert torch.equal(output, core.attention(q, k, v, causal=True, sm_scale=0.3).transpose(1, 2))

    module.is_causal = False  # the module's flag decides unless is_causal is passed
    full, _ = integration.core_attention_forward(module, q, k, v, None)
    assert torch.equal(full, core.attention(q, k, v, causal=False).transpose(1, 2))
    causal, _ = integration.core_attention_forward(module, q, k, v, None, is_causal=True)
    assert torch.equal(causal, core.attention(q, k, v, causal=True).transpose(1, 2))


def test_a_mask_without_padding_gives_the_same_logits_as_no_mask():
    model = tiny_model("core")
    ids = token_ids()
    assert torch.equal(model(ids, attention_mask=torch.ones_like(ids)).logits, model(ids).logits)


def judge_logits(model, ids):
    """The policy's verdict on the model's logits against its float64 and same-dtype "eager" twins."""
    with torch.no_grad():
        logits = model(ids).logits
        truth = same_weights(model, "eager", torch.float64)(ids).logits
        yardstick = same_weights(model, "eager")(ids).logits
    verdict = judge("out", logits, truth, yardstick)
    assert verdict.ok, str(verdict)
    return verdict, truth


def test_a_sliding_window_longer_than_the_sequence_hides_nothing_and_passes():
    config = tiny_config(transformers.MistralConfig, sliding_window=SEQUENCE + 1)
    judge_logits(tiny_model("core", config=config), token_ids())


def each_sequence_alone(model, ids, rows):
    """Logits of each (row, start, end) token range of ids run alone, concatenated in that order: what a
    padded or packed batch must give at those tokens."""
    with torch.no_grad():
        return torch.cat([model(ids[row : row + 1, start:end]).logits[0] for row, start, end in rows])


def judge_against_each_sequence_alone(model, logits, ids, rows):
    truth = each_sequence_alone(same_weights(model, "eager", torch.float64), ids, rows)
    yardstick = each_sequence_alone(same_weights(model, "eager"), ids, rows)
    verdict = judge("out", logits, truth, yardstick)
    assert verdict.ok, str(verdict)


def test_without_a_cache_restarting_position_ids_pack_sequences_that_attend_only_within_themselves():
    """transformers reads position_ids that restart within a row as sequences packed into it (no cache);
    each must give its own logits, as if it ran alone, in every row of the batch."""
    model = tiny_model("core")
    ids = token_ids()
    assert torch.equal(model(ids, use_cache=False).logits, model(ids).logits)  # plain ones change nothing
    lengths = [(6, 10), (3, 4, 9)]
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths]).to(DEVICE)
    with torch.no_grad():
        logits = model(ids, position_ids=position_ids, use_cache=False).logits
    rows = [(row, sum(ns[:i]), sum(ns[: i + 1])) for row, ns in enumerate(lengths) for i in range(len(ns))]
    judge_against_each_sequence_alone(model, logits.flatten(0, 1), ids, rows)


def test_packed_sequences_under_a_sliding_window_count_positions_from_their_own_start():
    """transformers remaps a window's positions per packed sequence; varlen's per-sequence alignment is
    the same thing. A fully padded row is harmless too (an empty sequence)."""
    model = tiny_model("core", config=tiny_config(transformers.MistralConfig, sliding_window=3))
    ids = token_ids(batch=1)
    position_ids = torch.cat([torch.arange(6), torch.arange(10)]).to(DEVICE)[None]
    with torch.no_grad():
        logits = model(ids, position_ids=position_ids, use_cache=False).logits
    judge_against_each_sequence_alone(model, logits[0], ids, [(0, 0, 6), (0, 6, SEQUENCE)])

    ids = token_ids()
    mask = torch.ones_like(ids)
    mask[0] = 0
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    assert torch.isfinite(logits).all()
    judge_against_each_sequence_alone(model, logits[1], ids, [(1, 0, SEQUENCE)])


def test_packed_rows_size_the_grid_by_their_longest_sequence(monkeypatch):
    """The mask function finds the longest packed sequence once per forward; every layer's varlen call
    gets it as its bound (not the row length)."""
    bounds = []
    attention_varlen = core.attention_varlen

    def recording(*args, **kwargs):
        bounds.append(args[5:7])
        return attention_varlen(*args, **kwargs)

    monkeypatch.setattr(core, "attention_varlen", recording)
    position_ids = torch.cat([torch.arange(6), torch.arange(10)]).to(DEVICE)[None]
    with torch.no_grad():
        tiny_model("core")(token_ids(batch=1), position_ids=position_ids, use_cache=False)
    assert bounds == [(10, 10), (10, 10)]


def test_flattening_collator_kwargs_pack_sequences_as_restarting_position_ids_do():
    """DataCollatorWithFlattening(return_flash_attn_kwargs=True) hands cu_seq_lens_q/k and max_length_q/k
    over, FlashAttention's packed-sequence arguments: the same logits, bitwise, as its position_ids alone."""
    model = tiny_model("core")
    lengths = {7: 5, 8: 1, 9: 10}  # seed: length
    documents = [
        {"input_ids": token_ids(seed=seed, length=n, batch=1)[0].tolist()} for seed, n in lengths.items()
    ]
    collated = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)(documents)
    batch = {name: value.to(DEVICE) if torch.is_tensor(value) else value for name, value in collated.items()}
    assert batch["cu_seq_lens_q"].dtype == torch.int32 and batch["max_length_q"] == 10
    with torch.no_grad():
        logits = model(batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        with_kwargs = model(**{name: value for name, value in batch.items() if name != "labels"}).logits
    assert torch.equal(with_kwargs, logits)
    rows = [(0, 0, 5), (0, 5, 6), (0, 6, 16)]
    judge_against_each_sequence_alone(model, logits[0], batch["input_ids"], rows)

    cu_seq_lens = batch["cu_seq_lens_q"]
    with pytest.raises(ValueError, match=r"\['max_length_q', 'max_length_k'\] missing"):
        model(batch["input_ids"], cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens)
    with pytest.raises(ValueError, match="seq_idx"):
        model(batch["input_ids"], seq_idx=torch.zeros_like(batch["input_ids"], dtype=torch.int32))


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_padded_batch_gives_each_row_the_logits_it_has_alone(side):
    """A 2-D attention_mask with padding: core gathers the unpadded tokens into one packed batch. Each row's
    unpadded tokens must give the logits they give alone (left padding shifts positions, and rotary
    attention depends only on their differences)."""
    model = tiny_model("core")
    ids = token_ids()
    mask = torch.ones_like(ids)
    padded = slice(0, 5) if side == "left" else slice(SEQUENCE - 5, SEQUENCE)
    mask[0, padded] = 0
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    kept = mask.bool()
    rows = [(0, 5, SEQUENCE) if side == "left" else (0, 0, SEQUENCE - 5), (1, 0, SEQUENCE)]
    judge_against_each_sequence_alone(model, logits[kept], ids, rows)


def test_the_attention_function_outputs_zeros_at_padded_queries_and_each_row_alone_elsewhere():
    generator = torch.Generator().manual_seed(6)
    q = torch.randn(2, 4, 8, 16, generator=generator).to(DEVICE)
    k = torch.randn(2, 2, 8, 16, generator=generator).to(DEVICE)
    v = torch.randn(2, 2, 8, 16, generator=generator).to(DEVICE)
    keys = torch.ones(2, 8, dtype=torch.bool, device=DEVICE)
    keys[0, :3] = False
    out, _ = integration.core_attention_forward(torch.nn.Module(), q, k, v, keys)
    assert out.shape == (2, 8, 4, 16)
    assert torch.equal(out[0, :3], torch.zeros_like(out[0, :3]))
    alone = core.attention(q[:1, :, 3:], k[:1, :, 3:], v[:1, :, 3:]).transpose(1, 2)
    torch.testing.assert_close(out[:1, 3:], alone)
    torch.testing.assert_close(out[1:], core.attention(q[1:], k[1:], v[1:]).transpose(1, 2))


def test_generate_from_a_left_padded_batch_matches_sdpa():
    """Left-padded prompts, then one query per step against the growing cache, each row's queries aligned
    to its own last key."""
    model = tiny_model("core", seed=3)
    prompt = token_ids(seed=4, length=10)
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0

    def greedy(attn_model):
        result = attn_model.generate(
            prompt, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
        return result.sequences, torch.stack(result.logits, dim=1)

    sequences, _ = greedy(model)
    sdpa_sequences, sdpa_logits = greedy(same_weights(model, "sdpa"))
    top_two = sdpa_logits.topk(2, dim=-1).values  # clear greedy choices make equal tokens a fair demand
    assert (top_two[..., 0] - top_two[..., 1]).min() > 1e-3
    assert torch.equal(sequences, sdpa_sequences)


def test_dropout_in_training_is_refused_and_ignored_in_eval():
    model = tiny_model("core", config=tiny_config(attention_dropout=0.1))
    ids = token_ids()
    model.eval()(ids)  # transformers passes dropout=0 in eval mode
    with pytest.raises(ValueError, match="dropout"):
        model.train()(ids)


def test_attention_weights_are_refused():
    with pytest.raises(ValueError, match="attention weights"):
        tiny_model("core")(token_ids(), output_attentions=True)


def gemma2_config(**overrides):
    """Gemma 2's attention: every other layer a sliding window (4 keys here), tanh softcapping of the
    scores; weights drawn 10x wider than transformers' default, so that scores reach the cap."""
    settings = dict(sliding_window=4, attn_logit_softcapping=5.0, final_logit_softcapping=None)
    settings.update(query_pre_attn_scalar=16, initializer_range=0.2)
    return tiny_config(transformers.Gemma2Config, **{**settings, **overrides})


def test_a_gemma2_model_with_a_sliding_window_and_softcapping_is_within_the_policy():
    ids = token_ids()
    verdict, truth = judge_logits(tiny_model("core", config=gemma2_config()), ids)
    # Both features change the logits (same weights without one of them): a kernel that ignored either
    # would fail the verdict above.
    for without_one in (gemma2_config(sliding_window=SEQUENCE), gemma2_config(attn_logit_softcapping=None)):
        other = tiny_model("eager", config=without_one).to(torch.float64)
        with torch.no_grad():
            assert (other(ids).logits - truth).abs().max() > 100 * verdict.bound


def test_generate_with_a_sliding_window_and_softcapping_matches_eager():
    model = tiny_model("core", config=gemma2_config(), seed=3)
    prompt = token_ids(seed=4, length=10)
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    settings["attention_mask"] = torch.ones_like(prompt)
    sequences = model.generate(prompt, **settings)
    expected = same_weights(model, "eager").generate(prompt, **settings)
    assert torch.equal(sequences, expected)


def test_the_attention_function_maps_the_window_and_softcap_as_flashattention_does():
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    k = v = torch.randn(1, 1, 8, 16, device=DEVICE)
    module = torch.nn.Module()
    out, _ = integration.core_attention_forward(module, q, k, v, None, sliding_window=4, softcap=30.0)
    expected = core.attention(q, k, v, window_size=(3, 0), softcap=30.0)
    assert torch.equal(out, expected.transpose(1, 2))
    with pytest.raises(ValueError, match="sliding_window=4 with full"):
        integration.core_attention_forward(module, q, k, v, None, is_causal=False, sliding_window=4)


def test_a_static_cache_is_refused():
    model = tiny_model("core")
    prompt = token_ids(length=8)
    with pytest.raises(ValueError, match="static cache"):
        model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=2,
            do_sample=False,
            cache_implementation="static",
        )


def test_an_explicit_4d_mask_is_refused():
    ids = token_ids()
    mask = torch.ones(BATCH, 1, SEQUENCE, SEQUENCE, dtype=torch.bool, device=DEVICE).tril()
    with pytest.raises(ValueError, match="attention mask tensor of shape"):
        tiny_model("core")(ids, attention_mask=mask)


def test_the_mask_function_hands_over_none_only_for_what_core_computes():
    """core_attention_mask called as transformers 5 calls it (q_length, q_offset) and as 4.5x does
    (cache_position), on patterns built with transformers' own mask factories."""
    masks = transformers.masking_utils
    causal = masks.causal_mask_function

    def mask(mask_function=causal, **sizes):
        sizes = sizes or {"q_length": 8, "q_offset": 0}
        return integration.core_attention_mask(1, kv_length=8, mask_function=mask_function, **sizes)

    assert mask() is None
    assert mask(q_length=1, q_offset=7) is None  # one decoded token against the cache: bottom-right
    assert mask(cache_position=torch.arange(6, 8)) is None
    with pytest.raises(ValueError, match="bottom-right aligned"):
        mask(q_length=2, q_offset=0)
    with pytest.raises(ValueError, match="bottom-right aligned"):
        mask(cache_position=torch.arange(0, 2))
    with pytest.raises(ValueError, match="static cache"):
        mask(q_length=1, q_offset=torch.tensor(7))

    # A causal sliding window passes: the attention function gets its size. Other local patterns pass
    # only where they hide nothing.
    sliding = masks.and_masks(masks.sliding_window_overlay(4), causal)
    assert mask(sliding, q_length=8, q_offset=0, local_size=4) is None
    both_ways = masks.sliding_window_bidirectional_mask_function(4)
    assert mask(both_ways, q_length=8, q_offset=0, local_size=16) is None
    with pytest.raises(ValueError, match="sliding_window_bidirectional_overlay"):
        mask(both_ways, q_length=8, q_offset=0, local_size=4)
    chunked = masks.chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="chunked_overlay"):
        mask(chunked, q_length=8, q_offset=0, local_size=4)

    # Padding: the keys' mask, sliced to the keys, or None when it masks none of them.
    assert mask(attention_mask=torch.ones(1, 8, dtype=torch.bool), q_length=8, q_offset=0) is None
    padded = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask(attention_mask=padded, q_length=8, q_offset=0), padded)

    # Packed rows: the boundaries of their sequences over the rows laid end to end.
    one_sequence = masks.packed_sequence_mask_function(torch.zeros(1, 8, dtype=torch.long))
    assert mask(masks.and_masks(causal, one_sequence)) is None
    two_sequences = masks.packed_sequence_mask_function(torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]]))
    boundaries = mask(masks.and_masks(causal, two_sequences))
    assert boundaries.dtype == torch.int32 and boundaries.tolist() == [0, 3, 8]
    two_rows = masks.packed_sequence_mask_function(torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0] * 8]))
    boundaries = integration.core_attention_mask(
        2, kv_length=8, mask_function=masks.and_masks(causal, two_rows), q_length=8, q_offset=0
    )
    assert boundaries.tolist() == [0, 3, 8, 16]

    def diagonal(batch, head, q, kv):
        return q == kv

    with pytest.raises(ValueError, match="mask made of"):
        mask(masks.or_masks(causal, diagonal))


def test_unknown_keyword_arguments_are_a_type_error_and_unset_ones_are_ignored():
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    k = v = torch.randn(1, 1, 8, 16, device=DEVICE)
    module = torch.nn.Module()
    with pytest.raises(TypeError, match="head_mask"):
        integration.core_attention_forward(module, q, k, v, None, head_mask=torch.ones(2))
    integration.core_attention_forward(module, q, k, v, None, head_mask=None, output_attentions=False)


def test_deterministic_is_passed_on_and_none_keeps_the_default(monkeypatch):
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    k = v = torch.randn(1, 1, 8, 16, device=DEVICE)
    asked, attend = [], core.attention
    monkeypatch.setattr(
        core, "attention", lambda *a, **options: asked.append(options) or attend(*a, **options)
    )
    for deterministic in (False, True, None):
        integration.core_attention_forward(torch.nn.Module(), q, k, v, None, deterministic=deterministic)
    assert [options.get("deterministic", "default") for options in asked] == [False, True, "default"]
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        integration.core_attention_forward(torch.nn.Module(), q, k, v, None, deterministic=1)


def test_register_is_idempotent_and_names_transformers_when_it_is_missing(monkeypatch):
    integration.register()
    assert transformers.AttentionInterface._global_mapping["core"] is integration.core_attention_forward
    assert transformers.AttentionMaskInterface._global_mapping["core"] is integration.core_attention_mask
    monkeypatch.setitem(sys.modules, "transformers", None)  # what `import transformers` sees without it
    with pytest.raises(ImportError, match="transformers"):
        integration.register()


def test_importing_core_and_its_integration_does_not_import_transformers():
    source = "import sys, core, core.integrations.transformers; assert 'transformers' not in sys.modules"
    environment = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")}
    subprocess.run([sys.executable, "-c", source], check=True, env=environment)


def breaks_in_core(explanation) -> list[str]:
    """The graph breaks whose Python stack passes through core's package (the integration included)."""
    package = os.path.dirname(core.__file__)
    return [
        reason.reason
        for reason in explanation.break_reasons
        if any(frame.filename.startswith(package) for frame in reason.user_stack)
    ]


def test_compiled_model_equals_eager_bitwise_with_no_graph_break_from_core():
    model = tiny_model("core")
    ids = token_ids()
    logits, gradients = logits_and_gradients(model, ids)
    torch._dynamo.reset()
    compiled_logits, compiled_gradients = logits_and_gradients(torch.compile(model, backend="aot_eager"), ids)
    assert torch.equal(compiled_logits, logits)
    assert all(torch.equal(compiled_gradients[name], gradient) for name, gradient in gradients.items())
    torch._dynamo.reset()
    with_core = torch._dynamo.explain(model)(ids, labels=ids)
    torch._dynamo.reset()
    with_sdpa = torch._dynamo.explain(same_weights(model, "sdpa"))(ids, labels=ids)
    # core's ops are opaque to Dynamo: the model breaks its graph where the SDPA model does (nowhere, in
    # recent transformers) and never inside core's package, the integration included.
    assert breaks_in_core(with_core) == []
    assert with_core.graph_break_count == with_sdpa.graph_break_count


@pytest.mark.parametrize("inputs", ["padded", "packed", "window and softcap"])
def test_compiled_model_equals_eager_bitwise_with_masks_and_features(inputs):
    """torch.compile over the varlen and window paths: the mask function's checks run outside the graph
    (graph breaks, as reading a mask must), the results are eager's bits."""
    ids = token_ids()
    model, arguments = tiny_model("core"), {}
    if inputs == "padded":
        arguments["attention_mask"] = torch.ones_like(ids)
        arguments["attention_mask"][0, :5] = 0
    elif inputs == "packed":
        position_ids = torch.cat([torch.arange(6), torch.arange(10)]).to(DEVICE)
        arguments.update(position_ids=position_ids.expand(BATCH, -1), use_cache=False)
    else:
        model = tiny_model("core", config=gemma2_config())
    with torch.no_grad():
        eager = model(ids, **arguments).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")(ids, **arguments).logits
    torch._dynamo.reset()
    assert torch.equal(compiled, eager)
