"""Log-likelihood of continuations given contexts, batched: the scorer behind general multiple choice, drift and
closed-question options (:mod:`rega.eval.general.retention`, :mod:`rega.eval.domain.closed_pass`).

Contexts are left-padded (positions restart after the padding) so every row's continuation ends at the same
column and only the continuation's logits are materialised; options that share a context run on its KV cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rega.data.chat import ChatFormat
from rega.modules.generation import Prefilled, left_padded, length_sorted_batches, pad_token_id, prefill_rows


def continuation_text(chat: ChatFormat, system: str, user: str, answer: str) -> str:
    """The answer as the template writes it after the prompt, cut after the answer (no end-of-turn token)."""
    full = chat.response_text(system, user, answer)
    cut = full.find(answer)
    return full[: cut + len(answer)] if cut >= 0 else answer


def _full_logprobs(
    model, pad_id: int, seqs: list[tuple[list[int], int]], batch_size: int, device, progress=None
):
    """Each sequence's last ``n`` tokens scored in one forward pass; only their logits are materialised."""
    out: list[tuple[float, int]] = [(0.0, 0)] * len(seqs)
    for batch in length_sorted_batches([len(s) for s, _ in seqs], batch_size):
        input_ids, attention, positions = left_padded([seqs[i][0] for i in batch], pad_id)
        keep = max(1, max(seqs[i][1] for i in batch))
        logits = model(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            position_ids=positions.to(device),
            logits_to_keep=keep + 1,
            use_cache=False,
        ).logits[:, -(keep + 1) : -1]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        token_lp = logprobs.gather(-1, input_ids[:, -keep:].to(device).unsqueeze(-1)).squeeze(-1).cpu()
        for row, i in enumerate(batch):
            n = seqs[i][1]
            out[i] = (float(token_lp[row, keep - n :].sum()) if n else 0.0, n)
        if progress is not None:
            progress.update(len(batch))
    return out


def first_logprobs(start: Prefilled) -> torch.Tensor:
    """Log-probabilities of each prefilled row's next token [B, V], on the CPU."""
    return torch.log_softmax(start.last_logits.float(), dim=-1).cpu()


def score_on_cache(model, cache, cache_key: str, attention, first_lp, conts, pad_id: int, device):
    """(sum of log-probabilities, tokens) of every continuation of every row, on top of the rows' prefilled
    cache (consumed: repeated in place for the continuations). ``conts[row]`` lists that row's continuations."""
    k_max = max(1, max(len(c) for c in conts))
    cache.batch_repeat_interleave(k_max)
    flat = [conts[r][k] if k < len(conts[r]) else [pad_id] for r in range(len(conts)) for k in range(k_max)]
    length = max(1, max(len(c) for c in flat))
    cont_ids = torch.full((len(flat), length), pad_id, dtype=torch.long)
    cont_mask = torch.zeros((len(flat), length), dtype=torch.long)
    for row, cont in enumerate(flat):
        cont_ids[row, : len(cont)] = torch.tensor(cont, dtype=torch.long)
        cont_mask[row, : len(cont)] = 1
    ctx_len = attention.sum(-1).repeat_interleave(k_max)
    logits = model(
        input_ids=cont_ids.to(device),
        attention_mask=torch.cat([attention.repeat_interleave(k_max, 0), cont_mask], dim=-1).to(device),
        position_ids=(ctx_len[:, None] + torch.arange(length)[None]).to(device),
        use_cache=True,
        **{cache_key: cache},
    ).logits
    rest_lp = torch.log_softmax(logits.float(), dim=-1)
    rest_lp = rest_lp[:, :-1].gather(-1, cont_ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1).cpu()
    out: list[list[tuple[float, int]]] = []
    for r, row_conts in enumerate(conts):
        scores = []
        for k, cont in enumerate(row_conts):
            row = r * k_max + k
            total = float(first_lp[r, cont[0]]) + float(rest_lp[row, : len(cont) - 1].sum()) if cont else 0.0
            scores.append((total, len(cont)))
        out.append(scores)
    return out


