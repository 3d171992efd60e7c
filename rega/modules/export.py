"""Merge a trained LoRA adapter into its base model: a plain Hugging Face checkpoint for serving."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from rega.modules.model import ModelConfig, load_model, load_tokenizer


def merge_adapter(model: ModelConfig, adapter: str, output: str) -> Path:
    from peft import PeftModel

    target = Path(output)
    if (target / "config.json").exists():
        raise FileExistsError(f"{target} already holds a model; choose another output folder")
    base = load_model(model)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(model).save_pretrained(tmp)
        if target.exists():
            target.rmdir()  # an empty folder may be replaced; a non-empty one raises
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def merge_command(model: ModelConfig, adapter: str, output: str) -> None:
    """Merge a LoRA adapter into its base model and save the result (safetensors and tokenizer).

    Args:
        model: the base model the adapter was trained on.
        adapter: folder of a peft adapter (``<log_dir>/adapter`` of a fit run).
        output: folder for the merged model (must not hold a model already).
    """
    print(f"merged model written to {merge_adapter(model, adapter, output)}")
