"""The counts a plan needs, read from the model built on the ``meta`` device (shapes, no storage) with the fit's
LoRA applied by the fit's own :func:`rega.modules.model.add_lora`: a 13B model takes seconds and no memory."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from rega.modules.architectures import architecture_of
from rega.modules.model import LoraSettings, add_lora, decoder_layer_classes, lora_target_modules


@dataclass(frozen=True)
class Shape:
    """What memory and FLOPs are computed from (counts of elements, not bytes).

    Args:
        model_type: transformers' ``config.model_type``.
        family: the packing contract of :mod:`rega.modules.architectures` (``rope``: LLaMA-like blocks with SDPA,
            ``alibi``: BLOOM blocks with eager attention), None for a family without a record.
        layers: decoder layers; hidden, q_dim, kv_dim, heads, intermediate, vocab: their widths.
        base_params: every base parameter (tied embeddings once).
        layer_params: the decoder layers' parameters (FSDP2 units); root_params: the rest (embeddings, final
            norm, head: FSDP2's root unit).
        linear_params: weights of the decoder layers' linear layers: what 4-bit quantizes, and the matmuls.
        head_params: the LM head's weight (its matmul per position).
        lora_params: trainable LoRA parameters; lora_layer_params: those inside the decoder layers.
        lora_targets: the adapted module names; lora_rank: r.
        lora_inputs_each: one layer's adapter input widths, one per adapter (peft's own forward).
        lora_inputs_fused: the same, one per distinct input (:mod:`rega.modules.fast_lora` shares one dropout
            mask between the adapters that read the same input).
    """

    model_type: str
    family: str | None
    layers: int
    hidden: int
    q_dim: int
    kv_dim: int
    heads: int
    intermediate: int
    vocab: int
    base_params: int
    layer_params: int
    root_params: int
    linear_params: int
    head_params: int
    lora_params: int
    lora_layer_params: int
    lora_targets: tuple[str, ...]
    lora_rank: int
    lora_inputs_each: tuple[int, ...]
    lora_inputs_fused: tuple[int, ...]


def count_shape(config, lora: LoraSettings) -> Shape:
    """The :class:`Shape` of the transformers ``config`` with ``lora`` applied (cached per config and LoRA)."""
    targets = tuple(lora.target_modules) if lora.target_modules else None
    return _count_shape(config.to_json_string(use_diff=False), type(config), lora.r, targets)


@functools.lru_cache(maxsize=16)
def _count_shape(config_json: str, config_class: type, r: int, targets: tuple[str, ...] | None) -> Shape:
    import json

    from transformers import AutoModelForCausalLM

    config = config_class.from_dict(json.loads(config_json))
    with torch.device("meta"):  # eager: parameters do not depend on attention, and BLOOM refuses sdpa
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.bfloat16)
    layers = [m for m in model.modules() if isinstance(m, decoder_layer_classes(model))]
    base = sum(p.numel() for p in model.parameters())
    in_layers = sum(p.numel() for layer in layers for p in layer.parameters())
    linear = sum(
        m.weight.numel() for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear)
    )
    head = model.get_output_embeddings().weight
    settings = LoraSettings(r=r, target_modules=list(targets) if targets else None)
    target_names = lora_target_modules(model, settings)
    peft_model = add_lora(model, settings)
    lora_in_layers = sum(p.numel() for layer in layers for p in layer.parameters() if p.requires_grad)
    each, fused = lora_inputs(model, layers[0])
    return Shape(
        **widths(config, len(layers)), model_type=config.model_type, family=family_of(model),
        vocab=head.shape[0], base_params=base, layer_params=in_layers, root_params=base - in_layers,
        linear_params=linear, head_params=head.numel(),
        lora_params=sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
        lora_layer_params=lora_in_layers,
        lora_targets=(target_names,) if isinstance(target_names, str) else tuple(target_names),
        lora_rank=r, lora_inputs_each=each, lora_inputs_fused=fused,
    )  # fmt: skip


def family_of(model) -> str | None:
    record = architecture_of(model)
    return record.packing if record else None


def widths(config, layers: int) -> dict[str, int]:
    """Layer count and widths from a transformers config (LLaMA-style names; BLOOM maps its own to them)."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    intermediate = (
        getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    )
    return {
        "layers": layers, "hidden": hidden, "q_dim": heads * head_dim, "kv_dim": kv_heads * head_dim,
        "heads": heads, "intermediate": intermediate,
    }  # fmt: skip


def lora_inputs(model, layer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input width per adapter, input width per distinct input) of one decoder layer's adapters; the grouping
    is the architecture's ``shared_inputs``, as :func:`rega.modules.fast_lora.speed_up_lora` groups them."""
    from peft.tuners.lora import LoraLayer

    adapters = {
        name.rpartition(".")[2]: m.in_features
        for name, m in layer.named_modules()
        if isinstance(m, LoraLayer)
    }
    record = architecture_of(model)
    fused, grouped = [], set()
    for group in record.shared_inputs if record else ():
        if all(name in adapters for name in group):
            fused.append(adapters[group[0]])
            grouped.update(group)
    fused += [width for name, width in adapters.items() if name not in grouped]
    return tuple(adapters.values()), tuple(fused)
