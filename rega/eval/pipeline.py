"""One evaluation of one model, as a plain function the training callback and the ``evaluate`` command both call.

:func:`evaluate_model` runs its steps in order — plan (what to measure), domain evaluation under each prompt rule
(:mod:`rega.eval.domain.scoring`), judge-free general scores: general multiple choice and drift
(:mod:`rega.eval.general.retention`), aggregate, write — and returns one JSON-serialisable dict::

    {"rules": {"central": {"overall", "task_mean", "domains": {domain: {"score", "tasks": {task: {...}}}}}, ...},
     "general_mc": {name: {"acc", "acc_norm", "n", "metric", "score", "backend", ["base", "delta"]}},
     "drift": {name: {"logprob_per_token", "ppl", "n_records", "n_tokens", "truncated", ["base", "delta"]}},
     "general_gen": {name: {"n", "n_reference", "f1_ref", "rougeL_ref", "f1_base", "rougeL_base", "degenerate",
                            "length", "length_ratio", "unit"}},   # rega.eval.general.generative
     "general_gen_answers": {name: {id: answer}},   # a later evaluation's base answers, when this is its base
     "judge": {...},            # only when the LLM-judge evaluations ran (rega.eval.judged.benchmarks)
     "samples": [...],          # a few answers per (rule, task), for reading
     "meta": {...}}             # rules, prompts, settings, timings, files

With ``output_dir`` it also writes the per-example rows there (rank 0 only): ``predictions.jsonl`` (domain
answers: response, extracted answer, gold, score), ``general_mc.jsonl`` (option log-likelihoods) and
``general_gen.jsonl`` (general answers and their scores).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from rega.config import DataSource
from rega.data.chat import ChatFormat
from rega.data.loaders import load_records
from rega.data.prompts import CENTRAL, RolePrompts
from rega.data.records import Record
from rega.distributed import dist_info
from rega.errors import ConfigError
from rega.eval.domain.scoring import TaskData, check_rule, evaluate_domains, greedy_answers, settings_tasks
from rega.eval.general.generative import general_gen_scores
from rega.eval.general.retention import (
    DEFAULT_MC,
    MCSet,
    base_model,
    drift_scores,
    general_mc_scores,
    resolve_mc_set,
)
from rega.eval.items import item_results, trivial_baselines
from rega.eval.settings import EvalSettings
from rega.io import write_jsonl


def source_name(source: DataSource) -> str:
    """A short name for a source: its task, else its folder (for train/dev/test files) or file stem."""
    if source.task:
        return source.task
    path = Path(source.path.split(":", 1)[-1])
    return path.parent.name if path.stem in ("train", "dev", "test") and path.parent.name else path.stem


def mc_set_names(settings: EvalSettings, records: Sequence[Record]) -> list[str]:
    if settings.general_mc is not None:
        return list(settings.general_mc)
    zh = sum(r.lang == "zh" for r in records)
    return DEFAULT_MC["zh" if zh > len(records) / 2 else "en"]


def load_sources(
    sources: Sequence[DataSource], limit: int | None, what: str, skip_invalid: bool, skipped: list[str] | None
) -> dict[str, list[Record]]:
    """Records of each source, by name, the first ``limit`` of each; invalid rows left out go to ``skipped``."""
    out: dict[str, list[Record]] = {}
    for source in sources:
        name = source_name(source)
        if name in out:
            raise ConfigError(
                f"two {what} sources are both named {name!r}: set 'task' on one to tell them apart"
            )
        report = load_records(source, skip_invalid=skip_invalid)
        records = report.records
        if skipped is not None:
            skipped += report.skipped
        out[name] = records[:limit] if limit is not None else records
    return out


def load_drift_sources(settings: EvalSettings, skipped: list[str] | None = None) -> dict[str, list[Record]]:
    """Records of each drift source, by name; the invalid rows left out (skip_invalid) go to ``skipped``."""
    return load_sources(settings.drift, settings.drift_limit, "drift", settings.skip_invalid, skipped)


def load_general_gen_sources(
    settings: EvalSettings, skipped: list[str] | None = None
) -> dict[str, list[Record]]:
    """Records of each general_gen source, by name; the invalid rows left out (skip_invalid) go to ``skipped``."""
    return load_sources(
        settings.general_gen, settings.general_gen_limit, "general_gen", settings.skip_invalid, skipped
    )


# --------------------------------------------------------------------------------------------- plan


@dataclass
class EvalPlan:
    """What one evaluation measures: domain records under prompt rules, general MC sets, drift sources and the
    general instructions answered for general_gen."""

    rules: list[str]
    data: TaskData
    domain_eval: bool
    mc_sets: list[MCSet]
    drift: dict[str, list[Record]]
    timings: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # invalid task and drift rows left out (skip_invalid)
    general_gen: dict[str, list[Record]] = field(default_factory=dict)


def plan(
    settings: EvalSettings, rules: Sequence[str], data: TaskData | None = None, domain_eval: bool = True
) -> EvalPlan:
    """Load what ``settings`` names (unless ``data`` is given); ``domain_eval`` off measures no domain task."""
    for rule in rules:
        check_rule(rule)
    if data is None:
        data = settings_tasks(settings) if domain_eval else TaskData([], {})
    mc_sets = [resolve_mc_set(spec) for spec in mc_set_names(settings, data.records)]
    skipped = list(data.skipped)
    drift = load_drift_sources(settings, skipped)
    general_gen = load_general_gen_sources(settings, skipped)
    return EvalPlan(list(rules), data, domain_eval, mc_sets, drift, skipped=skipped, general_gen=general_gen)


@contextlib.contextmanager
def timed(timings: dict[str, float], key: str):
    started = time.perf_counter()
    yield
    timings[key] = round(time.perf_counter() - started, 1)


# --------------------------------------------------------------------------------------------- measure


def with_base(current: dict, base: dict | None, key: str) -> dict:
    """``current`` with the base model's value and the difference to it, when both are known."""
    if not base or current.get(key) is None or base.get(key) is None:
        return current
    return {**current, "base": base[key], "delta": current[key] - base[key]}


