"""What the project knows about each model family, one record per transformers ``model_type``.

Adding a family (Gemma, Phi, ...) is one :class:`Architecture` in :data:`ARCHITECTURES` and a run of
``pytest tests/test_architectures.py``, which builds a tiny random model from the record's ``tiny`` settings and
checks packed training against each example alone (every attention implementation the record lists, gradient
checkpointing off, non-reentrant and reentrant), the LoRA targets and the fused LoRA inputs. A model type without
a record still trains: one example per row (``--data.batching grouped``), LoRA on every linear layer
(peft's ``all-linear``), no fused LoRA inputs. Decoder layers (FSDP units, compiled blocks) are found from any
model itself (:func:`rega.modules.model.decoder_layer_classes`) and need no entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA_SHARED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
ROPE_TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 256}  # fmt: skip


@dataclass(frozen=True)
class Architecture:
    """One model family.

    Args:
        model_type: transformers' ``config.model_type``.
        packing: how the examples of a packed row are kept apart (:mod:`rega.modules.attention`): ``rope``
            (position ids restart per example; packed SDPA or transformers' block-diagonal mask) or ``alibi``
            (the bias is built here from the restarting position ids).
        lora_targets: the LoRA targets when the user sets none: every attention and MLP projection (the paper).
        shared_inputs: groups of projections of one module that read the same input, whose LoRA A products
            :mod:`rega.modules.fast_lora` computes in one matmul.
        attention: the attention implementations it runs (and the tests check); transformers has no SDPA for
            some families.
        config_class: the transformers config class, and ``tiny`` its settings for the tests' tiny random model.
    """

    model_type: str
    packing: str
    lora_targets: tuple[str, ...]
    shared_inputs: tuple[tuple[str, ...], ...] = ()
    attention: tuple[str, ...] = ("sdpa", "eager")
    config_class: str = ""
    tiny: dict[str, Any] = field(default_factory=dict)


RECORDS = (
    # LLaMA: Vicuna, SmolLM2.
    Architecture(model_type="llama", packing="rope", lora_targets=LLAMA_PROJECTIONS, shared_inputs=LLAMA_SHARED,
                 config_class="LlamaConfig", tiny=ROPE_TINY),
    # The tiny window is shorter than some test examples, so that the sliding window is exercised.
    Architecture(model_type="mistral", packing="rope", lora_targets=LLAMA_PROJECTIONS, shared_inputs=LLAMA_SHARED,
                 config_class="MistralConfig", tiny={**ROPE_TINY, "sliding_window": 24}),
    Architecture(model_type="qwen2", packing="rope", lora_targets=LLAMA_PROJECTIONS, shared_inputs=LLAMA_SHARED,
                 config_class="Qwen2Config", tiny=ROPE_TINY),
    # BLOOM: BELLE-7B-2M. transformers has no SDPA attention for it (it loads eager whatever is asked); packed
    # training rows run SDPA per example with its ALiBi bias instead (rega.modules.attention).
    Architecture(model_type="bloom", packing="alibi",
                 lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
                 attention=("eager",), config_class="BloomConfig",
                 tiny={"hidden_size": 64, "n_layer": 2, "n_head": 4}),
)  # fmt: skip
ARCHITECTURES: dict[str, Architecture] = {record.model_type: record for record in RECORDS}


def architecture_of(model) -> Architecture | None:
    """The record of a transformers model (or a peft model around one), None for a family without one."""
    config = getattr(model, "config", None)
    return ARCHITECTURES.get(getattr(config, "model_type", None))
