"""Self-distillation of D_g: the base model θ answers general instructions under the central prompt,
y_g ~ θ(p_c ⊕ x_g), with the paper's sampling (temperature 0.7, top-p 0.95).

``rega distill --distill configs/distill/embedded_general_en.yaml`` or, from code (the data module's
``prepare_data``), ``run_distillation(cfg)``. Both write ``output_dir/distilled.jsonl`` (records of domain
``general``, input order, ``meta.distill`` saying which model, prompt and sampling produced each answer) and
``summary.json`` (counts per quality label, throughput).

* Fast: prompts are sorted by length and generated in batches with the KV cache (or by vLLM); on several devices
  or nodes (Lightning Fabric) rank r takes the not-yet-done instructions i with i % world_size == r.
* Restartable, exactly once: see :mod:`rega.distill.shards` for the protocol.
* Quality gates: see :mod:`rega.distill.quality` for the labels and the rule that keeps or drops them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path

import torch

from rega.config import MERGED, DistillConfig
from rega.data.chat import ChatFormat
from rega.data.loaders import load_many
from rega.data.records import GENERAL, Record
from rega.distill.backends import HFBackend, VLLMBackend, check_backend
from rega.distill.quality import LABELS, check_policy, classify, keeps
from rega.distill.shards import (
    ShardWriter,
    check_settings,
    next_run_number,
    output_lock,
    partial_path,
    read_all_shards,
    seal_leftovers,
    write_settings,
)
from rega.errors import ConfigError
from rega.io import stable_hash, write_json, write_jsonl
from rega.model_source import load_tokenizer
from rega.modules.generation import length_sorted_batches

log = logging.getLogger(__name__)

SUMMARY = "summary.json"
# Ranks wait at the final barrier for the slowest one; torch's default (30 min) is too short for big pools.
BARRIER_TIMEOUT = timedelta(hours=12)
_DDP_START = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork"}


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


def _make_backend(cfg: DistillConfig, ctx: Context, device: torch.device):
    if cfg.backend == "vllm":
        tp = cfg.devices if isinstance(cfg.devices, int) else 1
        return VLLMBackend(cfg.model, ctx.tokenizer, cfg.sampling, tensor_parallel_size=tp)
    return HFBackend(cfg.model, ctx.tokenizer, cfg.sampling, device)


def generate_share(
    cfg: DistillConfig,
    ctx: Context,
    mine: list[Record],
    shard: Path,
    device: torch.device,
    show: bool,
    desc: str,
) -> tuple[int, int, float]:
    """Generate this rank's instructions into its shard. Returns (instructions, generated tokens, seconds)."""
    from tqdm.auto import tqdm

    items, prompts = [], []
    for rec in mine:
        ids = ctx.prompt_ids(rec)
        if len(ids) <= cfg.max_prompt_tokens:  # longer ones are counted at merge, never cut
            items.append(rec)
            prompts.append(ids)
    if not items:
        return 0, 0, 0.0
    backend = _make_backend(cfg, ctx, device)
    writer = ShardWriter(shard)
    bar = tqdm(total=len(items), unit="instr", desc=desc, disable=not show, dynamic_ncols=True)
    tokens, start = 0, time.perf_counter()
    try:
        for batch in length_sorted_batches([len(p) for p in prompts], cfg.batch_size, cfg.max_batch_tokens):
            ids = [items[i].id for i in batch]
            gens = backend.generate([prompts[i] for i in batch], ids)
            writer.append(
                [
                    {
                        "id": rid,
                        "user_sha": ctx.user_sha[rid],
                        "text": gen.text,
                        "finish_reason": gen.finish_reason,
                        "tokens": len(gen.token_ids),
                        "backend": cfg.backend,
                    }
                    for rid, gen in zip(ids, gens)
                ]
            )
            tokens += sum(len(g.token_ids) for g in gens)
            bar.update(len(batch))
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):.1f} tok/s", refresh=False)
        seconds = time.perf_counter() - start
        writer.finish()
    except BaseException:
        writer.close()  # stays *.partial: the next run seals it
        raise
    finally:
        bar.close()
    return len(items), tokens, seconds


def _distilled_record(rec: Record, row: dict, label: str, cfg: DistillConfig, ctx: Context) -> Record:
    meta = {
        "distill": {
            "settings_id": ctx.settings_id,
            "model": ctx.settings["model"]["name_or_path"],
            "central_prompt": ctx.central,
            "sampling": ctx.settings["sampling"],
            "backend": row.get("backend", cfg.backend),
            "finish_reason": row["finish_reason"],
            "generated_tokens": row["tokens"],
            "quality": label,
        }
    }
    if rec.meta:
        meta["source_meta"] = dict(rec.meta)
    return Record(
        id=rec.id,
        instruction=rec.instruction,
        input=rec.input,
        output=row["text"],
        domain=GENERAL,
        task=rec.task,
        lang=rec.lang,
        category=rec.category,
        meta=meta,
        history=rec.history,  # the answer was given after these turns: D_g trains on them too
        system=rec.system,
    )


