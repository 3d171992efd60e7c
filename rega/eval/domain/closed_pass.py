"""Closed questions in one prefill: the greedy answer and the options' log-likelihoods from the same KV cache.

Evaluation time goes into prompt prefill (a PubMedQA prompt is ~400 tokens, its answer 6), so scoring a closed
question both ways (``acc`` from the generated answer, ``ll_acc`` from the options) used to pay the prefill
twice. Here each batch of contexts (sorted by length, under a token budget) is run once with the cache kept. All
options of a row then run in one short forward on top of it — concatenated, each option attending to the
context and to its own earlier tokens only (a 4D mask), at the positions it would have right after the context
— and are cropped from the cache again; greedy decoding (:func:`rega.modules.generation.decode`) continues from
the context. So no cache is copied or repeated per option. Both results are what the separate paths compute
(``tests/test_domain_eval.py`` and ``benchmarks/bench_eval.py`` check that answers and option scores agree, the
benchmark measures the speed-up).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from rega.eval.general.loglik import first_logprobs
from rega.eval.progress import Progress
from rega.modules.generation import (
    GREEDY,
    Generation,
    decode,
    length_sorted_batches,
    pad_token_id,
    prefill_rows,
)


def score_options(model, cache, cache_key: str, attention, first_lp, conts, pad_id: int, device):
    """(log-probability sum, tokens) of every option of every row, all of a row's options in one sequence on top
    of the row's prefilled context; the cache is left as it was (the options are cropped off)."""
    if all(
        len(c) <= 1 for row in conts for c in row
    ):  # yes/no/maybe, letters: the prefill's last logits decide
        return [
            [(float(first_lp[r, c[0]]) if c else 0.0, len(c)) for c in row] for r, row in enumerate(conts)
        ]
    rows, ctx_width = attention.shape
    width = max(1, max(sum(len(c) for c in row) for row in conts))
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    positions = torch.zeros((rows, width), dtype=torch.long)
    allowed = torch.zeros((rows, width, ctx_width + width), dtype=torch.bool)
    allowed[:, :, :ctx_width] = attention[:, None, :].bool()
    allowed[:, torch.arange(width), ctx_width + torch.arange(width)] = True  # padding queries see themselves
    ctx_len = attention.sum(-1)
    spans = []
    for r, row in enumerate(conts):
        offset, row_spans = 0, []
        for cont in row:
            n = len(cont)
            ids[r, offset : offset + n] = torch.tensor(cont, dtype=torch.long)
            positions[r, offset : offset + n] = ctx_len[r] + torch.arange(n)
            block = slice(ctx_width + offset, ctx_width + offset + n)
            allowed[r, offset : offset + n, block] = torch.tril(torch.ones((n, n), dtype=torch.bool))
            row_spans.append((offset, cont))
            offset += n
        spans.append(row_spans)
    dtype = getattr(model, "dtype", torch.float32)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
    logits = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        use_cache=True,
        **{cache_key: cache},
    ).logits
    cache.crop(-width)  # transformers 4 and 5 both read a negative value as "remove this many tokens"
    logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
    out = []
    for r, row_spans in enumerate(spans):
        scores = []
        for offset, cont in row_spans:
            rest = [float(logprobs[r, offset + j - 1, cont[j]]) for j in range(1, len(cont))]
            scores.append((float(first_lp[r, cont[0]]) + sum(rest) if cont else 0.0, len(cont)))
        out.append(scores)
    return out


@torch.inference_mode()
def closed_pass(
    model,
    tokenizer,
    contexts: Sequence[Sequence[int]],
    options: Sequence[Sequence[Sequence[int]]] | None,
    max_new_tokens: int | None,
    batch_size: int = 8,
    max_batch_tokens: int | None = None,
    share_prefix: bool = False,
    desc: str = "closed questions",
) -> tuple[list[Generation | None], list[list[tuple[float, int]]] | None]:
    """(greedy answers or None when ``max_new_tokens`` is None, per context the (log-probability sum, tokens) of
    each of its ``options`` or None), both in the order of ``contexts``. ``share_prefix``: each batch prefills its
    contexts' common leading tokens once (:func:`rega.modules.generation.prefill_rows`)."""
    device = next(model.parameters()).device
    pad_id = pad_token_id(tokenizer)
    greedy = replace(GREEDY, max_new_tokens=max_new_tokens or 0)
    answers: list[Generation | None] = [None] * len(contexts)
    scores: list[list[tuple[float, int]]] | None = [[] for _ in contexts] if options is not None else None
    was_training = model.training
    model.eval()
    progress = Progress(len(contexts), desc, unit="question")
    try:
        for batch in length_sorted_batches([len(c) for c in contexts], batch_size, max_batch_tokens):
            start = prefill_rows(model, [contexts[i] for i in batch], pad_id, share_prefix)
            if options is not None:
                conts = [[list(o) for o in options[i]] for i in batch]
                scored = score_options(
                    model,
                    start.cache,
                    start.cache_key,
                    start.attention,
                    first_logprobs(start),
                    conts,
                    pad_id,
                    device,
                )
                for i, row in zip(batch, scored):
                    scores[i] = row
            if max_new_tokens:
                for gen in decode(model, tokenizer, start, greedy):
                    gen.index = batch[gen.index]
                    answers[gen.index] = gen
            progress.update(len(batch))
    finally:
        progress.close()
        model.train(was_training)
    return answers, scores
