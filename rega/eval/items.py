"""Per-item results and trivial baselines, kept in ``eval.json`` so the report can test differences.

``items`` holds, per unit, the item ids and one number per item — nothing that quotes a dataset, so run records
with items can be committed::

    {"domain": {rule: {"medical/pubmedqa": {"ids", "score", "pred", ["ll_score", "ll_pred"]}}},
     "general_mc": {set: {"ids", "score"}},               # 0/1 under the set's headline metric
     "drift": {source: {"ids", "logprob", "tokens"}},     # summed log-probability and token count per record
     "general_gen": {source: {"ids", "f1_ref", "rougeL_ref", "f1_base", "rougeL_base", "length", "base_length",
                              "degenerate"}}}   # per item; null where an item has no reference / no base answer

``baselines`` holds, per closed task, what a model that ignores the input would score: the majority-class rate
(the label most frequent in the task's TRAINING split when the evaluated file has a ``train`` sibling, else in the
evaluated items; ``majority_from`` says which), the uniform-chance rate (mean of 1 / number of options) and the
gold label distribution of the evaluated items. Predicted-label distributions come from ``items``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

from rega.config import DataSource
from rega.data.loaders import load_records
from rega.data.records import LETTERS, Record
from rega.eval.domain.metrics import MC, closed_spec, task_label_sets
from rega.eval.general.generative import METRICS
from rega.paths import resolve_path

log = logging.getLogger(__name__)
NO_ANSWER = "(none)"
EVAL_SPLITS = ("dev", "test", "validation", "val")


def task_key(domain: str, task: str) -> str:
    return f"{domain}/{task}"


def domain_items(rows: Sequence[dict]) -> dict[str, dict[str, dict]]:
    """{rule: {domain/task: {ids, score, pred, [ll_score, ll_pred]}}} from the domain evaluation's rows."""
    out: dict[str, dict[str, dict]] = {}
    for row in rows:
        unit = out.setdefault(row["rule"], {}).setdefault(task_key(row["domain"], row["task"]), {})
        unit.setdefault("ids", []).append(row["id"])
        unit.setdefault("score", []).append(round(float(row["score"]), 6))
        if row.get("kind") == "closed":
            unit.setdefault("pred", []).append(row.get("pred") or NO_ANSWER)
        if "ll_label" in row:
            unit.setdefault("ll_score", []).append(float(row["ll_pred"] == row["ll_gold"]))
            unit.setdefault("ll_pred", []).append(row["ll_label"])
    return out


def mc_items(mc_rows: Sequence[dict], summary: dict[str, dict]) -> dict[str, dict]:
    """{set: {ids, score}}: each item right (1) or wrong (0) under the set's headline metric."""
    out: dict[str, dict] = {}
    for row in mc_rows:
        metric = summary.get(row["set"], {}).get("metric", "acc")
        pred = row["pred_norm"] if metric == "acc_norm" else row["pred"]
        unit = out.setdefault(row["set"], {"ids": [], "score": []})
        unit["ids"].append(str(row["id"]))
        unit["score"].append(float(pred == row["gold"]))
    return out


def drift_items(rows: Sequence[dict]) -> dict[str, dict]:
    """{source: {ids, logprob, tokens}} from drift's per-record rows."""
    out: dict[str, dict] = {}
    for row in rows:
        unit = out.setdefault(row["source"], {"ids": [], "logprob": [], "tokens": []})
        unit["ids"].append(row["id"])
        unit["logprob"].append(round(float(row["logprob"]), 5))
        unit["tokens"].append(int(row["tokens"]))
    return out


def general_gen_items(rows: Sequence[dict]) -> dict[str, dict]:
    """{source: {ids, f1_ref, rougeL_ref, f1_base, rougeL_base, length, base_length, degenerate}} from general_gen's
    per-item rows (:mod:`rega.eval.general.generative`): numbers only, ``None`` where an item has none."""
    out: dict[str, dict] = {}
    for row in rows:
        unit = out.setdefault(row["source"], {"ids": [], **{name: [] for name in METRICS}})
        unit["ids"].append(row["id"])
        for name in METRICS:
            value = row[name]
            unit[name].append(None if value is None else round(float(value), 6))
    return out