def merge(cfg: DistillConfig, ctx: Context, run_stats: dict) -> dict:
    """Write ``distilled.jsonl`` (kept answers, input order) and ``summary.json`` from every shard on disk."""
    out = Path(cfg.output_dir)
    rows: dict[str, dict] = {}
    duplicates = 0
    for _, row in read_all_shards(out):
        if row["id"] in rows:  # cannot happen under the protocol; kept first, counted, never written twice
            duplicates += 1
            continue
        rows[row["id"]] = row
    counts = Counter({label: 0 for label in (*LABELS, "prompt_too_long")})
    kept, tokens = [], 0
    for rec in ctx.records:
        row = rows.get(rec.id)
        if row is None:
            if len(ctx.prompt_ids(rec)) > cfg.max_prompt_tokens:
                counts["prompt_too_long"] += 1
                continue
            raise RuntimeError(
                f"instruction {rec.id!r} has no distilled answer in {out / 'shards'} after the run"
            )
        label = classify(row["text"], row["finish_reason"], cfg.quality)
        counts[label] += 1
        tokens += row["tokens"]
        if keeps(label, cfg.quality):
            kept.append(_distilled_record(rec, row, label, cfg, ctx).to_dict())
    path = out / MERGED
    # summary.json vouches for distilled.jsonl (is_complete): gone while the merged file changes, written last.
    (out / SUMMARY).unlink(missing_ok=True)
    write_jsonl(path, kept)
    answered = len(ctx.records) - counts["prompt_too_long"]
    summary = {
        "output": str(path),
        "instructions": len(ctx.records),
        "kept": len(kept),
        "dropped": answered - len(kept),
        "counts": dict(counts),
        "duplicate_shard_lines": duplicates,
        "generated_tokens": tokens,
        "quality_policy": asdict(cfg.quality),
        "quality_rule": (
            "first label that applies: empty (always dropped); degenerate: more than max_repeat_ratio of the "
            "ngram-grams in the last `window` units repeat an earlier one (answers of >= min_units units); "
            "truncated: finish_reason == length; else ok"
        ),
        "max_prompt_tokens": cfg.max_prompt_tokens,
        "settings_id": ctx.settings_id,
        "settings": ctx.settings,
        "input_id": ctx.input_id,
        "last_run": run_stats,
    }
    write_json(out / SUMMARY, summary)
    return summary


def _worker(fabric, cfg: DistillConfig, progress: bool, ctx: Context | None = None) -> Path:
    """One rank's whole run: (rank 0) lock, settings, seal; generate own share; (rank 0) merge."""
    rank, world = fabric.global_rank, fabric.world_size
    out = Path(cfg.output_dir)
    ctx = ctx or build_context(cfg)
    with contextlib.ExitStack() as held:
        error, run = None, 0
        if rank == 0:
            try:
                held.enter_context(output_lock(out))
                if check_settings(out, ctx.settings):
                    write_settings(out, ctx.settings)
                for note in seal_leftovers(out):
                    log.info(note)
                run = next_run_number(out)
            except Exception as err:  # told to every rank, or they would wait for rank 0 forever
                error = f"{type(err).__name__}: {err}"
                fabric.broadcast((error, run), src=0)
                raise
        error, run = fabric.broadcast((error, run), src=0)
        if error:
            raise ConfigError(f"rank 0 failed: {error}")

        # Every rank reads the same sealed shards, so all agree on what is left and who does what.
        done = done_ids(cfg, ctx)
        todo = [r for r in ctx.records if r.id not in done]
        mine = todo[rank::world]
        if rank == 0:
            log.info(
                "distill: %d instructions, %d done before, %d to generate on %d rank(s)",
                len(ctx.records),
                len(ctx.records) - len(todo),
                len(todo),
                world,
            )
        desc = "distill" if world == 1 else f"distill rank 0/{world}"
        stats = generate_share(
            cfg, ctx, mine, partial_path(out, run, rank, world), fabric.device, progress and rank == 0, desc
        )
        gathered = fabric.all_gather(torch.tensor(stats, dtype=torch.float64, device=fabric.device))
        per_rank = gathered.reshape(-1, 3).tolist()
        fabric.barrier()  # every shard of this run is final before rank 0 reads them
        if rank == 0:
            items, tokens = sum(r[0] for r in per_rank), sum(r[1] for r in per_rank)
            seconds = max(r[2] for r in per_rank)
            run_stats = {
                "run": run,
                "world_size": world,
                "backend": cfg.backend,
                "generated": int(items),
                "generated_tokens": int(tokens),
                "seconds": round(seconds, 3),
                "instructions_per_s": round(items / seconds, 3) if seconds else None,
                "tokens_per_s": round(tokens / seconds, 3) if seconds else None,
            }
            merge(cfg, ctx, run_stats)
        fabric.barrier()  # the merged file exists before any rank returns its path
    return out / MERGED