def _domains(lm, prompts: RolePrompts, todo: EvalPlan, settings: EvalSettings) -> tuple[dict, list[dict]]:
    if not (todo.domain_eval and todo.data.records):
        return {}, []
    with timed(todo.timings, "domain_s"):
        return evaluate_domains(*lm, prompts, todo.rules, todo.data, settings)


def _general_mc(lm, system: str, todo: EvalPlan, settings: EvalSettings, base: dict) -> tuple[dict, list]:
    if not todo.mc_sets:
        return {}, []
    with timed(todo.timings, "general_mc_s"):
        summary, rows = general_mc_scores(
            *lm,
            system,
            todo.mc_sets,
            settings.general_mc_limit,
            settings.batch_size,
            settings.general_mc_backend,
            settings.share_prefix,
        )
    return {name: with_base(value, base.get(name), "score") for name, value in summary.items()}, rows


def _drift(lm, system: str, todo: EvalPlan, settings: EvalSettings, base: dict) -> tuple[dict, list]:
    rows: list[dict] = []
    if not todo.drift:
        return {}, rows
    with timed(todo.timings, "drift_s"):
        batch, length = settings.batch_size, settings.drift_max_length
        scores = drift_scores(*lm, system, todo.drift, batch, length, rows=rows)
    return {
        name: with_base(value, base.get(name), "logprob_per_token") for name, value in scores.items()
    }, rows


def _general_gen(
    lm, system: str, todo: EvalPlan, settings: EvalSettings, base: dict
) -> tuple[dict, dict, list]:
    """({source: aggregates}, {source: {id: answer}}, per-item rows); ``base``: the base model's result, whose
    ``general_gen_answers`` the answers are compared with."""
    rows: list[dict] = []
    if not todo.general_gen:
        return {}, {}, rows
    with timed(todo.timings, "general_gen_s"):
        summary, answers = general_gen_scores(
            *lm,
            system,
            todo.general_gen,
            settings,
            greedy_answers,
            base.get("general_gen_answers"),
            rows=rows,
        )
    return summary, answers, rows


# --------------------------------------------------------------------------------------------- aggregate, write


def samples(rows: Sequence[dict], per_task: int, width: int = 300) -> list[dict]:
    """The first ``per_task`` rows of each (rule, task), responses cut to ``width`` characters."""
    taken: dict[tuple[str, str], int] = defaultdict(int)
    out = []
    for row in rows:
        key = (row["rule"], row["task"])
        if taken[key] >= per_task:
            continue
        taken[key] += 1
        sample = {name: row[name] for name in ("rule", "domain", "task", "id")}
        sample.update(gold=str(row.get("gold", ""))[:width], pred=row.get("pred"), score=row.get("score"))
        out.append({**sample, "response": row["response"][:width]})
    return out


