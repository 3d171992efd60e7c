"""Attention for padding-free packed training rows, one contract per architecture.

A packed row holds several examples whose ``position_ids`` restart at 0; right padding continues the last
example's positions (``collate_rows``). Each example must see only its own earlier tokens. How that is made
true depends on the architecture's ``packing`` (:mod:`rega.modules.architectures`):

* ``rope`` (LLaMA: Vicuna, SmolLM2; Mistral; Qwen2): attention goes through transformers' attention interface
  and the position ids carry the restart (rotary embeddings). Under ``sdpa`` the model is switched to
  :func:`packed_attention`: given a training row's :class:`PackedLayout` it attends within each packed sequence
  only, on CUDA in bf16/fp16 with one ``varlen_attn`` call per layer (flash-attention varlen kernels; cumulative
  sequence lengths built once per forward), elsewhere (CPU, fp32, attention dropout) with exact causal SDPA per
  sequence; and no B x L x L mask is built. Without a layout (evaluation, generation with a KV cache) it is
  transformers' SDPA with its mask. Under ``eager``: transformers' own block-diagonal mask (exact, O(L^2)).
* ``alibi`` (BLOOM: BELLE-7B-2M): ALiBi ignores position ids and transformers builds its bias from a running
  count over the row and attends eagerly (a [B, H, L, L] score tensor per layer). The decoder runs here instead,
  each block's attention as exact SDPA per packed sequence with that sequence's ALiBi bias counted from its own
  first token (:func:`packed_bloom_attention`); ALiBi is shift-invariant per query row, so each example gets the
  scores it gets alone. Memory and time grow with each example's length squared, not the row's.
* anything else: rows with one example each (``--data.batching grouped``) go through transformers with their
  padding mask; a packed batch is refused with a :class:`~rega.errors.ConfigError`.

The layout travels with the call: :func:`decoder_hidden_states` runs the decoder layers itself and hands each
one the layout as a keyword argument, which transformers passes on to the attention function. Gradient
checkpointing binds a layer's keyword arguments into the call it replays (``GradientCheckpointingLayer``), so
the recomputation inside the backward sees the same layout, also on CUDA, where the backward runs on autograd's
own thread (state kept in a context variable or thread-local around the forward would be missing there).

``flash_attention_*`` is refused for training: transformers isolates packed examples under flash attention
only at batch size 1, and ``sdpa`` already runs flash kernels on CUDA (above). tests/test_architectures.py
checks each architecture's packed losses and LoRA gradients against each example alone.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from rega.errors import ConfigError
from rega.modules.architectures import ARCHITECTURES, architecture_of

log = logging.getLogger(__name__)

PACKED = "rega_packed_sdpa"  # the attention implementation name registered with transformers
LAYOUT = "packed_layout"  # the keyword argument that carries a training row's layout to packed_attention


@dataclass
class PackedLayout:
    """Where each packed sequence starts, computed once per forward from ``position_ids`` [B, L]."""

    starts: torch.Tensor  # [B, L] bool on the batch's device: True at the first token of each packed sequence
    _cache: dict = field(default_factory=dict)

    @classmethod
    def of(cls, position_ids: torch.Tensor) -> PackedLayout:
        starts = position_ids == 0
        starts[:, 0] = True
        return cls(starts)

    @classmethod
    def of_batch(cls, batch: dict[str, torch.Tensor]) -> PackedLayout:
        """A training batch's layout: the sequence lengths and offsets come from its host plan when it has one
        (:mod:`rega.modules.batch_plan`), so that nothing is read back from the device."""
        layout = cls.of(batch["position_ids"])
        if "sequence_lengths" in batch:
            layout._cache.update(lengths=batch["sequence_lengths"], cu=batch["cu_seqlens"])
        return layout

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.starts.shape)

    def cu_seqlens(self) -> torch.Tensor:
        """Cumulative sequence lengths over the flattened rows (int32, on device); unplanned, one host sync."""
        if "cu" not in self._cache:
            flat = self.starts.flatten().nonzero().flatten()
            end = torch.tensor([self.starts.numel()], device=flat.device)
            self._cache["cu"] = torch.cat([flat, end]).to(torch.int32)
        return self._cache["cu"]

    def lengths(self) -> list[list[int]]:
        """Per row, its packed sequences' lengths (host ints); unplanned, one host sync on a GPU."""
        if "lengths" not in self._cache:
            rows: list[list[int]] = [[] for _ in range(self.shape[0])]
            for row, col in self.starts.nonzero().tolist():
                rows[row].append(col)
            self._cache["lengths"] = [
                [e - s for s, e in zip(cols, cols[1:] + [self.shape[1]])] for cols in rows
            ]
        return self._cache["lengths"]

    def same_sequence(self) -> torch.Tensor:
        """[B, L, L] bool: query i and key j are in the same packed sequence and j <= i."""
        seq = self.starts.cumsum(1)
        length = self.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).tril()
        return (seq[:, :, None] == seq[:, None, :]) & causal


