"""What a plan reads of a fit's resolved configuration (:func:`rega.lightning_cli.resolve_fit_config`) and of a
tokenized corpus record, as plain values."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

from rega.config import ModelConfig
from rega.errors import ConfigError
from rega.modules.model import LoraSettings
from rega.plan.memory import Precision

WEIGHT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
AUTOCAST = ("bf16-mixed", "16-mixed", "bf16", "16")  # Lightning's 16-bit autocast precisions (old names too)
DEFAULT_GPUS_PER_NODE = 8  # for trainer.devices: auto / -1


@dataclass(frozen=True)
class FitSettings:
    """The fit's settings a plan depends on (``micro_batch``: model.micro_batch_size, or data.batch_size when it
    is unset, at most data.batch_size: REGAModule forwards that many rows at a time)."""

    model: ModelConfig
    lora: LoraSettings
    fast_lora: bool
    micro_batch: int
    batch_size: int
    max_length: int
    batching: str
    precision: str
    nodes: int
    gpus_per_node: int | None
    max_epochs: int | None
    max_steps: int | None
    strategy: str


def only_fields(cls, values: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in (values or {}).items() if k in names}


def fit_settings(fit: dict) -> FitSettings:
    model, data, trainer = fit.get("model") or {}, fit.get("data") or {}, fit.get("trainer") or {}
    batch_size = int(data.get("batch_size") or 8)
    return FitSettings(
        model=ModelConfig(**only_fields(ModelConfig, model.get("model"))),
        lora=LoraSettings(**only_fields(LoraSettings, model.get("lora"))),
        fast_lora=bool(model.get("fast_lora", True)),
        micro_batch=min(int(model.get("micro_batch_size") or batch_size), batch_size),  # a batch is the most
        batch_size=batch_size,
        max_length=int(data.get("max_length") or 512),
        batching=str(data.get("batching") or "packed"),
        precision=str(trainer.get("precision") or "32-true"),
        nodes=int(trainer.get("num_nodes") or 1),
        gpus_per_node=devices_count(trainer.get("devices")),
        max_epochs=positive(trainer.get("max_epochs")),
        max_steps=positive(trainer.get("max_steps")),
        strategy=strategy_name(trainer.get("strategy")),
    )  # fmt: skip


def strategy_name(strategy) -> str:
    """trainer.strategy as the layout it runs (``ddp``, ``fsdp2``, ``hsdp``), else as its short name."""
    if not isinstance(strategy, dict):
        return str(strategy or "auto")
    name = str(strategy.get("class_path", "?")).rpartition(".")[2]
    shard_size = (strategy.get("init_args") or {}).get("shard_size", "all")
    if name == "DDPStrategy":
        return "ddp"
    if name == "FSDP2Strategy" and shard_size in ("all", "node"):
        return "fsdp2" if shard_size == "all" else "hsdp"
    return name


def positive(value) -> int | None:
    return int(value) if value is not None and int(value) > 0 else None


def devices_count(devices) -> int | None:
    """trainer.devices as a count: an int, a digit string or a list of ids; None for ``auto`` / -1."""
    if isinstance(devices, list):
        return len(devices)
    if isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()):
        return int(devices) if int(devices) > 0 else None
    return None


def precision_of(fit: FitSettings) -> Precision:
    """The byte widths of a fit (see :class:`rega.plan.memory.Precision`)."""
    dtype = fit.model.dtype
    if dtype not in WEIGHT_BYTES:
        raise ConfigError(f"model.model.dtype={dtype!r}: use one of {', '.join(WEIGHT_BYTES)}")
    four_bit = bool(fit.model.load_in_4bit)
    compute = 2 if four_bit else WEIGHT_BYTES[dtype]  # 4-bit computes in bf16 when dtype is float32
    autocast = fit.precision in AUTOCAST
    fused = fit.fast_lora and not four_bit  # fast_lora leaves 4-bit layers to peft's own forward
    mask = 0 if not fit.lora.dropout else (4 if fused else 1)
    return Precision(
        weight=WEIGHT_BYTES[dtype], activation=2 if autocast else compute, lora_input=2 if autocast else 4,
        mask=mask, four_bit=four_bit, fused_lora=fused,
    )  # fmt: skip


@dataclass(frozen=True)
class Corpus:
    """Training tokens of one epoch (and examples, supervised tokens where known) and where they came from."""

    tokens: int
    source: str
    examples: int | None = None
    supervised: int | None = None

    def rows(self, max_length: int, batching: str) -> int:
        """Training rows of an epoch: packed rows taken as full, else one example per row."""
        if batching != "packed" and self.examples:
            return self.examples
        return math.ceil(self.tokens / max_length)


def read_tokenized(path: str) -> Corpus:
    """The ``tokenized`` record of a fit's ``summary.json`` or of a prepared-data record
    (``$REGA_CACHE/prepared/*.json``, under ``manifest``)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"--tokenized {path}: not a readable JSON file ({err})") from None
    record = data.get("tokenized") or (data.get("manifest") or {}).get("tokenized") or data
    if not isinstance(record, dict) or not isinstance(record.get("tokens"), int):
        raise ConfigError(
            f"--tokenized {path}: no tokenized record (tokens, supervised_tokens) in it; give a fit's "
            "summary.json or a prepared record from $REGA_CACHE/prepared/"
        )
    return Corpus(record["tokens"], path, record.get("examples"), record.get("supervised_tokens"))
