"""Resuming a fit: the checkpoint is read once up front, and a resume never trains something other than what was
asked for.

LightningCLI loads a checkpoint's ``hyper_parameters`` over the parsed ``model`` settings, silently. Instead, every
model, LoRA and data setting the checkpoint records is compared with the parsed configuration; a difference
stops the run, one line per field, unless ``--resume_settings checkpoint`` takes the checkpoint's settings.
A file that is not a readable Lightning checkpoint ends in one line naming it and what is wrong.
"""

from __future__ import annotations

import json
import logging
import pickle
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from rega.config import ModelConfig
from rega.data.corpus import CorpusConfig
from rega.errors import ConfigError
from rega.modules.model import LoraSettings

log = logging.getLogger(__name__)

# The checkpoint key of the data settings a fit trained with, beside Lightning's hyper_parameters.
SETTINGS_KEY = "rega_data_settings"
# The data settings that decide what is trained and in which order (validation sets and workers do not).
RECORDED_DATA = ("corpus", "corpus_dir", "distill", "max_length", "batch_size", "batching", "seed")
# How a step runs, not what it computes: the value asked for here always wins, without a word.
HOW_NOT_WHAT = frozenset({"model.compile_layers", "model.micro_batch_size"})
CHOICES = ("check", "checkpoint")
LIGHTNING_NAMES = ("last", "best", "hpc")  # ckpt_path values Lightning resolves itself


class RecordDataSettings(Callback):
    """Writes the fit's data settings into each checkpoint, so that a resume can compare them."""

    def __init__(self, settings: dict):
        # Plain JSON values only: checkpoints load with torch.load(weights_only=True).
        self.settings = json.loads(json.dumps(settings, default=str))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[SETTINGS_KEY] = self.settings


def data_settings(data: dict) -> dict:
    """The recorded subset of a parsed ``data`` section (plain values)."""
    settings = {key: data[key] for key in RECORDED_DATA if key in data}
    if settings.get("corpus") is None and settings.get("corpus_dir") is None:
        settings["corpus"] = asdict(CorpusConfig())  # what the data module trains on when none is given
    return settings


def _not_readable(path: Path, problem: str) -> ConfigError:
    return ConfigError(f"--ckpt_path {path}: {problem}")


def _load(path: Path) -> Any:
    # Never torch's own message (nor chained under ours): it advises weights_only=False, which must not be tried on
    # a file of unknown origin.
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not head:
        raise _not_readable(path, "the file is empty (a save that never finished?)")
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        raise _not_readable(path, "truncated or damaged (its zip index is missing): copy it again or resume "
                                   "from an earlier checkpoint")  # fmt: skip
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        what = "holds objects" if head.startswith(b"PK") else "is not a PyTorch file, or holds objects"
        raise _not_readable(
            path, f"{what} that a Lightning checkpoint does not (made by another program?)"
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as err:
        kind = (
            "a zip archive but not a PyTorch checkpoint" if zipfile.is_zipfile(path) else "not a checkpoint"
        )
        raise _not_readable(path, f"{kind}, or damaged ({type(err).__name__} while reading it)") from None


def read_checkpoint(path: str | Path) -> dict:
    """The Lightning checkpoint at ``path`` (loaded with ``weights_only``), or a ConfigError in one line."""
    path = Path(path)
    loaded = _load(path)
    if not isinstance(loaded, dict) or "state_dict" not in loaded or "global_step" not in loaded:
        held = f"a {type(loaded).__name__}" if not isinstance(loaded, dict) else f"keys {sorted(loaded)[:5]}"
        raise _not_readable(path, f"a PyTorch file made by another program (it holds {held}), not a Lightning "
                                  "checkpoint of a fit")  # fmt: skip
    return loaded


def plain(value: Any) -> Any:
    """Dicts and lists all the way down (tuples become lists), so that YAML and checkpoint values compare equal."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def recorded_settings(checkpoint: dict) -> dict[str, Any]:
    """{'model': hyper_parameters, 'data': data settings} as far as the checkpoint records them."""
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
    return {"model": hparams, "data": checkpoint.get(SETTINGS_KEY) or {}}


def differences(asked: Any, recorded: Any, name: str = "") -> list[str]:
    """One line per setting ``recorded`` holds with another value than ``asked`` (both as recorded_settings)."""
    if name in HOW_NOT_WHAT:
        return []
    if isinstance(asked, dict) and isinstance(recorded, dict):
        # The sections record chosen keys (model has adapter_dir, never recorded); inside a setting, a key on one
        # side only is a difference (loss_terms).
        section = name in ("", "model", "data")
        keys = (
            [k for k in recorded if k in asked]
            if section
            else [*asked, *(k for k in recorded if k not in asked)]
        )
        lines = []
        for key in keys:
            where = f"{name}.{key}" if name else key
            if key not in recorded or key not in asked:
                if asked.get(key, recorded.get(key)) is None:
                    continue  # a setting added since (corpus.prompts.write), unset: what the checkpoint trained
                side = "here" if key in asked else "in the checkpoint"
                lines.append(
                    f"{where} is {_show(asked.get(key, recorded.get(key)))} {side} and absent in the other"
                )
            else:
                lines += differences(asked[key], recorded[key], where)
        return lines
    if isinstance(asked, list) and isinstance(recorded, list) and len(asked) == len(recorded):
        return [
            line
            for k, (a, b) in enumerate(zip(asked, recorded))
            for line in differences(a, b, f"{name}[{k}]")
        ]
    if _same(asked, recorded):
        return []
    return [f"{name} is {_show(asked)} here and {_show(recorded)} in the checkpoint"]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


def asked_settings(config) -> dict[str, Any]:
    """The parsed ``model`` section and recorded ``data`` settings of a subcommand's config, as plain values."""
    model = config.model.as_dict()
    # None stands for the defaults, which the module records filled in.
    defaults = {"model": ModelConfig(), "lora": LoraSettings()}
    model.update({key: asdict(value) for key, value in defaults.items() if model.get(key) is None})
    return plain({"model": model, "data": data_settings(config.data.as_dict())})


def checkpoint_file(value: str) -> Path | None:
    """The file ``--ckpt_path`` names; None for the names Lightning resolves itself (last, best, registry...)."""
    if value in LIGHTNING_NAMES or value.startswith("registry"):
        return None
    path = Path(value)
    if path.is_dir():
        raise ConfigError(f"--ckpt_path {path}: a folder, not a checkpoint file (e.g. {path}/last.ckpt)")
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt_path {path}: no such file")
    return path


def settings_to_take(value: str, asked: dict[str, Any], take: str) -> dict[str, Any] | None:
    """Check a resume: None when the checkpoint records the settings asked for (or none); its settings, to parse
    over the config, when they differ and ``take`` is ``checkpoint``; a ConfigError listing them otherwise."""
    path = checkpoint_file(value)
    if path is None:
        return None
    recorded = plain(recorded_settings(read_checkpoint(path)))
    lines = differences(asked, recorded)
    if not lines:
        return None
    if take != "checkpoint":
        raise ConfigError(
            *(f"--ckpt_path {path}: {line}" for line in lines),
            "resume with the settings the checkpoint was trained with (change them here, or add "
            "`--resume_settings checkpoint` to take the checkpoint's), or start a new run without --ckpt_path",
        )
    log.warning("resuming with the checkpoint's settings: %s", "; ".join(lines))
    taken = {"model": {k: v for k, v in recorded["model"].items() if f"model.{k}" not in HOW_NOT_WHAT}}
    return {**taken, "data": recorded["data"]} if recorded["data"] else taken
