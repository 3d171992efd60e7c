"""Merge a trained LoRA adapter into its base model: a plain Hugging Face checkpoint for serving.

The merged model is written into a temporary folder beside the output and renamed into place in one step, so an
interrupted merge leaves no half-written model; the next merge removes what it left behind.
"""

from __future__ import annotations

from pathlib import Path

from rega.config import ModelConfig
from rega.errors import ConfigError
from rega.io import TEMP_NAME, atomic_dir
from rega.model_source import load_tokenizer
from rega.modules.model import load_model

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def check_adapter(adapter: str | Path) -> Path:
    """``adapter`` if it is a folder holding a peft adapter; else a one-line error (peft would try the hub)."""
    path = Path(adapter).expanduser()
    if not path.exists():
        raise ConfigError(f"adapter folder {path} does not exist")
    if not path.is_dir() or not (path / "adapter_config.json").is_file():
        raise ConfigError(f"{path} is not a peft adapter folder (no adapter_config.json)")
    if not any((path / name).is_file() for name in ADAPTER_WEIGHTS):
        raise ConfigError(f"adapter folder {path} has no weights ({' or '.join(ADAPTER_WEIGHTS)})")
    return path


def load_adapter(model, adapter: str | Path, base_name: str = "the base model"):
    """``model`` wrapped with the adapter in ``adapter``; an adapter of another base model is a one-line error."""
    from peft import PeftModel

    path = check_adapter(adapter)
    try:
        return PeftModel.from_pretrained(model, str(path))
    except (RuntimeError, ValueError, KeyError) as err:  # shape mismatches, unknown target modules
        detail = " ".join(str(err).split())[:300]
        raise ConfigError(f"adapter {path} does not fit {base_name}: {detail}") from None


def check_merge_output(output: str | Path) -> Path:
    """The output must be new or an empty folder: a merge never overwrites a model or anything else."""
    target = Path(output).expanduser()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"output {target} is a file; choose a folder for the merged model")
    if (target / "config.json").exists():
        raise FileExistsError(f"{target} already holds a model; choose another output folder")
    if target.is_dir() and any(not TEMP_NAME.match(p.name) for p in target.iterdir()):
        raise FileExistsError(f"output folder {target} is not empty; choose a new or empty folder")
    return target


def merge_adapter(model: ModelConfig, adapter: str, output: str) -> Path:
    target = check_merge_output(output)
    check_adapter(adapter)  # before the base model loads
    merged = load_adapter(load_model(model), adapter, model.name_or_path).merge_and_unload()
    with atomic_dir(target) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(model).save_pretrained(tmp)
    return target


def merge_command(model: ModelConfig, adapter: str, output: str) -> None:
    """Merge a LoRA adapter into its base model and save the result (safetensors and tokenizer).

    Args:
        model: the base model the adapter was trained on.
        adapter: folder of a peft adapter (``<log_dir>/adapter`` of a fit run).
        output: folder for the merged model (new, or an empty folder).
    """
    print(f"merged model written to {merge_adapter(model, adapter, output)}")
