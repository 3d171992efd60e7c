"""Batched generation shared by self-distillation, evaluation and ``predict``.

Prompts are sorted by length so each batch pads little, left-padded so every row's answer starts at the same
column, prefilled once with the KV cache, then decoded one token per step until each row hits end-of-turn or
``max_new_tokens``. The cache gets room for the whole answer after the prefill (:func:`make_room`), so a step
writes its keys and values in place instead of copying the cache to append them. Finished rows leave the batch
(their cache rows are dropped) once they are a quarter of it, so later steps compute only the rows still
answering: ``model.generate`` feeds finished rows padding until the longest answer ends. Each step is what
``generate`` does (repetition penalty, then greedy argmax or temperature + top-p and a multinomial draw over the
float32 softmax): greedy answers are the same; a sampled batch draws exactly as ``generate`` until rows first
leave it, and from the same distribution afterwards.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from rega.config import SamplingConfig

GREEDY = SamplingConfig(do_sample=False, temperature=1.0, top_p=1.0)


class TemperatureTopP:
    """Temperature then nucleus (top-p) filtering, equal to transformers' warpers but fast on large vocabularies.

    transformers' top-p sorts the whole vocabulary for every row at every step (49K tokens for SmolLM2: most of
    a CPU decoding step at batch 16). The nucleus almost always lies within the top ``k`` tokens, so it is found
    there; rows whose nucleus is wider fall back to the full sort, so the result is the same.
    """

    def __init__(self, temperature: float, top_p: float, k: int = 256):
        from transformers import TopPLogitsWarper

        self.temperature, self.top_p, self.k = temperature, top_p, k
        self.full = TopPLogitsWarper(top_p)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores / self.temperature
        top, index = scores.topk(min(self.k, scores.shape[-1]), dim=-1)
        probs = (top - scores.logsumexp(-1, keepdim=True)).exp()
        cumulative = probs.cumsum(-1)
        keep = (cumulative - probs) < self.top_p  # a token stays while the mass before it is below top_p
        keep[:, 0] = True
        out = torch.full_like(scores, -float("inf")).scatter_(
            -1, index, top.masked_fill(~keep, -float("inf"))
        )
        wide = cumulative[:, -1] < self.top_p
        if wide.any():
            out[wide] = self.full(input_ids[wide], scores[wide])
        return out


@dataclass
class Generation:
    index: int  # position in the caller's prompt list
    token_ids: list[int]  # generated tokens, end-of-turn excluded
    text: str
    finish_reason: str  # "stop" (end-of-turn) or "length" (hit max_new_tokens)


def stop_token_ids(model, tokenizer) -> list[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    return sorted(ids)


def length_sorted_batches(
    lengths: Sequence[int], batch_size: int, max_batch_tokens: int | None = None
) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (so memory problems show up at once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = max([lengths[j] for j in current] + [lengths[i]])
        too_big = max_batch_tokens is not None and current and width * (len(current) + 1) > max_batch_tokens
        if len(current) == batch_size or too_big:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def decoding_kwargs(sampling: SamplingConfig, stops: list[int], pad_id: int) -> dict:
    """``model.generate`` keyword arguments for ``sampling``: greedy, or temperature then exact top-p."""
    kwargs = {
        "max_new_tokens": sampling.max_new_tokens,
        "do_sample": sampling.do_sample,
        "eos_token_id": stops,
        "pad_token_id": pad_id,
        "repetition_penalty": sampling.repetition_penalty,
        "use_cache": True,
    }
    if sampling.do_sample:
        from transformers import LogitsProcessorList

        # Our processor applies temperature and top-p itself (transformers runs custom processors first).
        processor = TemperatureTopP(sampling.temperature, sampling.top_p)
        kwargs.update(temperature=1.0, top_p=1.0, top_k=0, logits_processor=LogitsProcessorList([processor]))
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def left_padded(
    rows: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) with rows left-padded; positions restart after the padding."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for k, ids in enumerate(rows):
        input_ids[k, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        attention[k, width - len(ids) :] = 1
    return input_ids, attention, (attention.cumsum(-1) - 1).clamp(min=0)


@dataclass
class Prefilled:
    """Left-padded rows after one forward with the KV cache: what decoding continues from."""

    input_ids: torch.Tensor  # [B, T] on the CPU (the repetition penalty reads it)
    attention: torch.Tensor  # [B, T] on the CPU
    last_logits: torch.Tensor  # [B, V] on the model's device
    cache: object
    cache_key: str  # the keyword the model takes the cache under


def _cached_forward(model, input_ids, attention, positions, **past) -> tuple[torch.Tensor, object, str]:
    """(last position's logits, KV cache, the keyword the model takes it under) of one forward that keeps the cache
    (continuing ``past``, the cache under its keyword, when given)."""
    device = next(model.parameters()).device
    out = model(
        input_ids=input_ids.to(device),
        attention_mask=attention.to(device),
        position_ids=positions.to(device),
        logits_to_keep=1,
        use_cache=True,
        **past,
    )
    cache_key = "cache" if "cache" in out else "past_key_values"  # transformers 5 / 4.x
    return out.logits[:, -1], out[cache_key], cache_key


def prefill(model, input_ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor) -> Prefilled:
    """One forward over left-padded rows keeping the KV cache; only the last position's logits are computed."""
    return Prefilled(input_ids, attention, *_cached_forward(model, input_ids, attention, positions))


# A batch whose rows share at least this many leading tokens prefills them once (:func:`prefill_rows`).
MIN_SHARED_PREFIX = 8


def shared_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Leading tokens every row shares, leaving each row at least one token of its own (its last position's
    logits start the answer)."""
    first, limit = rows[0], min(len(r) for r in rows) - 1
    for k in range(max(limit, 0)):
        if any(r[k] != first[k] for r in rows[1:]):
            return k
    return max(limit, 0)


def _plain_layers(cache) -> bool:
    plain, roomy = _layer_classes()
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) in (plain, roomy) for layer in layers)


def prefill_rows(model, rows: Sequence[Sequence[int]], pad_id: int, share_prefix: bool = False) -> Prefilled:
    """:func:`prefill` of tokenized rows, left-padded. With ``share_prefix``, the leading tokens all rows share
    (the system prompt and the chat template's opening) run once and their KV cache is repeated for every row;
    each row's own tokens follow, left-padded after the prefix (``[prefix][padding][own tokens]``, the padding
    masked, positions continuing from the prefix), so decoding continues exactly as from :func:`left_padded` rows.
    Caches other than plain dynamic layers (sliding windows, transformers 4's tuples) prefill whole rows."""
    shared = shared_prefix_length(rows) if share_prefix and len(rows) > 1 else 0
    if shared < MIN_SHARED_PREFIX:
        return prefill(model, *left_padded(rows, pad_id))
    head = torch.tensor([list(rows[0][:shared])], dtype=torch.long)
    _, cache, cache_key = _cached_forward(model, head, torch.ones_like(head), torch.arange(shared)[None])
    if not _plain_layers(cache):
        return prefill(model, *left_padded(rows, pad_id))
    cache.batch_repeat_interleave(len(rows))
    tail_ids, tail_mask, _ = left_padded([r[shared:] for r in rows], pad_id)
    attention = torch.cat([torch.ones((len(rows), shared), dtype=torch.long), tail_mask], dim=-1)
    positions = shared + (tail_mask.cumsum(-1) - 1).clamp(min=0)
    last = _cached_forward(model, tail_ids, attention, positions, **{cache_key: cache})
    input_ids = torch.cat([head.expand(len(rows), -1), tail_ids], dim=-1)
    return Prefilled(input_ids, attention, *last)


def _next_tokens(
    logits: torch.Tensor, history: torch.Tensor, sampling: SamplingConfig, warper
) -> torch.Tensor:
    """One decoding step's choice per row, as ``generate`` makes it."""
    scores = logits.float()
    if sampling.repetition_penalty != 1.0:
        from transformers import RepetitionPenaltyLogitsProcessor

        scores = RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty)(history, scores)
    if not sampling.do_sample:
        return scores.argmax(-1)
    probs = torch.softmax(warper(history, scores), dim=-1)
    return torch.multinomial(probs, num_samples=1).squeeze(1)


class RoomyLayer:
    """Methods of a transformers ``DynamicLayer`` whose keys and values are views of buffers with room to grow.

    ``DynamicLayer.update`` concatenates: every decoding step copies each layer's whole cache. Here the new
    positions are written into the buffer and the views extended (the attention reads the same values)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        used, new = self.keys.shape[-2], key_states.shape[-2]
        # Out of room, or keys replaced by a DynamicLayer method that builds new tensors (crop keeps a view): a new
        # buffer, doubled.
        moved = self.keys.data_ptr() != self.room_keys.data_ptr() or len(self.keys) != len(self.room_keys)
        if moved or used + new > self.room_keys.shape[-2]:
            self._regrow(2 * (used + new))
        self.room_keys[..., used : used + new, :] = key_states
        self.room_values[..., used : used + new, :] = value_states
        self.keys, self.values = self.room_keys[..., : used + new, :], self.room_values[..., : used + new, :]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        used = self.keys.shape[-2]
        self.room_keys, self.room_values = self.room_keys[indices], self.room_values[indices]
        self.keys, self.values = self.room_keys[..., :used, :], self.room_values[..., :used, :]

    def _regrow(self, length: int) -> None:
        used = self.keys.shape[-2]
        for name in ("keys", "values"):
            current = getattr(self, name)
            room = current.new_empty((*current.shape[:-2], length, current.shape[-1]))
            room[..., :used, :] = current
            setattr(self, f"room_{name}", room)
            setattr(self, name, room[..., :used, :])


@functools.cache
def _layer_classes() -> tuple[type, type]:
    """(transformers' ``DynamicLayer``, the same with :class:`RoomyLayer`'s methods)."""
    from transformers.cache_utils import DynamicLayer

    return DynamicLayer, type("RoomyDynamicLayer", (RoomyLayer, DynamicLayer), {})


def make_room(cache, tokens: int) -> None:
    """Give every plain dynamic layer of ``cache`` room for ``tokens`` more positions (others stay as they are:
    sliding-window layers, transformers 4's tuple caches)."""
    plain, roomy = _layer_classes()
    layers = getattr(cache, "layers", [])
    for i, layer in enumerate(layers):
        if type(layer) is plain and layer.is_initialized and layer.keys.dim() == 4:
            layers[i] = roomy.__new__(roomy)
            layers[i].__dict__.update(layer.__dict__)
            layers[i]._regrow(layer.keys.shape[-2] + tokens)


# Finished rows leave the batch once they are this share of it (at least one row): dropping rows copies the whole
# KV cache, so dropping each row as it finishes costs about what it saves (benchmarks/README.md, generation).
DROP_SHARE = 0.25


@torch.inference_mode()
def decode(model, tokenizer, start: Prefilled, sampling: SamplingConfig) -> list[Generation]:
    """Continue prefilled rows until each hits end-of-turn or ``sampling.max_new_tokens``. A finished row is fed
    padding, as ``generate`` does, until finished rows are :data:`DROP_SHARE` of the batch; then they leave it.
    One :class:`Generation` per row, ``index`` its row in ``start``."""
    device = start.last_logits.device
    stops, pad = set(stop_token_ids(model, tokenizer)), pad_token_id(tokenizer)
    warper = TemperatureTopP(sampling.temperature, sampling.top_p) if sampling.do_sample else None
    rows = start.attention.shape[0]
    tokens: list[list[int]] = [[] for _ in range(rows)]
    stopped = [False] * rows
    live: list[int | None] = list(range(rows))  # per batch row: its row in ``start``, None once finished
    history, mask = start.input_ids.to(device), start.attention.to(device)
    positions = mask.sum(-1, keepdim=True)
    logits, cache = start.last_logits, start.cache
    make_room(cache, sampling.max_new_tokens)
    for step in range(sampling.max_new_tokens):
        chosen = _next_tokens(logits, history, sampling, warper)
        for k, token in enumerate(chosen.tolist()):
            row = live[k]
            if row is not None and token in stops:
                stopped[row], live[k] = True, None
            elif row is not None:
                tokens[row].append(token)
        answering = [k for k, row in enumerate(live) if row is not None]
        if not answering or step == sampling.max_new_tokens - 1:
            break
        if len(live) - len(answering) >= max(1.0, DROP_SHARE * len(live)):
            index = torch.tensor(answering, device=device)
            cache.batch_select_indices(index)
            chosen, history, mask, positions = chosen[index], history[index], mask[index], positions[index]
            live = [live[k] for k in answering]
        finished = torch.tensor([row is None for row in live], device=device)
        chosen = chosen.masked_fill(finished, pad)
        history = torch.cat([history, chosen[:, None]], dim=-1)
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=-1)
        out = model(
            input_ids=chosen[:, None],
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{start.cache_key: cache},
        )
        positions = positions + 1
        logits = out.logits[:, -1]
    return [
        Generation(
            index=row,
            token_ids=kept,
            text=tokenizer.decode(kept, skip_special_tokens=True).strip(),
            finish_reason="stop" if stopped[row] else "length",
        )
        for row, kept in enumerate(tokens)
    ]


@torch.inference_mode()
def generate_batch(
    model, tokenizer, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, share_prefix: bool = False
) -> list[Generation]:
    """Generate for one batch of tokenized prompts (any order); results in the same order as ``prompts``."""
    start = prefill_rows(model, prompts, pad_token_id(tokenizer), share_prefix)
    return decode(model, tokenizer, start, sampling)


def generate(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    batch_size: int = 8,
    max_batch_tokens: int | None = None,
    share_prefix: bool = False,
) -> Iterator[Generation]:
    """Yield one :class:`Generation` per prompt, batch by batch in length order; ``index`` maps back to ``prompts``.
    ``share_prefix``: each batch prefills its rows' common leading tokens once (:func:`prefill_rows`)."""
    if sampling.do_sample:
        torch.manual_seed(sampling.seed)
    was_training = model.training
    model.eval()
    try:
        for batch in length_sorted_batches([len(p) for p in prompts], batch_size, max_batch_tokens):
            rows = [prompts[i] for i in batch]
            for gen in generate_batch(model, tokenizer, rows, sampling, share_prefix):
                gen.index = batch[gen.index]
                yield gen
    finally:
        model.train(was_training)
