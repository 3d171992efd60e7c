"""``rega predict``: a base model's or an adapter's answers to a file of records, restartable.

    rega predict --input_file questions.csv --adapter runs/rega/version_0/adapter --rule role --output runs/predict/q

Records come through the project's loaders (JSONL, JSON, CSV, Parquet, ``datasets`` folders, ``hf:``; rows need no
output). Each is rendered with the model's chat template under the prompt of ``rule`` — ``central`` (p_c),
``role`` (the record's domain prompt p_i) or ``role:<domain>`` (that domain's p_i for every record); general
records always get p_c, as in evaluation — and answered in length-sorted batches, greedy unless ``do_sample``.
``output/predictions.jsonl`` holds one row per record, in input order, with the rule and the prompt used, the
answer, and the scores of any ``metrics`` (functions ``(response, record) -> float``, given by import path).

Restartable like self-distillation (the shard protocol of :mod:`rega.distill.shards`): each batch is appended to a
shard and fsynced, so a killed run started again generates only the records still missing. An output folder made
with another model, adapter, chat template, rule, prompt or sampling setting is refused, naming the field.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from rega.config import GREEDY, DataSource, ModelConfig, SamplingConfig
from rega.data.loaders import load_many
from rega.data.prompts import CENTRAL, PromptConfig, RolePrompts, load_prompt_table
from rega.data.records import Record
from rega.distill.backends import derived_seed
from rega.distill.shards import (
    ShardWriter,
    next_run_number,
    output_lock,
    partial_path,
    read_all_shards,
    seal_leftovers,
)
from rega.errors import ConfigError, EmptyDataError
from rega.eval.domain.scoring import check_rule, prompt_key
from rega.io import file_sha256, stable_hash, write_json, write_jsonl
from rega.modules.export import ADAPTER_WEIGHTS, check_adapter
from rega.modules.generation import generate_batch, length_sorted_batches
from rega.use.loading import load_chat_format, load_for_use, role_prompts, use_settings

log = logging.getLogger(__name__)

SETTINGS_FILE = "predict_settings.json"
PREDICTIONS = "predictions.jsonl"
SUMMARY = "summary.json"
Metric = Callable[[str, Record], float]


@dataclass
class Job:
    """What every part of a prediction run derives from its arguments before the model loads."""

    records: list[Record]
    rule: str
    prompts: RolePrompts
    prompt_ids: list[list[int]]  # per record, the rendered and tokenized prompt
    user_sha: dict[str, str]  # id -> hash of its conversation, to catch an id reused for another question
    settings: dict
    # Invalid input rows left out (skip_invalid), as "file:line: field 'x': problem".
    skipped: list[str] = field(default_factory=list)


def changed_fields(old, new, prefix: str = "") -> list[str]:
    """``field: old -> new`` for every leaf that differs between two settings dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for key in sorted(set(old) | set(new))
                for line in changed_fields(old.get(key), new.get(key), f"{prefix}{key}.")]  # fmt: skip
    return [] if old == new else [f"{prefix[:-1]}: {old!r:.80} -> {new!r:.80}"]


def check_settings(output: Path, settings: dict) -> None:
    """Refuse an output folder whose answers came from other settings (mixing them would be silent)."""
    path = output / SETTINGS_FILE
    if path.exists():
        changes = changed_fields(json.loads(path.read_text(encoding="utf-8")), settings)
        if changes:
            raise ConfigError(
                f"{output} holds predictions made with other settings ({'; '.join(changes)}): use another "
                "output folder, or delete this one to start over"
            )
    elif (output / "shards").is_dir() and any((output / "shards").iterdir()):
        raise ConfigError(
            f"{output} holds prediction shards but no {SETTINGS_FILE}: use another output folder"
        )


def adapter_identity(adapter: str | None) -> dict | None:
    """The adapter by path and weight hash: another adapter saved to the same folder is another model."""
    if not adapter:
        return None
    folder = check_adapter(adapter)
    weights = next(folder / name for name in ADAPTER_WEIGHTS if (folder / name).is_file())
    return {"path": str(folder.resolve()), "sha256": file_sha256(weights)}


def user_key(record: Record) -> str:
    return stable_hash([record.history, record.user_text])


def load_inputs(source: list[DataSource], limit: int | None, skip_invalid: bool) -> tuple[list[Record], list]:
    """(records to answer, the invalid rows skipped)."""
    # Questions need no answers; an answer that is present is kept as the reference.
    report = load_many([replace(s, require_output=False) for s in source], skip_invalid=skip_invalid)
    records = report.records if limit is None else report.records[:limit]
    if not records:
        raise EmptyDataError(f"no records to answer in {', '.join(s.path for s in source)}")
    return records, list(report.skipped)