# --- kernels ------------------------------------------------------------------------------------------------
@functools.cache
def varlen_function():
    """torch's varlen_attn and its parameters' names (the signature changed between releases), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def varlen_kwargs(params: frozenset, window: int | None) -> dict | None:
    """Keyword arguments making ``varlen_attn`` causal (within ``window`` keys if given), or None."""
    # torch 2.11+: (-1, 0) is causal; (W-1, 0) keeps W keys (the query's, W-1 before), as transformers does.
    if "window_size" in params:
        return {"window_size": (-1 if window is None else window - 1, 0)}
    if "is_causal" in params and window is None:  # torch 2.10
        return {"is_causal": True}
    return None


def varlen_arguments(query: torch.Tensor, window: int | None, dropout: float) -> dict | None:
    """``varlen_attn``'s keyword arguments if it can run this attention (CUDA, bf16/fp16, no dropout), else
    None (the per-sequence path runs instead)."""
    found = varlen_function()
    if found is None or dropout or not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16):
        return None
    if query.shape[-1] > 256:  # flash-attention's largest head size
        return None
    return varlen_kwargs(found[1], window)


def varlen_packed(query, key, value, layout: PackedLayout, scaling, kwargs: dict) -> torch.Tensor:
    """All rows' sequences in one varlen call: [B, H, L, D] in, [B, L, H, D] out."""
    varlen_attn, params = varlen_function()
    batch, heads, length, dim = query.shape
    q, k, v = (t.transpose(1, 2).reshape(batch * length, t.shape[1], dim) for t in (query, key, value))
    if k.shape[1] != heads:
        if "enable_gqa" in params:
            kwargs = {**kwargs, "enable_gqa": True}
        else:
            k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
    if scaling is not None:
        if "scale" in params:
            kwargs = {**kwargs, "scale": scaling}
        else:
            q = q * (scaling * math.sqrt(dim))
    cu = layout.cu_seqlens()
    # The row length bounds every sequence: no host sync for the true maximum.
    out = varlen_attn(q, k, v, cu, cu, length, length, **kwargs)
    return out.view(batch, length, heads, dim)


def _causal(q, k, v, scaling, window: int | None, dropout: float, bias=None) -> torch.Tensor:
    if bias is not None:  # ALiBi: a float bias that holds the causal mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scaling)
    length = q.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if window is None or length <= window:
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa
        )
    i = torch.arange(length, device=q.device)
    keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=keep, dropout_p=dropout, scale=scaling, enable_gqa=gqa
    )


