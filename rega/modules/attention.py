"""Attention for padding-free packed training rows: causal SDPA per packed sequence.

A packed row of 512 tokens holds several examples. transformers isolates them with a block-diagonal L x L mask
built from restarting ``position_ids``; given a mask, SDPA computes every one of the L x L scores (the CPU kernel
cannot skip masked blocks, and a mask rules out its causal fast path). Running each packed sequence as its own
causal attention computes only the blocks on the diagonal, with grouped-query heads handled by SDPA itself instead
of ``repeat_kv`` copies. The outputs are the same (tests/test_training.py compares them).

The path is taken only inside :func:`packed_rows`, which REGAModule enters around the forward and backward of
its own batches (right-padded rows whose position ids restart at every example, as ``collate_rows`` builds them).
Everything else, e.g. generation with left padding and a KV cache, keeps transformers' SDPA with its mask.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F

PACKED_SDPA = "sdpa_packed"
# Set inside packed_rows(): the sequence bounds of the position ids seen last, shared by all layers of a forward.
_PACKED_ROWS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("rega_packed_rows", default=None)


@contextlib.contextmanager
def packed_rows():
    """Declare that the batches run inside are packed rows: attention per packed sequence is exact for them.

    Also wrap the backward pass: gradient checkpointing recomputes the forward there."""
    token = _PACKED_ROWS.set({})
    try:
        yield
    finally:
        _PACKED_ROWS.reset(token)


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Same contract as ``transformers.integrations.sdpa_attention.sdpa_attention_forward``.

    A sequence starts wherever ``position_ids`` is 0 (the rule transformers uses for the packed mask). Right
    padding continues the last sequence's positions (``collate_rows``), so it sees only real tokens and no real
    token sees it.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    length = query.shape[2]
    cache = _PACKED_ROWS.get()
    if (
        cache is None
        or position_ids is None
        or position_ids.shape != query.shape[::2]  # [B, L]; transformers' own default ids are [1, L]
        or key.shape[2] != length  # a KV cache
        or dropout
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    # The bounds once per forward, not per layer (on GPU each .tolist() waits for the device).
    if cache.get("position_ids") is not position_ids:
        starts = position_ids == 0
        starts[:, 0] = True
        cache["bounds"] = [[i for i, flag in enumerate(row) if flag] + [length] for row in starts.tolist()]
        cache["position_ids"] = position_ids  # held, so its identity is not reused by another tensor
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for b, bounds in enumerate(cache["bounds"]):
        pieces = [
            F.scaled_dot_product_attention(
                query[b : b + 1, :, s:e], key[b : b + 1, :, s:e], value[b : b + 1, :, s:e],
                is_causal=True, scale=scaling, enable_gqa=gqa,
            )
            for s, e in zip(bounds, bounds[1:])
        ]  # fmt: skip
        rows.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def use_packed_sdpa(model) -> None:
    """Switch a transformers model (not a peft wrapper) from ``sdpa`` to :func:`packed_sdpa_attention`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)  # evaluation still gets its mask
    model.set_attn_implementation(PACKED_SDPA)


def prepare_packed_attention(model, config) -> None:
    """Make ``model`` (a transformers model, before LoRA) isolate the examples of a packed row in training."""
    model.config.use_cache = False  # also required for packed sequences to stay isolated under SDPA
    if config.attn_implementation == "sdpa":
        use_packed_sdpa(model)


def decoder_hidden_states(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The last hidden states [B, L, H] of a training batch (packed or padded rows), without the LM head."""
    return model.get_decoder()(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch["position_ids"],
        use_cache=False,
    ).last_hidden_state
