"""The merged output of a distillation: ``distilled.jsonl`` (the kept answers as records of domain ``general``,
input order, ``meta.distill`` saying which model, prompt and sampling produced each) and ``summary.json``."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from pathlib import Path

from rega.config import MERGED, DistillConfig
from rega.data.records import GENERAL, Record
from rega.distill.context import SUMMARY, Context
from rega.distill.quality import LABELS, classify, keeps
from rega.distill.shards import read_all_shards
from rega.io import write_json, write_jsonl


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