def per_sequence_packed(
    query, key, value, layout: PackedLayout, scaling, window, dropout, slopes=None
) -> torch.Tensor:
    """Exact causal SDPA per packed sequence: [B, H, L, D] in, [B, L, H, D] out; with ALiBi ``slopes`` [H].

    Rows are unbound and sequences split (not sliced): their backward stacks and concatenates the pieces'
    gradients instead of adding a full-size zero tensor per slice."""
    rows = []
    for q_row, k_row, v_row, lengths in zip(
        query.unbind(0), key.unbind(0), value.unbind(0), layout.lengths()
    ):
        pieces = zip(q_row.split(lengths, 1), k_row.split(lengths, 1), v_row.split(lengths, 1))
        outs = [
            _causal(q[None], k[None], v[None], scaling, window, dropout,
                    None if slopes is None else alibi_bias(layout, slopes, q.shape[1], q.dtype))[0]
            for q, k, v in pieces
        ]  # fmt: skip
        rows.append(torch.cat(outs, dim=1) if len(outs) > 1 else outs[0])
    return torch.stack(rows).transpose(1, 2).contiguous()


def alibi_bias(layout: PackedLayout, slopes: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """[H, n, n]: one packed sequence's ALiBi (slope x key position, which softmax sees as slope x relative
    distance) with -inf above the diagonal; made once per length and forward, every layer shares it."""
    key = ("alibi", length, dtype)
    if key not in layout._cache:
        position = torch.arange(length, device=slopes.device)
        bias = slopes.float()[:, None, None] * position[None, None, :]
        causal = position[None, :] <= position[:, None]
        layout._cache[key] = bias.masked_fill(~causal, float("-inf")).to(dtype)
    return layout._cache[key]


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Same contract as ``transformers.integrations.sdpa_attention.sdpa_attention_forward``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layout = kwargs.pop(LAYOUT, None)
    if layout is None:  # not a training row: transformers' SDPA with the mask it built
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if layout.shape != (query.shape[0], query.shape[2]) or key.shape[2] != query.shape[2]:
        raise RuntimeError(
            f"packed rows: layout {layout.shape} does not fit attention over {tuple(query.shape)}"
        )
    if query.is_cuda and torch.is_autocast_enabled("cuda"):
        # As autocast does for SDPA: rotary embeddings of fp32 weights leave q and k in fp32 under bf16-mixed.
        low = torch.get_autocast_dtype("cuda")
        query, key, value = (t.to(low) for t in (query, key, value))
    window = kwargs.get("sliding_window")
    varlen = varlen_arguments(query, window, dropout)
    if varlen is not None:
        return varlen_packed(query, key, value, layout, scaling, varlen), None
    return per_sequence_packed(query, key, value, layout, scaling, window, dropout), None


# --- the two functions REGAModule calls ---------------------------------------------------------------------
def architecture(model) -> str | None:
    """The packing contract of a transformers model: ``rope``, ``alibi`` or None (packed rows refused)."""
    record = architecture_of(model)
    return record.packing if record else None


def prepare_packed_attention(model, config) -> None:
    """Make ``model`` (a transformers model, before LoRA) isolate the examples of a packed row in training."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    model.config.use_cache = False  # with a cache, transformers' packed-sequence detection is off
    requested = config.attn_implementation
    if "flash" in requested:
        raise ConfigError(
            f"attn_implementation={requested} would mix the examples of packed training rows (transformers "
            "isolates them only at batch size 1); use sdpa, which runs torch's varlen flash attention on CUDA"
        )
    kind = architecture(model)
    if kind is None:
        log.warning("model type %r: packed rows are not verified; train with --data.batching grouped",
                    model.config.model_type)  # fmt: skip
    if kind == "alibi":
        use_packed_bloom_attention(model)
    if kind == "rope" and model.config._attn_implementation == "sdpa":
        from transformers.masking_utils import sdpa_mask

        AttentionInterface.register(PACKED, packed_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED, sdpa_mask)  # masks as SDPA's where no layout is given
        model.set_attn_implementation(PACKED)


def decoder_hidden_states(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The last hidden states [B, L, H] of a training batch (packed or padded rows), without the LM head.

    Rows are right-padded (``collate_rows``): a row's padding belongs to its last sequence, so the packed
    paths need only the position ids; ``attention_mask`` (one example per row) serves transformers' paths."""
    kind = architecture(model)
    if kind == "alibi":
        return bloom_hidden_states(model.get_decoder(), batch)
    if kind is None and "attention_mask" not in batch:
        raise ConfigError(
            f"model type {model.config.model_type!r} has no verified packed-row attention (supported: "
            f"{', '.join(ARCHITECTURES)}); train it with --data.batching grouped"
        )
    decoder = model.get_decoder()
    if model.config._attn_implementation != PACKED:
        return decoder(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
            position_ids=batch["position_ids"], use_cache=False,
        ).last_hidden_state  # fmt: skip
    return rope_hidden_states(decoder, batch)


def rope_hidden_states(decoder, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The LLaMA/Mistral/Qwen2 decoder's forward over packed rows, each layer given the rows' layout.

    As transformers' own forward, without the mask it would build (the layout replaces it, and scanning the
    position ids for packed sequences would cost a host sync)."""
    position_ids = batch["position_ids"]
    layout = PackedLayout.of_batch(batch)
    hidden = decoder.embed_tokens(batch["input_ids"])
    rotary = decoder.rotary_emb(hidden, position_ids=position_ids)
    for layer in decoder.layers[: decoder.config.num_hidden_layers]:
        hidden = layer(
            hidden, attention_mask=None, position_embeddings=rotary, position_ids=position_ids,
            use_cache=False, **{LAYOUT: layout},
        )  # fmt: skip
    return decoder.norm(hidden)


def bloom_hidden_states(transformer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """BloomModel's forward over packed rows: each block's attention is given the rows' layout (as its
    ``attention_mask``) and the ALiBi slopes (as its ``alibi``), and runs :func:`packed_bloom_attention`."""
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    layout = PackedLayout.of_batch(batch)
    hidden = transformer.word_embeddings_layernorm(transformer.word_embeddings(batch["input_ids"]))
    slopes = _get_alibi_slopes(transformer.num_heads, hidden.device)  # made on the device: no copy
    for block in transformer.h:
        hidden = block(hidden, alibi=slopes, attention_mask=layout, layer_past=None, use_cache=False)[0]
    return transformer.ln_f(hidden)


def use_packed_bloom_attention(model) -> None:
    """Route every BloomAttention through :func:`packed_bloom_attention` (its own forward where no layout is
    given: evaluation, generation)."""
    from transformers.models.bloom.modeling_bloom import BloomAttention

    if model.config.pretraining_tp > 1 and model.config.slow_but_exact:
        raise ConfigError("BLOOM with slow_but_exact and pretraining_tp > 1 cannot train on packed rows")
    for module in model.modules():
        if isinstance(module, BloomAttention) and not isinstance(module.forward, functools.partial):
            module.forward = functools.partial(packed_bloom_attention, module, module.forward)


def packed_bloom_attention(
    attention, eager_forward, hidden_states, residual, alibi, attention_mask, **kwargs
):
    """BloomAttention's forward on packed rows: SDPA per packed sequence with that sequence's ALiBi bias, instead
    of eager [B, H, L, L] scores over the whole row (memory and time quadratic in the row, not the example).
    ALiBi ignores position ids, so each sequence's bias counts from its own first token."""
    if not isinstance(attention_mask, PackedLayout):
        return eager_forward(hidden_states, residual, alibi=alibi, attention_mask=attention_mask, **kwargs)
    from transformers.models.bloom.modeling_bloom import dropout_add

    query, key, value = attention._reshape(attention.query_key_value(hidden_states))
    dropout = attention.attention_dropout.p if attention.training else 0.0
    context = per_sequence_packed(
        query, key, value, attention_mask, attention.inv_norm_factor, None, dropout, slopes=alibi
    )
    output = attention.dense(context.flatten(2))
    return dropout_add(output, residual, attention.hidden_dropout, attention.training), None
