"""Load a chat model, optionally in 4-bit (QLoRA, CUDA only), and wrap it with LoRA adapters.

Where its files are (folder, hub id, GGUF, the embedded default) and its tokenizer: :mod:`rega.model_source`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from rega.config import ModelConfig
from rega.errors import ConfigError
from rega.model_source import resolve_model_path
from rega.modules.architectures import architecture_of

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoraSettings:
    """LoRA adapter settings (paper: r=16, alpha=32).

    Args:
        r: rank of the update matrices.
        alpha: scaling numerator (update scaled by alpha / r).
        dropout: dropout on the adapter input.
        target_modules: module names to adapt; default (None): all attention and MLP projections of the
            model's architecture (LLaMA/Mistral/Qwen2: q,k,v,o,gate,up,down_proj; BLOOM: query_key_value, dense,
            dense_h_to_4h, dense_4h_to_h; others: every linear layer but the LM head).
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | None = None


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


def attention_implementation(path: str, config: ModelConfig) -> str:
    """The attention implementation to load ``path`` with: the configured one, or ``eager`` for a model class
    that has no SDPA attention (BLOOM; transformers refuses ``sdpa`` for it)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import is_flash_attn_2_available

    requested = config.attn_implementation
    if requested == "flash_attention_2" and not is_flash_attn_2_available():
        raise ConfigError(
            "attn_implementation=flash_attention_2 needs a CUDA GPU and the flash-attn package; use sdpa "
            "(on CUDA it runs flash kernels, and packed training rows use torch's varlen flash attention)"
        )
    if requested != "sdpa":
        return requested
    model_config = AutoConfig.from_pretrained(
        path, revision=config.revision, trust_remote_code=config.trust_remote_code
    )
    model_class = AutoModelForCausalLM._model_mapping.get(type(model_config), None)
    if model_class is not None and not getattr(model_class, "_supports_sdpa", True):
        log.info("%s has no SDPA attention in transformers: loading it with eager", model_class.__name__)
        return "eager"
    return requested


def load_model(config: ModelConfig, device_map: str | dict | None = None):
    """The base causal LM (frozen weights are later wrapped by :func:`add_lora`)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(config)
    kwargs: dict = {
        "dtype": torch_dtype(config.dtype),
        "attn_implementation": attention_implementation(path, config),
        "trust_remote_code": config.trust_remote_code,
        "revision": config.revision,
        "use_safetensors": True,
    }
    if config.load_in_4bit:
        if not torch.cuda.is_available():
            raise ConfigError("load_in_4bit (QLoRA) needs a CUDA GPU and bitsandbytes; none was found")
        from transformers import BitsAndBytesConfig

        compute = torch_dtype(config.dtype if config.dtype != "float32" else "bfloat16")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            # Equal to the compute dtype so FSDP can flatten quantized and plain weights together.
            bnb_4bit_quant_storage=compute,
        )
        kwargs["dtype"] = compute
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        if "safetensors" in str(err).lower():
            raise ConfigError(
                f"{path}: no safetensors weights found; convert the checkpoint to safetensors"
            ) from err
        raise


def empty_model(config: ModelConfig):
    """:func:`load_model`'s module tree (same dtype and attention implementation) on the meta device, built from
    the model's config alone: no weight is read (the ranks that receive their shards from rank 0 build this)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(config)
    model_config = AutoConfig.from_pretrained(
        path, revision=config.revision, trust_remote_code=config.trust_remote_code
    )
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(
            model_config,
            dtype=torch_dtype(config.dtype),
            attn_implementation=attention_implementation(path, config),
            trust_remote_code=config.trust_remote_code,
        )


# Every load path checkpoints non-reentrantly. peft's 4-bit preparation, given no kwargs, leaves torch to pick
# reentrant checkpointing, which replays a layer without its keyword arguments' autograd history and needs inputs
# that require grad.
CHECKPOINTING = {"use_reentrant": False}


def add_lora(model, lora: LoraSettings, gradient_checkpointing: bool = False):
    """Freeze the base model and add LoRA adapters; returns the peft model."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        # Freezes the base and casts its non-quantized weights to fp32; checkpointing is set below, as for the rest.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if gradient_checkpointing:
        # Also makes the embeddings' output require grad (cheap), which only reentrant checkpointing would need.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=CHECKPOINTING)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_target_modules(model, lora),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def lora_target_modules(model, lora: LoraSettings) -> list[str] | str:
    """The configured LoRA targets, else the architecture's (every attention and MLP projection, the paper's
    setting), else peft's ``all-linear`` (every linear layer but the LM head)."""
    if lora.target_modules:
        return list(lora.target_modules)
    record = architecture_of(model)
    return list(record.lora_targets) if record else "all-linear"


def decoder_layer_classes(model) -> tuple[type, ...]:
    """The decoder-layer classes of any transformers model (also inside a peft wrapper), e.g. for FSDP units.

    Read from the model itself: the classes named by ``_no_split_modules`` (transformers' own list of blocks
    that must stay whole) among its modules; failing that, its gradient-checkpointing layers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    names = {
        name for module in model.modules() for name in (getattr(module, "_no_split_modules", None) or ())
    }
    classes = {type(module) for module in model.modules() if type(module).__name__ in names}
    if not classes:
        classes = {type(m) for m in model.modules() if isinstance(m, GradientCheckpointingLayer)}
    if not classes:
        raise ValueError(f"no decoder-layer classes found in {type(model).__name__}")
    return tuple(sorted(classes, key=lambda cls: cls.__name__))
