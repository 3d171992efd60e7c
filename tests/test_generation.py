"""Batched generation: the fast top-p equals transformers' warpers; batches follow length order; the decoding
loop that drops finished rows answers as ``model.generate`` does."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch
from conftest import tiny_llama
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from rega.config import ModelConfig, SamplingConfig
from rega.data.chat import ChatFormat
from rega.model_source import load_tokenizer
from rega.modules.generation import (
    GREEDY,
    TemperatureTopP,
    decoding_kwargs,
    generate_batch,
    left_padded,
    length_sorted_batches,
    pad_token_id,
    stop_token_ids,
)


def reference(scores: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    ids = torch.zeros((scores.shape[0], 1), dtype=torch.long)
    return TopPLogitsWarper(top_p)(ids, TemperatureLogitsWarper(temperature)(ids, scores.clone()))


def test_fast_top_p_equals_transformers():
    torch.manual_seed(0)
    peaked = torch.randn(6, 5000) * 4  # nucleus within the top 256 tokens
    flat = torch.randn(3, 5000) * 0.01  # nucleus wider than 256 tokens: the fallback path
    scores = torch.cat([peaked, flat])
    ids = torch.zeros((scores.shape[0], 1), dtype=torch.long)
    for temperature, top_p in ((0.7, 0.95), (1.0, 0.5), (1.3, 0.99)):
        ours = TemperatureTopP(temperature, top_p)(ids, scores.clone())
        theirs = reference(scores, temperature, top_p)
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
        torch.testing.assert_close(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)])


def test_length_sorted_batches_cover_every_prompt_once():
    lengths = [5, 1, 9, 3, 7, 7, 2]
    batches = length_sorted_batches(lengths, batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert [lengths[i] for i in batches[0]] == [9, 7, 7]
    capped = length_sorted_batches(lengths, batch_size=3, max_batch_tokens=14)
    assert all(max(lengths[i] for i in b) * len(b) <= 14 or len(b) == 1 for b in capped)


@pytest.fixture(scope="module")
def tiny():
    """A tiny random LLaMA whose answers vary with the prompt (the shared tiny model, at the usual 0.02
    initialisation, answers the same token at every step), with the embedded model's tokenizer and template."""
    tokenizer = load_tokenizer(ModelConfig())
    model = tiny_llama(tokenizer, initializer_range=0.2).eval()
    chat = ChatFormat(tokenizer)
    texts = [
        "Hi",
        "A much longer question about the patient, the outcome and the dose",
        "Why so?",
        "Tell me more",
    ]
    return model, tokenizer, [chat.encode_prompt(chat.default_system, t) for t in texts]


def hf_generate(model, tokenizer, prompts, sampling) -> list[tuple[list[int], str]]:
    """``model.generate`` on the same left-padded batch, each row cut at its first stop token."""
    pad = pad_token_id(tokenizer)
    input_ids, attention, _ = left_padded(prompts, pad)
    stops = stop_token_ids(model, tokenizer)
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids, attention_mask=attention, **decoding_kwargs(sampling, stops, pad)
        )
    rows = []
    for new in out[:, input_ids.shape[1] :].tolist():
        cut = next((k for k, t in enumerate(new) if t in stops), None)
        rows.append((new, "length") if cut is None else (new[:cut], "stop"))
    return rows


@contextmanager
def stopping_at(model, tokens: list[int]):
    """These tokens end a turn (as a model's end-of-turn token does), for one test."""
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = tokens
    try:
        yield
    finally:
        model.generation_config.eos_token_id = saved


@contextmanager
def rows_per_forward(model):
    seen: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda _, a, kw: seen.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        yield seen
    finally:
        hook.remove()


def test_greedy_decoding_equals_generate_and_drops_finished_rows(tiny):
    model, tokenizer, prompts = tiny
    greedy = replace(GREEDY, max_new_tokens=12)
    free = hf_generate(model, tokenizer, prompts, greedy)
    assert len({tuple(t) for t, _ in free}) == len(prompts)  # the rows answer differently
    with stopping_at(model, [free[0][0][2], free[2][0][6]]):  # row 0 ends at step 3, row 2 at step 7
        with rows_per_forward(model) as seen:
            ours = generate_batch(model, tokenizer, prompts, greedy)
        theirs = hf_generate(model, tokenizer, prompts, greedy)
    assert [(g.token_ids, g.finish_reason) for g in ours] == theirs
    assert [len(g.token_ids) for g in ours][0] == 2 and {"stop", "length"} <= {g.finish_reason for g in ours}
    assert seen[0] == len(prompts) and seen[-1] < len(prompts)  # finished rows left the batch
    assert seen == sorted(seen, reverse=True) and len(seen) == greedy.max_new_tokens


