"""Where a planned model's ``config.json`` comes from; the plan never downloads anything.

In order: the embedded model (its GGUF converted once, as every command does), a local folder holding
``config.json``, a copy shipped in ``model_configs/`` for the models the project's configs name (matched by hub id,
or by the last part of a path such as ``/models/BELLE-LLaMA-13B-2M``: BELLE publishes those weights encrypted, so
the folder is often not on the planning machine), the local Hugging Face cache. Anything else is one ConfigError.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from rega.config import EMBEDDED, ModelConfig
from rega.errors import ConfigError
from rega.model_source import resolve_model_path

SHIPPED_DIR = Path(__file__).resolve().parent / "model_configs"


@functools.cache
def shipped_configs() -> dict[str, Path]:
    """Hub id -> shipped config.json (the id is the file's ``_name_or_path``)."""
    found = {}
    for path in sorted(SHIPPED_DIR.glob("*.json")):
        found[json.loads(path.read_text(encoding="utf-8"))["_name_or_path"]] = path
    return found


def shipped_config_path(name: str) -> Path | None:
    """The shipped config of ``name``: its hub id, or a path whose last part is the hub id's (any case)."""
    configs = shipped_configs()
    if name in configs:
        return configs[name]
    tail = Path(name.rstrip("/")).name.lower()
    return next((path for hub_id, path in configs.items() if hub_id.split("/")[-1].lower() == tail), None)


def shipped_config(path: Path):
    from transformers import AutoConfig

    fields = {k: v for k, v in json.loads(path.read_text(encoding="utf-8")).items() if not k.startswith("_")}
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def cached_config(model: ModelConfig):
    """The config from the local Hugging Face cache, or None (never a download)."""
    from transformers import AutoConfig

    if model.name_or_path.startswith(("/", ".", "~")):
        return None
    try:
        return AutoConfig.from_pretrained(
            model.name_or_path, revision=model.revision, local_files_only=True,
            trust_remote_code=model.trust_remote_code,
        )  # fmt: skip
    except (OSError, ValueError):
        return None


def model_config_for(model: ModelConfig):
    """(the transformers config of ``model``, where it was read from)."""
    from transformers import AutoConfig

    name = model.name_or_path
    if name == EMBEDDED or model.gguf_file:
        folder = resolve_model_path(model)  # converts the GGUF once, locally
        return AutoConfig.from_pretrained(folder), f"{folder}/config.json"
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model.model.name_or_path={name}: the folder holds no config.json")
        return AutoConfig.from_pretrained(folder, trust_remote_code=model.trust_remote_code), str(
            folder / "config.json"
        )
    path = shipped_config_path(name)
    if path is not None:
        return shipped_config(path), f"shipped copy rega/plan/model_configs/{path.name}"
    config = cached_config(model)
    if config is not None:
        return config, "Hugging Face cache"
    raise ConfigError(
        f"model.model.name_or_path={name!r}: no config.json to plan from (not a local folder, not in the Hugging "
        f"Face cache, not one of the shipped {', '.join(shipped_configs())}); the plan never downloads: set "
        "name_or_path to a folder holding the model's config.json"
    )