def settings_of(config: ModelConfig, adapter, tokenizer, rule: str, prompts: dict, sampling) -> dict:
    """What made the answers: an output folder holds answers of one such setting only."""
    m = config
    return {
        "format": 1,
        "model": {"name_or_path": m.name_or_path, "gguf_file": m.gguf_file, "revision": m.revision,
                  "dtype": m.dtype, "load_in_4bit": m.load_in_4bit},
        "adapter": adapter_identity(adapter),
        "chat_template": {"named": m.chat_template, "system_placement": m.system_placement,
                          "sha": stable_hash(getattr(tokenizer, "chat_template", None) or "")},
        "rule": rule,
        "prompts": prompts,
        "sampling": asdict(sampling),
    }  # fmt: skip


def prepare(config: ModelConfig, adapter, source, rule, prompts, sampling, limit, skip_invalid) -> Job:
    check_rule(rule)
    records, skipped = load_inputs(source, limit, skip_invalid)
    tokenizer, chat = load_chat_format(config)
    keys = {prompt_key(rule, r) for r in records} - {CENTRAL}
    resolved = role_prompts(prompts, sorted(keys), chat)  # a domain without a role prompt fails here
    # Every role prompt the rule may use, not only this input's domains: more input is not another setting.
    roles = load_prompt_table(prompts or PromptConfig())[1] if rule != CENTRAL else {}
    used = {"central": resolved.central, "roles": roles}
    settings = settings_of(config, adapter, tokenizer, rule, used, sampling)
    # A conversation is answered after its earlier turns, rendered as in training and evaluation.
    ids = [chat.encode_prompt(resolved.text(prompt_key(rule, r)), r.user_text, r.history) for r in records]
    return Job(records, rule, resolved, ids, {r.id: user_key(r) for r in records}, settings, skipped)


def done_ids(output: Path, job: Job) -> set[str]:
    done = set()
    for path, row in read_all_shards(output):
        if row["id"] in job.user_sha and row["user_sha"] != job.user_sha[row["id"]]:
            raise ConfigError(
                f"id {row['id']!r} names another question than the one answered in {path}: ids must identify "
                "records; use another output folder"
            )
        done.add(row["id"])
    return done


def generate_missing(output: Path, job: Job, todo: list[int], device: str, config, adapter, batch_size,
                     max_batch_tokens) -> int:  # fmt: skip
    """Answer the records at ``todo`` into a new shard, one fsynced batch at a time; returns how many."""
    if not todo:
        return 0
    loaded = load_for_use(config, adapter, device)
    sampling = SamplingConfig(**job.settings["sampling"])
    writer = ShardWriter(partial_path(output, next_run_number(output), 0, 1))
    try:
        for batch in length_sorted_batches(
            [len(job.prompt_ids[i]) for i in todo], batch_size, max_batch_tokens
        ):
            records = [job.records[todo[k]] for k in batch]
            if sampling.do_sample:  # seeded by the batch's ids: a restart samples its batches the same way
                torch.manual_seed(derived_seed(sampling.seed, [r.id for r in records]))
            gens = generate_batch(
                loaded.model, loaded.tokenizer, [job.prompt_ids[todo[k]] for k in batch], sampling
            )
            writer.append([{"id": r.id, "user_sha": job.user_sha[r.id], "response": g.text,
                            "finish_reason": g.finish_reason, "generated_tokens": len(g.token_ids)}
                           for r, g in zip(records, gens)])  # fmt: skip
        writer.finish()
    except BaseException:
        writer.close()  # stays *.partial: the next run seals it and keeps its whole lines
        raise
    return len(todo)


def prediction_row(rec: Record, row: dict, job: Job, metrics: list[Metric]) -> dict:
    key = prompt_key(job.rule, rec)
    out = {"id": rec.id, "domain": rec.domain, "task": rec.task, "lang": rec.lang, "rule": job.rule,
           "prompt": key, "system": job.prompts.text(key), "instruction": rec.instruction, "input": rec.input,
           "response": row["response"], "finish_reason": row["finish_reason"],
           "generated_tokens": row["generated_tokens"]}  # fmt: skip
    if rec.history:
        out["history"] = [list(exchange) for exchange in rec.history]
    if rec.output:
        out["reference"] = rec.output
    if rec.answer is not None:
        out["answer"] = rec.answer
    if metrics:
        out["scores"] = {metric.__name__: float(metric(row["response"], rec)) for metric in metrics}
    return out


def merge(output: Path, job: Job, metrics: list[Metric], generated: int) -> dict:
    """Write predictions.jsonl (input order) and summary.json from every shard on disk."""
    answers = {row["id"]: row for _, row in read_all_shards(output)}
    rows = [prediction_row(rec, answers[rec.id], job, metrics) for rec in job.records]
    write_jsonl(output / PREDICTIONS, rows)
    means: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        for name, value in row.get("scores", {}).items():
            means[name][f"{row['domain']}/{row['task']}"].append(value)
    summary = {
        "predictions": str(output / PREDICTIONS),
        "records": len(rows),
        "generated_this_run": generated,
        "skipped_invalid": len(job.skipped),
        "skipped_rows": job.skipped[:20],  # the first few, file:line: field: problem
        "finish_reasons": dict(Counter(row["finish_reason"] for row in rows)),
        "metrics": {name: {task: sum(v) / len(v) for task, v in per.items()} for name, per in means.items()},
        "settings": job.settings,
    }
    write_json(output / SUMMARY, summary)
    return summary


