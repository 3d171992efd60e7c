"""What every rank of a distillation derives from its config before generating: the instructions, the tokenizer
and chat format, p_c, and the fingerprints that tell a restart whether earlier shards still belong to this run."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rega.config import MERGED, DistillConfig
from rega.data.chat import ChatFormat
from rega.data.loaders import load_many
from rega.data.records import GENERAL, Record
from rega.distill.backends import check_backend
from rega.distill.quality import check_policy
from rega.distill.shards import read_all_shards
from rega.errors import ConfigError
from rega.io import stable_hash
from rega.model_source import load_tokenizer

log = logging.getLogger(__name__)

SUMMARY = "summary.json"  # beside distilled.jsonl: counts, throughput, and the fingerprints it was made with


def check_config(cfg: DistillConfig) -> None:
    """Everything that can be checked before any data or model is loaded."""
    if not cfg.source:
        raise ConfigError("distill.source is empty: give at least one general instruction pool")
    check_backend(cfg.backend)
    check_policy(cfg.quality)
    s = cfg.sampling
    if cfg.batch_size < 1 or s.max_new_tokens < 1 or cfg.max_prompt_tokens < 1:
        raise ConfigError("batch_size, sampling.max_new_tokens and max_prompt_tokens must be at least 1")
    if cfg.limit is not None and cfg.limit < 0:
        raise ConfigError(f"limit must be >= 0, got {cfg.limit}")
    if s.do_sample and (s.temperature <= 0 or not 0 < s.top_p <= 1):
        raise ConfigError(
            f"sampling needs temperature > 0 and 0 < top_p <= 1, got {s.temperature}, {s.top_p}"
        )
    if cfg.backend == "vllm" and cfg.num_nodes != 1:
        raise ConfigError("backend 'vllm' runs on one node; use backend: hf for several nodes")


@dataclass
class Context:
    """What every rank derives from the config before generating."""

    records: list[Record]
    tokenizer: object
    chat: ChatFormat
    central: str
    settings: dict  # the fingerprint stored in distill_settings.json
    settings_id: str
    user_sha: dict[str, str]  # id -> hash of the instruction text, to catch ids reused for other instructions
    input_id: str  # hash of the whole input (ids and texts, in order)

    def prompt_ids(self, record: Record) -> list[int]:
        """The last user turn under p_c, after the conversation's earlier turns (its own system message is
        dropped: D_g is the model's answer under p_c)."""
        return self.chat.encode_prompt(self.central, record.user_text, record.history)


def load_instructions(cfg: DistillConfig) -> list[Record]:
    # An instruction pool needs no answers (they are what we generate), and is general unless it says otherwise.
    sources = [replace(s, require_output=False, domain=s.domain or GENERAL) for s in cfg.source]
    records = load_many(sources, skip_invalid=cfg.skip_invalid).records
    return records if cfg.limit is None else records[: cfg.limit]


def build_context(cfg: DistillConfig) -> Context:
    records = load_instructions(cfg)
    tokenizer = load_tokenizer(cfg.model)
    chat = ChatFormat(tokenizer, cfg.model.chat_template, cfg.model.system_placement)
    central = cfg.central_prompt if cfg.central_prompt is not None else (chat.default_system or "")
    if not central:
        log.warning("no central prompt: the chat template has no default system message and none was given")
    m = cfg.model
    settings = {
        "format": 1,
        "model": {
            "name_or_path": m.name_or_path,
            "gguf_file": m.gguf_file,
            "revision": m.revision,
            "dtype": m.dtype,
            "load_in_4bit": m.load_in_4bit,
        },
        "chat_template": {
            "named": m.chat_template,
            "system_placement": m.system_placement,
            "sha": stable_hash(getattr(tokenizer, "chat_template", None) or ""),
        },
        "central_prompt": central,
        "sampling": asdict(cfg.sampling),
    }
    # A conversation's answer depends on its earlier turns too; single-turn hashes stay as they were.
    user_sha = {
        r.id: stable_hash([[list(p) for p in r.history], r.user_text] if r.history else r.user_text)
        for r in records
    }
    return Context(
        records=records,
        tokenizer=tokenizer,
        chat=chat,
        central=central,
        settings=settings,
        settings_id=stable_hash(settings),
        user_sha=user_sha,
        input_id=stable_hash([[r.id, user_sha[r.id]] for r in records]),
    )


def is_complete(cfg: DistillConfig, ctx: Context) -> bool:
    """The merged output exists and was made from this input with these settings and this quality policy."""
    out = Path(cfg.output_dir)
    summary_path = out / SUMMARY
    if not (out / MERGED).exists() or not summary_path.exists():
        return False
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    return (
        summary.get("settings_id") == ctx.settings_id
        and summary.get("input_id") == ctx.input_id
        and summary.get("quality_policy") == asdict(cfg.quality)
        and summary.get("max_prompt_tokens") == cfg.max_prompt_tokens
    )


def done_ids(cfg: DistillConfig, ctx: Context) -> set[str]:
    done = set()
    for path, row in read_all_shards(Path(cfg.output_dir)):
        rid = row["id"]
        if rid in ctx.user_sha and row["user_sha"] != ctx.user_sha[rid]:
            raise ConfigError(
                f"id {rid!r} names another instruction than the one distilled in {path}; "
                "ids must identify instructions: use a new output_dir"
            )
        done.add(rid)
    return done
