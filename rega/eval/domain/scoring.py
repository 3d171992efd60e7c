"""Domain evaluation: greedy batched answers to each task's test (or dev) records under a prompt rule, scored by
accuracy (closed tasks, after answer extraction) or unigram F1 (free-form tasks); see
:mod:`rega.eval.domain.metrics`.

Prompt rules (a strategy's ``inference`` tuple): ``central`` answers every input under p_c, ``role`` under the
input's domain prompt p_i (FTRP, REGA_r). Scores: per task, per domain (mean of its task scores) and ``overall``
(mean of the domain scores; ``task_mean`` is the plain mean over tasks).

Optionally closed tasks are also scored by log-likelihood (``ll_acc``): every option is written the way the
record's own answer is written (``D. Full set of teeth present`` → ``A. …``, ``B. …``; a bare letter → letters; an
option text or a label → texts), scored as the assistant's answer given the prompt (``mean`` or ``sum`` of its
token log-probabilities), and the best one is the prediction.

Under DDP every rank calls :func:`evaluate_domains`: the (rule, record) items are sharded across ranks, metrics sync
their sums in ``compute()`` and the per-example rows are gathered on every rank (rank 0 writes them).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from rega.config import DataSource, SamplingConfig
from rega.data.chat import ChatFormat
from rega.data.loaders import load_records
from rega.data.prompts import CENTRAL, RolePrompts
from rega.data.records import GENERAL, LETTERS, Record
from rega.data.strategies import ROLE
from rega.distributed import dist_info, gather_rows, shard
from rega.errors import ConfigError
from rega.eval.domain.closed_pass import closed_pass
from rega.eval.domain.metrics import (
    LABEL,
    ClosedSpec,
    WeightedMean,
    closed_spec,
    extract_answer,
    grade_closed,
    metric_value,
    task_label_sets,
    unigram_f1,
)
from rega.eval.general.loglik import continuation_text
from rega.eval.items import option_label
from rega.eval.progress import Progress
from rega.eval.settings import EvalSettings
from rega.modules.generation import generate

log = logging.getLogger(__name__)
RULES = (CENTRAL, ROLE)
FIXED_ROLE = "role:"


@dataclass
class TaskData:
    """Evaluation records (after the per-task limit) and the label sets of label tasks without ``choices``."""

    records: list[Record]
    labels: dict[tuple[str, str], tuple[str, ...]]
    # Invalid rows left out (skip_invalid), as "file:line: field 'x': problem".
    skipped: list[str] = field(default_factory=list)


def load_task_records(
    sources: Sequence[DataSource],
    limit_per_task: int | None = None,
    domains: Sequence[str] | None = None,
    skip_invalid: bool = False,
) -> TaskData:
    """Load evaluation sources; keep the tasks of ``domains`` (all when ``None``) and the first ``limit_per_task``
    records of each (domain, task).

    Label sets are collected before the limit, so a small limit does not shrink the set of labels a response may
    name. A row that fails validation stops the evaluation (file, line, field), unless ``skip_invalid``: then it
    is left out and counted in ``skipped``.
    """
    records: list[Record] = []
    skipped: list[str] = []
    seen: set[str] = set()
    for source in sources:
        report = load_records(source, skip_invalid=skip_invalid)
        skipped += report.skipped
        for rec in report.records:
            if rec.id in seen:
                raise ConfigError(f"evaluation record id {rec.id!r} appears in two sources ({source.path})")
            seen.add(rec.id)
            records.append(rec)
    if domains is not None:
        records = _of_domains(records, domains)
    labels = task_label_sets(records)
    if limit_per_task is not None:
        kept: dict[tuple[str, str], int] = defaultdict(int)
        limited = []
        for rec in records:
            key = (rec.domain, rec.task)
            if kept[key] < limit_per_task:
                kept[key] += 1
                limited.append(rec)
        records = limited
    return TaskData(records, labels, skipped)


def _of_domains(records: list[Record], domains: Sequence[str]) -> list[Record]:
    present = {r.domain for r in records}
    missing = sorted(set(domains) - present)
    if missing:
        raise ConfigError(
            f"no evaluation task of domain(s) {', '.join(missing)} (the tasks cover {', '.join(sorted(present))})"
        )
    return [r for r in records if r.domain in domains]


def settings_tasks(settings: EvalSettings) -> TaskData:
    """The task records ``settings`` names: its sources, domains and per-task limit."""
    return load_task_records(settings.tasks, settings.limit_per_task, settings.domains, settings.skip_invalid)


def check_rule(rule: str) -> None:
    """``central``, ``role``, or ``role:<domain>`` (every record under that domain's p_i: the prompt matrix)."""
    if rule not in RULES and not (rule.startswith(FIXED_ROLE) and rule[len(FIXED_ROLE) :]):
        raise ConfigError(f"unknown prompt rule {rule!r}; use central, role or role:<domain>")


def prompt_key(rule: str, record: Record) -> str:
    """Which prompt answers ``record`` under ``rule``: ``central`` or a domain name."""
    check_rule(rule)
    if rule == CENTRAL or record.domain == GENERAL:
        return CENTRAL
    return record.domain if rule == ROLE else rule[len(FIXED_ROLE) :]


def system_prompt(rule: str, record: Record, prompts: RolePrompts) -> str:
    """p_c for ``central`` (and for general records), the record's domain prompt p_i for ``role``, a fixed
    domain's prompt for ``role:<domain>``."""
    key = prompt_key(rule, record)
    if key == CENTRAL:
        return prompts.central
    try:
        return prompts.roles[key]
    except KeyError:
        raise ConfigError(
            f"prompt rule {rule!r} needs a role prompt for domain {key!r} (have: {', '.join(prompts.roles) or 'none'})"
        ) from None


def choice_candidates(record: Record, spec: ClosedSpec) -> tuple[list[str], int]:
    """(every option written like the record's own answer, index of the gold one) for log-likelihood scoring."""
    if spec.kind == LABEL:
        return list(spec.options), list(spec.options).index(spec.gold)
    letters = LETTERS[: len(spec.options)]
    gold = letters.index(spec.gold)
    gold_text, output = spec.options[gold], record.output.strip()
    if output == gold_text:
        return list(spec.options), gold
    if output.startswith(spec.gold) and output.endswith(gold_text) and len(output) > len(gold_text):
        sep = output[len(spec.gold) : len(output) - len(gold_text)]
        if not any(ch.isalnum() for ch in sep):
            return [f"{letter}{sep}{text}" for letter, text in zip(letters, spec.options)], gold
    return list(letters), gold


def _task_metrics(device) -> dict[str, WeightedMean]:
    return {name: WeightedMean().to(device) for name in ("acc", "f1", "no_answer", "ll_acc")}


def _distinct(prompts: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """(distinct prompts, position of each prompt among them): identical prompts (a domain's records under
    ``role`` and under ``role:<that domain>``) are answered once."""
    seen: dict[tuple[int, ...], int] = {}
    where = [seen.setdefault(tuple(p), len(seen)) for p in prompts]
    return [list(p) for p in seen], where


def greedy_answers(model, tokenizer, prompts, limit: int, settings: EvalSettings, desc: str) -> list:
    """One greedy :class:`~rega.modules.generation.Generation` per tokenized prompt (at most ``limit`` new tokens),
    in batches of ``settings.batch_size`` rows / ``max_batch_tokens``; identical prompts are answered once."""
    distinct, where = _distinct(prompts)
    sampling = SamplingConfig(do_sample=False, temperature=1.0, top_p=1.0, max_new_tokens=limit)
    answers: list = [None] * len(distinct)
    batches = {"batch_size": settings.batch_size, "max_batch_tokens": settings.max_batch_tokens}
    batches["share_prefix"] = settings.share_prefix
    with Progress(len(distinct), desc, unit="answer") as progress:
        for gen in generate(model, tokenizer, distinct, sampling, **batches):
            answers[gen.index] = gen
            progress.update()
    return [answers[w] for w in where]


def _option_ids(tokenizer, chat, items, specs) -> tuple[list[list[list[int]]], list[int]]:
    """(each item's options as token ids, written like its own answer; the gold option's index)."""
    options, golds = [], []
    for _, rec, system in items:
        candidates, gold = choice_candidates(rec, specs[rec.id])
        texts = [continuation_text(chat, system, rec.user_text, cand) for cand in candidates]
        options.append([tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts])
        golds.append(gold)
    return options, golds


def _pick(scores, gold: int, spec: ClosedSpec, norm: str) -> tuple:
    """(option picked, gold option, option scores, picked label) from the options' (log-prob sum, tokens)."""
    values = [t / max(1, c) if norm == "mean" else t for t, c in scores]
    choice = max(range(len(values)), key=values.__getitem__)
    return choice, gold, values, option_label(spec.kind, spec.options, choice)


def _closed_with_options(model, tokenizer, chat, items, specs, prompt_ids, settings: EvalSettings):
    """(greedy answers or None, option picks) of closed items, from one prefill per distinct prompt
    (:func:`rega.eval.domain.closed_pass.closed_pass`)."""
    options, golds = _option_ids(tokenizer, chat, items, specs)
    distinct, where = _distinct(prompt_ids)
    first = {w: n for n, w in reversed(list(enumerate(where)))}
    generated = settings.generates_closed
    gens, scores = closed_pass(
        model, tokenizer, distinct, [options[first[w]] for w in range(len(distinct))],
        settings.answer_cap(True) if generated else None, settings.batch_size, settings.max_batch_tokens,
        share_prefix=settings.share_prefix, desc="domain closed questions" + (" (answer + options)" if generated else " (options)"),
    )  # fmt: skip
    picks = [
        _pick(scores[w], golds[n], specs[items[n][1].id], settings.loglik_norm) for n, w in enumerate(where)
    ]
    return [gens[w] for w in where], picks


def _answer(model, tokenizer, chat, mine, specs, settings: EvalSettings) -> tuple[dict, dict]:
    """({k: Generation or None}, {k: (option picked, gold option, option scores, picked label)}) for this rank's
    items: generated answers, and for closed items with option scoring the options' scores."""
    responses: dict[int, object] = {}
    ll_preds: dict[int, tuple] = {}
    for closed in (True, False):
        idx = [k for k, (_, rec, _) in enumerate(mine) if (specs[rec.id] is not None) == closed]
        if not idx:
            continue
        # A conversation is answered after its earlier turns; its reference is the last assistant turn (output).
        prompt_ids = [chat.encode_prompt(mine[k][2], mine[k][1].user_text, mine[k][1].history) for k in idx]
        if closed and settings.scores_options:
            gens, picks = _closed_with_options(
                model, tokenizer, chat, [mine[k] for k in idx], specs, prompt_ids, settings
            )
            ll_preds.update(zip(idx, picks))
        else:
            desc = f"domain generation ({'closed' if closed else 'free-form'})"
            gens = greedy_answers(model, tokenizer, prompt_ids, settings.answer_cap(closed), settings, desc)
        responses.update(zip(idx, gens))
    return responses, ll_preds


def _open_row(rec, gen, bucket) -> dict:
    score = unigram_f1(gen.text, rec.output, rec.lang)
    bucket["f1"].update([score])
    return {"kind": "open", "gold": rec.output, "pred": None, "score": score}


def _closed_row(spec, gen, ll, bucket) -> dict:
    row: dict = {"kind": "closed", "gold": spec.gold}
    if gen is not None:
        pred, score = grade_closed(gen.text, spec)
        bucket["acc"].update([score])
        bucket["no_answer"].update([float(pred is None)])
        row.update(pred=pred, score=score)
    if ll is not None:
        choice, gold, values, label = ll
        bucket["ll_acc"].update([float(choice == gold)])
        row.update(ll_pred=choice, ll_gold=gold, ll_label=label, ll_scores=[round(v, 4) for v in values])
        if gen is None:  # scored by log-likelihood only: the picked option is the answer
            row.update(pred=label, score=float(choice == gold))
    return row


def _row(rule, rec, spec, gen, ll, bucket) -> dict:
    """One item's row (response, extracted and gold answer, score), its metrics updated."""
    row = {
        "rule": rule, "domain": rec.domain, "task": rec.task, "id": rec.id, "prompt": prompt_key(rule, rec),
        "response": gen.text if gen is not None else "", "finish_reason": gen.finish_reason if gen is not None else None,
    }  # fmt: skip
    return {**row, **(_open_row(rec, gen, bucket) if spec is None else _closed_row(spec, gen, ll, bucket))}


def _task_entry(bucket, n_closed: int, n_open: int, settings: EvalSettings) -> dict:
    entry: dict = {"n": n_closed + n_open}
    # every rank computes every metric, in the same order: each compute() is a collective under DDP
    values = {name: metric_value(bucket[name]) for name in ("acc", "no_answer", "ll_acc", "f1")}
    generated = settings.generates_closed
    if n_closed:
        if generated:
            entry["acc"] = values["acc"]
            entry["no_answer"] = (
                round(values["no_answer"] * n_closed) if values["no_answer"] is not None else 0
            )
        if settings.scores_options:
            entry["ll_acc"] = values["ll_acc"]
    if n_open:
        entry["f1"] = values["f1"]
    entry["metric"] = ("acc" if generated else "ll_acc") if n_closed else "f1"
    entry["score"] = entry[entry["metric"]]
    return entry


def _mean(values) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _summarize(results: dict, rules: Sequence[str]) -> dict:
    for rule in rules:
        summary = results.setdefault(rule, {"domains": {}})
        task_scores = []
        for domain in summary["domains"].values():
            scores = [t["score"] for t in domain["tasks"].values() if t["score"] is not None]
            task_scores.extend(scores)
            domain["score"] = _mean(scores)
        # Keep the keys in a readable order: headline numbers first.
        results[rule] = {
            "overall": _mean(d["score"] for d in summary["domains"].values()),
            "task_mean": _mean(task_scores),
            "domains": summary["domains"],
        }
    return results


def _counts(items, specs) -> dict[tuple[str, str, str], list[int]]:
    """[closed, open] items per (rule, domain, task), in the items' order."""
    counts: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
    for rule, rec, _ in items:
        counts[(rule, rec.domain, rec.task)][specs[rec.id] is None] += 1
    return counts


def _aggregate(metrics: dict, counts: dict, rules: Sequence[str], settings: EvalSettings) -> dict:
    results: dict[str, dict] = {}
    for (rule, domain, task), bucket in metrics.items():
        entry = _task_entry(bucket, *counts[(rule, domain, task)], settings)
        domains = results.setdefault(rule, {"domains": {}})["domains"]
        domains.setdefault(domain, {"tasks": {}})["tasks"][task] = entry
    return _summarize(results, rules)


def _in_item_order(rows: list[dict], items) -> list[dict]:
    order = {(rule, rec.id): k for k, (rule, rec, _) in enumerate(items)}
    return sorted(rows, key=lambda r: order[(r["rule"], r["id"])])


def evaluate_domains(
    model,
    tokenizer,
    chat: ChatFormat,
    prompts: RolePrompts,
    rules: Sequence[str],
    data: TaskData,
    settings: EvalSettings | None = None,
) -> tuple[dict[str, dict], list[dict]]:
    """({rule: {overall, task_mean, domains: {domain: {score, tasks: {task: {...}}}}}}, per-example rows).

    ``settings.closed_scoring``: ``generate`` scores closed tasks by the greedy answer (``acc``, the paper's
    metric; with ``loglik_choices`` also ``ll_acc``, from the same prefill), ``loglik`` by the options'
    log-likelihood only (``ll_acc``; nothing generated). ``max_batch_tokens`` caps a batch's padded tokens
    (longest prompt times rows), so short prompts go in larger batches.
    """
    settings, rules = settings or EvalSettings(), list(rules)
    items = [(rule, rec, system_prompt(rule, rec, prompts)) for rule in rules for rec in data.records]
    specs = {rec.id: closed_spec(rec, data.labels.get((rec.domain, rec.task))) for rec in data.records}
    rank, world = dist_info()
    mine = shard(items, rank, world)
    n_closed = sum(specs[rec.id] is not None for _, rec, _ in mine)
    log.info(
        "domain evaluation: %d answers (%d closed) under %s on rank %d", len(mine), n_closed, rules, rank
    )
    counts = _counts(items, specs)
    device = next(model.parameters()).device
    metrics = {key: _task_metrics(device) for key in counts}
    responses, ll_preds = _answer(model, tokenizer, chat, mine, specs, settings)
    rows = [
        _row(rule, rec, specs[rec.id], responses[k], ll_preds.get(k), metrics[(rule, rec.domain, rec.task)])
        for k, (rule, rec, _) in enumerate(mine)
    ]
    return _aggregate(metrics, counts, rules, settings), _in_item_order(gather_rows(rows), items)


__all__ = [
    "TaskData",
    "choice_candidates",
    "evaluate_domains",
    "extract_answer",
    "greedy_answers",
    "load_task_records",
    "settings_tasks",
    "system_prompt",
]