def test_sampling_draws_as_generate(tiny):
    """Seeded draws are generate's token for token (temperature, top-p and the repetition penalty applied as
    generate applies them) while every row is in the batch; once finished rows leave it, later draws of the others
    change (fewer rows, other random numbers), not their law."""
    model, tokenizer, prompts = tiny
    sampling = SamplingConfig(temperature=0.7, top_p=0.95, max_new_tokens=10, repetition_penalty=1.3)
    torch.manual_seed(5)
    ours = generate_batch(model, tokenizer, prompts, sampling)
    torch.manual_seed(5)
    theirs = hf_generate(model, tokenizer, prompts, sampling)
    assert [(g.token_ids, g.finish_reason) for g in ours] == theirs
    torch.manual_seed(6)
    assert [g.token_ids for g in generate_batch(model, tokenizer, prompts, sampling)] != [
        t for t, _ in theirs
    ]
    with stopping_at(model, [theirs[1][0][3]]):  # row 1 ends at step 4
        torch.manual_seed(5)
        early = generate_batch(model, tokenizer, prompts, sampling)
    assert early[1].token_ids == theirs[1][0][:3] and early[1].finish_reason == "stop"
    for g, (tokens, _) in zip(early, theirs):
        assert g.token_ids[:3] == tokens[:3]  # the same draws until row 1 stopped
        assert g.finish_reason == "stop" or len(g.token_ids) == sampling.max_new_tokens


def test_cache_with_room_holds_what_concatenation_would(tiny):
    from transformers.cache_utils import DynamicLayer

    from rega.modules.generation import make_room, prefill

    model, tokenizer, prompts = tiny
    ids, mask, positions = left_padded(prompts, pad_token_id(tokenizer))
    with torch.inference_mode():
        cache = prefill(model, ids, mask, positions).cache
        layer = cache.layers[0]
        expected = layer.keys.clone()
        make_room(cache, 2)
        layer = cache.layers[0]
        assert type(layer).__name__ == "RoomyDynamicLayer" and isinstance(layer, DynamicLayer)

        def append(layer, expected):
            new = torch.randn(expected.shape[0], *expected.shape[1:-2], 1, expected.shape[-1])
            keys, _ = layer.update(new, new.clone())
            expected = torch.cat([expected, new], dim=-2)
            assert torch.equal(keys, expected) and torch.equal(layer.keys, expected)
            return expected

        for _ in range(3):  # the third append outgrows the room planned for: the buffer doubles
            expected = append(layer, expected)
        assert layer.room_keys.data_ptr() == layer.keys.data_ptr()
        layer.batch_select_indices(torch.tensor([2, 0]))  # finished rows leave the batch
        expected = append(layer, expected[[2, 0]])
        # DynamicLayer's own methods keep working: crop leaves a view, repeat builds tensors taken into a new buffer
        layer.crop(-2)
        expected = append(layer, expected[..., :-2, :])
        layer.batch_repeat_interleave(2)
        expected = append(layer, expected.repeat_interleave(2, dim=0))


def test_shared_prefix_prefill_answers_as_whole_rows(tiny):
    """The rows' common leading tokens (system prompt, template) prefilled once and repeated: the same logits,
    the same greedy answers and the same stops as prefilling every row whole; one row of the batch runs the
    prefix, and a batch with too short a common prefix prefills whole rows."""
    from rega.modules.generation import MIN_SHARED_PREFIX, prefill, prefill_rows, shared_prefix_length

    model, tokenizer, prompts = tiny
    shared = shared_prefix_length(prompts)
    assert shared >= MIN_SHARED_PREFIX and prompts[0][shared] != prompts[1][shared]
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # each row keeps one token of its own
    pad = pad_token_id(tokenizer)
    with torch.inference_mode():
        whole = prefill(model, *left_padded(prompts, pad))
        with rows_per_forward(model) as seen:
            ours = prefill_rows(model, prompts, pad, share_prefix=True)
    assert seen == [1, len(prompts)]
    torch.testing.assert_close(ours.last_logits, whole.last_logits, atol=1e-5, rtol=1e-5)
    assert ours.attention.sum(-1).tolist() == [len(p) for p in prompts]
    greedy = replace(GREEDY, max_new_tokens=12)
    plain = generate_batch(model, tokenizer, prompts, greedy)
    with stopping_at(model, [plain[0].token_ids[2]]):
        stopped = generate_batch(model, tokenizer, prompts, greedy)
        assert [
            (g.token_ids, g.finish_reason)
            for g in generate_batch(model, tokenizer, prompts, greedy, share_prefix=True)
        ] == [(g.token_ids, g.finish_reason) for g in stopped]
    shared_answers = generate_batch(model, tokenizer, prompts, greedy, share_prefix=True)
    assert [g.token_ids for g in shared_answers] == [g.token_ids for g in plain]
    short = [[5, 6, 7, 8], [5, 6, 9]]
    with torch.inference_mode(), rows_per_forward(model) as seen:
        prefill_rows(model, short, pad, share_prefix=True)
    assert seen == [2]