def _make_fabric(cfg: DistillConfig, in_process: bool):
    from lightning.fabric import Fabric

    if in_process:
        return Fabric(accelerator=cfg.accelerator, devices=1, strategy="auto")
    strategy = cfg.strategy
    if strategy in _DDP_START:
        from lightning.fabric.strategies import DDPStrategy

        strategy = DDPStrategy(start_method=_DDP_START[strategy], timeout=BARRIER_TIMEOUT)
    return Fabric(
        accelerator=cfg.accelerator, devices=cfg.devices, strategy=strategy, num_nodes=cfg.num_nodes
    )


def _run(cfg: DistillConfig, progress: bool, in_process: bool) -> tuple[Path, bool]:
    check_config(cfg)
    ctx = build_context(cfg)
    out = Path(cfg.output_dir)
    check_settings(out, ctx.settings)  # read-only here: refuse before any process or model is started
    if is_complete(cfg, ctx):
        log.info("distill: %s is complete for these settings; nothing to do", out / MERGED)
        return out / MERGED, True
    # Inside a running distributed job (a Trainer's prepare_data) start no processes of our own.
    in_process = in_process or (torch.distributed.is_available() and torch.distributed.is_initialized())
    if cfg.backend == "vllm":
        in_process = True  # vLLM spreads over this node's GPUs itself
    fabric = _make_fabric(cfg, in_process)
    if fabric.world_size == 1:
        return _worker(fabric, cfg, progress, ctx), True
    path = fabric.launch(_worker, cfg, progress)
    return Path(path), fabric.global_rank == 0


def run_distillation(cfg: DistillConfig, *, progress: bool = True, in_process: bool = False) -> Path:
    """Distill D_g as configured and return the merged JSONL; returns at once when it is already complete.

    With several devices, ``strategy: ddp`` re-runs the current command line once per extra rank (Lightning's
    script launcher), so call it with more than one device only from ``rega distill`` or with ``ddp_spawn``.
    ``in_process=True`` (for callers such as a data module's ``prepare_data``) ignores devices/strategy/num_nodes
    and generates in this process on one device.
    """
    return _run(cfg, progress, in_process)[0]


def ensure_distilled(cfg: DistillConfig, processes: int) -> Path:
    """D_g for a training run: generated here when the run is one process, else it must exist already.

    A multi-process fit never distils: one rank would generate for hours while the others wait at a barrier (and
    time out); ``rega distill`` spreads the work over every GPU instead.
    """
    if processes == 1:
        return run_distillation(cfg, in_process=True)
    check_config(cfg)
    if not is_complete(cfg, build_context(cfg)):
        raise ConfigError(
            f"D_g ({Path(cfg.output_dir) / MERGED}) is missing or incomplete, and a fit on {processes} processes "
            "does not generate it: first run `python cli.py distill --distill FILE` with the distill file your "
            "experiment names under data.distill (scripts/distill_multi_gpu.sh uses every GPU)"
        )
    return Path(cfg.output_dir) / MERGED


def summary_text(summary: dict) -> str:
    c = summary["counts"]
    run = summary["last_run"]
    lines = [
        f"instructions {summary['instructions']}  kept {summary['kept']}  dropped {summary['dropped']}",
        "  ".join(f"{label} {c.get(label, 0)}" for label in (*LABELS, "prompt_too_long")),
    ]
    if run["generated"]:
        lines.append(
            f"this run: {run['generated']} answers, {run['generated_tokens']} tokens in {run['seconds']} s on "
            f"{run['world_size']} rank(s) ({run['instructions_per_s']} instr/s, {run['tokens_per_s']} tok/s)"
        )
    else:
        lines.append("this run: nothing left to generate (merged the existing shards)")
    return "\n".join(lines)


def distill_command(distill: DistillConfig, progress: bool = True):
    """Self-distill general instructions with the base model (D_g) and write output_dir/distilled.jsonl.

    Args:
        distill: what to distill, with which model and sampling, where to, on which devices.
        progress: show a progress bar (instructions/s, tokens/s, ETA) on rank 0.
    """
    path, is_rank_zero = _run(distill, progress, in_process=False)
    if is_rank_zero:
        summary = json.loads((path.parent / SUMMARY).read_text(encoding="utf-8"))
        print(summary_text(summary))
        print(f"wrote {path} and {path.parent / SUMMARY}")