def input_sources(
    input_file: str | None, domain: str | None, source: list[DataSource] | None
) -> list[DataSource]:
    if bool(input_file) == bool(source):
        raise ConfigError("give the records as --input_file FILE or as --source [...], one of the two")
    return list(source or [DataSource(path=input_file, domain=domain)])


def run_locked(
    out: Path, job: Job, device, config, adapter, batch_size, max_batch_tokens, metrics
) -> tuple[int, dict]:
    """Under the output's lock: generate what no shard holds yet, then merge; (records generated, summary)."""
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(output_lock(out))
        except ConfigError:
            raise ConfigError(f"another process is writing predictions to {out}; wait for it") from None
        write_json(out / SETTINGS_FILE, job.settings)
        for note in seal_leftovers(out):
            log.info(note)
        done = done_ids(out, job)
        todo = [i for i, rec in enumerate(job.records) if rec.id not in done]
        before = len(job.records) - len(todo)
        log.info(
            "predict: %d records, %d answered before, %d to generate", len(job.records), before, len(todo)
        )
        generated = generate_missing(out, job, todo, device, config, adapter, batch_size, max_batch_tokens)
        summary = merge(out, job, list(metrics or []), generated)
        # The folder holds only the outputs once done: the lock file goes while still held (a run that opened
        # it just before is refused, as while this one ran).
        (out / ".distill.lock").unlink(missing_ok=True)
        return generated, summary


def print_summary(summary: dict, generated: int) -> None:
    skipped = f"; {summary['skipped_invalid']} invalid rows skipped" if summary.get("skipped_invalid") else ""
    print(
        f"{summary['records']} predictions ({generated} generated now{skipped}) in {summary['predictions']}"
    )
    for name, per_task in summary["metrics"].items():
        print(f"  {name}: " + ", ".join(f"{task} {value:.3f}" for task, value in per_task.items()))


def predict_command(
    output: str,
    input_file: str | None = None,
    domain: str | None = None,
    source: list[DataSource] | None = None,
    model: ModelConfig | None = None,
    adapter: str | None = None,
    rule: str = "central",
    prompts: PromptConfig | None = None,
    decoding: SamplingConfig = GREEDY,
    batch_size: int = 8,
    max_batch_tokens: int | None = None,
    limit: int | None = None,
    skip_invalid: bool = False,
    metrics: list[Callable[..., float]] | None = None,
    device: str = "auto",
    threads: int | None = None,
) -> None:
    """Answer every record of a file with a base model or an adapter; write output/predictions.jsonl.

    Killed and started again with the same arguments, it generates only what is missing; other model, adapter,
    template, rule, prompt or sampling settings with an existing output are refused, naming the field.

    Args:
        output: folder for predictions.jsonl, summary.json, predict_settings.json and the shards.
        input_file: one file of records (JSONL, JSON, CSV, Parquet); rows need instruction (and input), not output.
        domain: domain of every input_file row (rows that name their own need none); ``general`` rows are always
            answered under p_c.
        source: record sources, as in data configs (path, domain, task, fields, limit ...), instead of input_file.
        model: the base model (ModelConfig fields); default the embedded SmolLM2-135M-Instruct.
        adapter: a saved peft adapter folder; none answers with the base model.
        rule: the prompt: central (p_c), role (each record's domain prompt p_i) or role:<domain>.
        prompts: where p_c and the role prompts come from (lang, file, central, roles).
        decoding: max_new_tokens (longest answer), do_sample (greedy by default), temperature, top_p,
            repetition_penalty and the sampling seed (each batch seeded from it and its records' ids).
        batch_size: prompts per generate call (sorted by length).
        max_batch_tokens: cap on batch size x longest prompt; null for none.
        limit: answer only the first N records.
        skip_invalid: skip (and count) invalid rows instead of stopping at the first.
        metrics: functions ``f(response, record) -> float`` by import path (``my_metrics.exact_match``); each
            row gets their scores, summary.json their means per domain/task.
        device: auto (CUDA when available), cpu or cuda[:N].
        threads: CPU threads for torch; null = default.
    """
    config = use_settings(model, threads)
    job = prepare(config, adapter, input_sources(input_file, domain, source), rule, prompts, decoding, limit,
                  skip_invalid)  # fmt: skip
    out = Path(output)
    check_settings(out, job.settings)  # before the lock and the model: a refusal costs nothing
    generated, summary = run_locked(out, job, device, config, adapter, batch_size, max_batch_tokens, metrics)
    print_summary(summary, generated)
