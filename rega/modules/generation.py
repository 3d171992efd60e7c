"""Batched generation shared by self-distillation and evaluation.

Prompts are sorted by length so each batch pads little, left-padded so every row's answer starts at the same
column, generated with the KV cache in one ``generate`` call per batch, and cut at the first end-of-turn token.
"""

from __future__ import annotations

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


@torch.inference_mode()
def generate_batch(
    model, tokenizer, prompts: Sequence[Sequence[int]], sampling: SamplingConfig
) -> list[Generation]:
    """Generate for one batch of tokenized prompts (any order); results in the same order as ``prompts``."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention[row, width - len(ids) :] = 1
    stops = stop_token_ids(model, tokenizer)
    kwargs = decoding_kwargs(sampling, stops, pad_id)
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
    new_tokens = out[:, width:].tolist()
    stop_set = set(stops)
    results = []
    for row, tokens in enumerate(new_tokens):
        cut = next((k for k, t in enumerate(tokens) if t in stop_set), None)
        kept = tokens if cut is None else tokens[:cut]
        results.append(
            Generation(
                index=row,
                token_ids=kept,
                text=tokenizer.decode(kept, skip_special_tokens=True).strip(),
                finish_reason="length" if cut is None else "stop",
            )
        )
    return results


def generate(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    batch_size: int = 8,
    max_batch_tokens: int | None = None,
) -> Iterator[Generation]:
    """Yield one :class:`Generation` per prompt, batch by batch in length order; ``index`` maps back to ``prompts``."""
    if sampling.do_sample:
        torch.manual_seed(sampling.seed)
    was_training = model.training
    model.eval()
    try:
        for batch in length_sorted_batches([len(p) for p in prompts], batch_size, max_batch_tokens):
            for gen in generate_batch(model, tokenizer, [prompts[i] for i in batch], sampling):
                gen.index = batch[gen.index]
                yield gen
    finally:
        model.train(was_training)