def write_rows(
    output_dir: str | Path | None, rows: list[dict], mc_rows: list[dict], gen_rows: Sequence[dict] = ()
) -> dict[str, str]:
    """predictions.jsonl, general_mc.jsonl and general_gen.jsonl under ``output_dir`` (rank 0); their paths by
    name."""
    files: dict[str, str] = {}
    if output_dir is None or dist_info()[0] != 0:
        return files
    for name, part in (("predictions", rows), ("general_mc", mc_rows), ("general_gen", list(gen_rows))):
        if part:
            write_jsonl(Path(output_dir) / f"{name}.jsonl", part)
            files[name] = str(Path(output_dir) / f"{name}.jsonl")
    return files


def evaluate_model(
    model,
    tokenizer,
    chat: ChatFormat,
    prompts: RolePrompts,
    inference_rules: Sequence[str],
    settings: EvalSettings,
    *,
    data: TaskData | None = None,
    output_dir: str | Path | None = None,
    base_reference: dict | None = None,
    domain_eval: bool = True,
) -> dict:
    """Evaluate one model (see the module docstring for the result's shape).

    Args:
        model: a causal LM (plain or peft-wrapped) on its device; its train/eval mode is restored afterwards.
        tokenizer, chat: its tokenizer and chat rendering.
        prompts: p_c and the role prompts p_i.
        inference_rules: prompt rules, ``central`` and/or ``role`` (a strategy's ``inference``).
        settings: what to evaluate.
        data: preloaded task records (else loaded from ``settings.tasks``).
        output_dir: where rank 0 writes predictions.jsonl and general_mc.jsonl; ``None`` writes nothing.
        base_reference: an earlier result of the base model; general MC and drift get ``base`` and ``delta``, and
            general_gen compares each answer with the base model's (its ``general_gen_answers``).
        domain_eval: run the domain tasks (off to measure only general MC and drift, e.g. for the base model).

    Under DDP every rank must call it (work is sharded and synced); all ranks return the same dict.
    """
    started = time.perf_counter()
    todo = plan(settings, inference_rules, data, domain_eval)
    lm, base = (model, tokenizer, chat), base_reference or {}
    result: dict = {}
    result["rules"], rows = _domains(lm, prompts, todo, settings)
    result["general_mc"], mc_rows = _general_mc(
        lm, prompts.central, todo, settings, base.get("general_mc", {})
    )
    result["drift"], drift_rows = _drift(lm, prompts.central, todo, settings, base.get("drift", {}))
    result["general_gen"], answers, gen_rows = _general_gen(lm, prompts.central, todo, settings, base)
    result["items"] = item_results(
        rows, mc_rows, result["general_mc"], drift_rows, gen_rows
    )  # report's tests
    result["baselines"] = (
        trivial_baselines(settings.tasks, todo.data.records, todo.data.labels) if rows else {}
    )
    result["samples"] = samples(rows, settings.sample_rows)
    if answers:  # what a later evaluation compares its answers with, when this one is its base reference
        result["general_gen_answers"] = answers
    todo.timings["total_s"] = round(time.perf_counter() - started, 1)
    result["meta"] = {
        "inference_rules": list(inference_rules),
        "prompts": prompts.to_dict(),
        "settings": asdict(settings),
        "n_records": len(todo.data.records),
        # What skip_invalid left out: n shrank by this much (the first rows, to find them).
        "skipped_invalid": {"n": len(todo.skipped), "first": todo.skipped[:20]},
        "timings": todo.timings,
        "files": write_rows(output_dir, rows, mc_rows, gen_rows),
    }
    return result


def base_reference(
    model, tokenizer, chat: ChatFormat, prompts: RolePrompts, settings: EvalSettings, records=()
) -> dict:
    """General MC, drift and general_gen answers of the base model: ``model`` with its LoRA adapters disabled (or
    as is)."""
    names = mc_set_names(settings, list(records))
    only_general = replace(settings, tasks=[], general_mc=names)
    with base_model(model):
        return evaluate_model(
            model, tokenizer, chat, prompts, [CENTRAL], only_general, data=TaskData([], {}), domain_eval=False
        )