def item_results(
    rows: Sequence[dict],
    mc_rows: Sequence[dict],
    mc_summary: dict,
    drift_rows: Sequence[dict],
    gen_rows: Sequence[dict] = (),
):
    out = {
        "domain": domain_items(rows),
        "general_mc": mc_items(mc_rows, mc_summary),
        "drift": drift_items(drift_rows),
    }
    if gen_rows:
        out["general_gen"] = general_gen_items(gen_rows)
    return out


# --------------------------------------------------------------------------------------------- baselines


def gold_label(record: Record, labels: Sequence[str] | None) -> tuple[str, int] | None:
    """(gold label, number of options) of a closed record, None for a free-form one: a letter for multiple
    choice, the label itself for label tasks."""
    spec = closed_spec(record, labels)
    if spec is None:
        return None
    return spec.gold, len(spec.options)


def train_sibling(source: DataSource) -> DataSource | None:
    """The training split beside an evaluated file (``.../dev.jsonl`` -> ``.../train.jsonl``), if it exists."""
    path = resolve_path(source.path)
    if path.stem not in EVAL_SPLITS or not path.is_file():
        return None
    sibling = path.with_name("train" + path.suffix)
    if not sibling.is_file():
        return None
    prefix = source.path[: len(source.path) - len(path.name)] if source.path.endswith(path.name) else ""
    return replace(source, path=prefix + sibling.name if prefix else str(sibling), limit=None)


def _train_counts(sources: Sequence[DataSource]) -> dict[str, Counter]:
    counts: dict[str, Counter] = {}
    for source in sources:
        sibling = train_sibling(source)
        if sibling is None:
            continue
        try:
            # The training split only informs the majority baseline (load_records logs what it skips).
            records = load_records(sibling, skip_invalid=True).records
        except Exception as err:  # a baseline must never fail an evaluation
            log.warning(
                "majority baseline: cannot read %s (%s); using the evaluated items", sibling.path, err
            )
            continue
        labels = task_label_sets(records)
        for rec in records:
            gold = gold_label(rec, labels.get((rec.domain, rec.task)))
            if gold is not None:
                counts.setdefault(task_key(rec.domain, rec.task), Counter())[gold[0]] += 1
    return counts


def _majority(counts: Counter) -> str:
    # ties: the first in sorted order, so the choice does not depend on file order
    return min(counts, key=lambda label: (-counts[label], label))


def trivial_baselines(
    sources: Sequence[DataSource], records: Sequence[Record], labels: dict[tuple[str, str], tuple[str, ...]]
) -> dict[str, dict]:
    """{domain/task: {n, majority, majority_rate, majority_from, chance, gold}} for every closed task."""
    golds: dict[str, list[tuple[str, int]]] = {}
    for rec in records:
        gold = gold_label(rec, labels.get((rec.domain, rec.task)))
        if gold is not None:
            golds.setdefault(task_key(rec.domain, rec.task), []).append(gold)
    if not golds:
        return {}
    train = _train_counts(sources)
    out = {}
    for key, items in golds.items():
        evaluated = Counter(label for label, _ in items)
        source = "train" if key in train else "evaluated"
        majority = _majority(train.get(key) or evaluated)
        out[key] = {
            "n": len(items),
            "majority": majority,
            "majority_rate": evaluated[majority] / len(items),
            "majority_from": source,
            "chance": sum(1 / k for _, k in items) / len(items),
            "gold": dict(sorted(evaluated.items())),
        }
    return out


def option_label(kind: str, options: Sequence[str], index: int) -> str:
    """The label an option index stands for: its letter (multiple choice) or its text (label tasks)."""
    return LETTERS[index] if kind == MC else options[index]