def _shared_prefix_logprobs(
    model,
    pad_id: int,
    groups: list[tuple[list[int], list[list[int]]]],
    batch_size,
    device,
    progress=None,
    common_prefix: bool = False,
):
    """Per group (context, continuations): the context runs once, its KV cache is repeated for every
    continuation, and the continuations (right-padded) run on top of it. ``common_prefix``: the leading tokens
    of a batch's contexts run once too (:func:`rega.modules.generation.prefill_rows`)."""
    out: list[list[tuple[float, int]]] = [[] for _ in groups]
    widest = max(len(conts) for _, conts in groups)
    for batch in length_sorted_batches([len(ctx) for ctx, _ in groups], max(1, batch_size // widest)):
        start = prefill_rows(model, [groups[g][0] for g in batch], pad_id, common_prefix)
        conts = [groups[g][1] for g in batch]
        scored = score_on_cache(
            model, start.cache, start.cache_key, start.attention, first_logprobs(start), conts, pad_id, device
        )
        for g, scores in zip(batch, scored):
            out[g] = scores
        if progress is not None:
            progress.update(sum(len(c) for c in conts))
    return out


def _share_contexts(pairs, max_length: int | None, share_prefix: bool) -> tuple[list, list[int]]:
    """([(context, indices of its pairs)] for contexts shared by several pairs, indices of the other pairs)."""
    grouped: dict[tuple[int, ...], list[int]] = {}
    singles: list[int] = []
    for i, (ctx, cont) in enumerate(pairs):
        fits = max_length is None or len(ctx) + len(cont) <= max_length
        if share_prefix and fits and ctx and cont:
            grouped.setdefault(tuple(ctx), []).append(i)
        else:
            singles.append(i)
    for members in [m for m in grouped.values() if len(m) == 1]:
        singles.extend(members)
    return [(list(ctx), members) for ctx, members in grouped.items() if len(members) > 1], singles


def _cut(pair, max_length: int | None) -> tuple[list[int], int]:
    """(context + continuation, continuation length), context tokens dropped from the left beyond ``max_length``."""
    ctx, cont = pair
    ids, n = [*ctx, *cont], len(cont)
    if max_length is not None and len(ids) > max_length:
        ids, n = ids[-max_length:], min(n, max_length - 1)
    return ids, n


@torch.inference_mode()
def continuation_logprobs(
    model,
    tokenizer,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 8,
    max_length: int | None = None,
    share_prefix: bool = True,
    desc: str | None = None,
    common_prefix: bool = False,
) -> list[tuple[float, int]]:
    """(sum of log-probabilities, number of tokens) of each continuation given its context, batched.

    Pairs with the same context (the options of one question) share one pass over the context when
    ``share_prefix``: its KV cache is repeated for every option, so a question with k options costs about one
    forward pass instead of k. Other pairs run whole, left-padded so only the continuation's logits are
    materialised. A pair longer than ``max_length`` loses context tokens from the left. With ``desc``, progress
    is reported under that name (:class:`rega.eval.progress.Progress`). ``common_prefix``: the leading tokens that
    a batch of shared contexts has in common (system prompt, chat template) run once as well.
    """
    from rega.eval.progress import Progress

    device = next(model.parameters()).device
    pad_id = pad_token_id(tokenizer)
    out: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
    groups, singles = _share_contexts(pairs, max_length, share_prefix)
    was_training = model.training
    model.eval()
    progress = Progress(len(pairs), desc or "log-likelihood", unit="seq", enabled=None if desc else False)
    try:
        if groups:
            scored = _shared_prefix_logprobs(
                model,
                pad_id,
                [(ctx, [list(pairs[i][1]) for i in members]) for ctx, members in groups],
                batch_size,
                device,
                progress,
                common_prefix,
            )
            for (_, members), values in zip(groups, scored):
                for i, value in zip(members, values):
                    out[i] = value
        seqs = [_cut(pairs[i], max_length) for i in singles]
        if seqs:
            for i, value in zip(singles, _full_logprobs(model, pad_id, seqs, batch_size, device, progress)):
                out[i] = value
    finally:
        progress.close()
        model.train(was_training)
    return out
