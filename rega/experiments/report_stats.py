"""The report's statistics: which per-item units make up each table column, their confidence intervals, paired
differences against a reference row, the spread over seeds, and predicted-label distributions.

A report row is one run (all its seeds) under one prompt rule. Its units come from each seed's ``eval.json``
``items`` (see :mod:`rega.eval.items`), the seeds aligned on the items they share. The arithmetic is in
:mod:`rega.experiments.stats`.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from rega.errors import UserError
from rega.experiments.stats import Unit, align, bootstrap_ci, paired_difference, seed_spread

TaskCols = dict[str, dict[str, float]]  # column -> {unit: weight}
# general_gen: report column label -> per-item metric (rega.eval.general.generative), each its own unit; the
# length ratio is the unit ``gen_length:<source>`` (answer length over the base answer's, summed over items).
GEN_COLUMNS = {
    "gen_f1": "f1_ref",
    "gen_rougeL": "rougeL_ref",
    "gen_f1_vs_base": "f1_base",
    "gen_rougeL_vs_base": "rougeL_base",
    "gen_len_ratio": "length",
    "gen_degenerate": "degenerate",
}


def _unit_from_seeds(
    parts: list[tuple[list[str], list[float], list[float] | None]],
) -> tuple[list[str], Unit]:
    """One unit over seeds: each part is (ids, numerators, denominators or None); items all seeds share."""
    shared = set(parts[0][0]).intersection(*(set(ids) for ids, _, _ in parts[1:]))
    ids = [i for i in parts[0][0] if i in shared]
    nums, dens = [], []
    for part_ids, num, den in parts:
        where = {item: k for k, item in enumerate(part_ids)}
        nums.append([num[where[i]] for i in ids])
        dens.append([den[where[i]] for i in ids] if den is not None else [1.0] * len(ids))
    plain = all(den is None for _, _, den in parts)
    return ids, Unit.of(nums) if plain else Unit(np.asarray(nums, float), np.asarray(dens, float))


def check_drift_references(evals: list[tuple[str, dict]]) -> None:
    """Refuse records whose drift was scored on different reference answers (``(where, eval.json)`` pairs).

    Drift items pair by instruction id, which a re-sampled reference (another seed or decoding code) shares with
    the first: the same id must have the same token count everywhere, else the comparison would pair different
    answers silently."""
    seen: dict[tuple[str, str], tuple[int, str]] = {}
    problems = []
    for where, result in evals:
        for source, unit in (result.get("items") or {}).get("drift", {}).items():
            for item, tokens in zip(unit["ids"], unit["tokens"]):
                first = seen.setdefault((source, str(item)), (int(tokens), where))
                if first[0] != int(tokens):
                    problems.append(
                        f"{where}: drift source '{source}' item {item} has {tokens} answer tokens, {first[0]} in "
                        f"{first[1]}: the runs were scored on different reference answers; evaluate them on one"
                    )
                    break
    if problems:
        raise UserError(*problems)


def _gen_parts(unit: dict) -> dict[str, tuple[list[str], list[float], list[float] | None]]:
    """{unit kind: (ids, numerators, denominators or None)} of one general_gen source, each over the items that
    have the value (a reference, a base answer); the length ratio's: length over base_length."""
    out = {}
    for metric in GEN_COLUMNS.values():
        if metric == "length":
            keep = [k for k, base in enumerate(unit["base_length"]) if base is not None]
            den = [unit["base_length"][k] for k in keep]
        else:
            keep, den = [k for k, value in enumerate(unit[metric]) if value is not None], None
        if keep:
            out[f"gen_{metric}"] = ([unit["ids"][k] for k in keep], [unit[metric][k] for k in keep], den)
    return out


def row_units(evals: list[dict], rule: str) -> dict[str, tuple[list[str], Unit]] | None:
    """{unit name: (ids, Unit)} of one row, or None when a seed has no per-item results."""
    if not evals or any("items" not in e for e in evals):
        return None
    sources: dict[str, list] = {}
    for result in evals:
        items = result["items"]
        for key, unit in items.get("domain", {}).get(rule, {}).items():
            sources.setdefault(f"task:{key}", []).append((unit["ids"], unit["score"], None))
            if "ll_score" in unit:
                sources.setdefault(f"ll:{key}", []).append((unit["ids"], unit["ll_score"], None))
        for name, unit in items.get("general_mc", {}).items():
            sources.setdefault(f"mc:{name}", []).append((unit["ids"], unit["score"], None))
        for name, unit in items.get("drift", {}).items():
            sources.setdefault(f"drift:{name}", []).append((unit["ids"], unit["logprob"], unit["tokens"]))
        for name, unit in items.get("general_gen", {}).items():
            for key, part in _gen_parts(unit).items():
                sources.setdefault(f"{key}:{name}", []).append(part)
    return {name: _unit_from_seeds(parts) for name, parts in sources.items() if len(parts) == len(evals)}


def column_units(summary: dict, general: dict) -> TaskCols:
    """Which units (and weights) each score column of a row is made of, from one rule's summary (see the
    report's columns: a task, a domain mean, the mean over domains, general MC sets and their mean, drift, the
    general_gen scores)."""
    cols: TaskCols = {}
    domains = summary.get("domains", {})
    for domain, dsum in sorted(domains.items()):
        tasks = sorted(dsum["tasks"])
        for task in tasks:
            tsum = dsum["tasks"][task]
            cols[f"{task} ({tsum['metric']})"] = {
                f"{'ll' if tsum['metric'] == 'll_acc' else 'task'}:{domain}/{task}": 1.0
            }
            if "ll_acc" in tsum and tsum["metric"] != "ll_acc":
                cols[f"{task} (ll_acc)"] = {f"ll:{domain}/{task}": 1.0}
        cols[f"{domain} mean"] = {
            next(iter(cols[f"{t} ({dsum['tasks'][t]['metric']})"])): 1 / len(tasks) for t in tasks
        }
    if domains:
        cols["domain mean"] = {u: w / len(domains) for d in domains for u, w in cols[f"{d} mean"].items()}
    mc = sorted(general.get("general_mc") or {})
    for name in mc:
        cols[f"mc:{name}"] = {f"mc:{name}": 1.0}
    if mc:
        cols["general MC mean"] = {f"mc:{name}": 1 / len(mc) for name in mc}
    for name in sorted(general.get("drift") or {}):
        cols[f"logprob:{name}"] = {f"drift:{name}": 1.0}
    for name in sorted(general.get("general_gen") or {}):
        for label, metric in GEN_COLUMNS.items():
            cols[f"{label}:{name}"] = {f"gen_{metric}:{name}": 1.0}
    return cols


def _usable(units, column: dict[str, float]) -> bool:
    return units is not None and all(name in units for name in column)


def intervals(units, cols: TaskCols) -> dict[str, dict]:
    """{column: {lo, hi, sd}} for the columns whose units are all present."""
    out = {}
    for name, column in cols.items():
        if _usable(units, column):
            plain = {u: units[u][1] for u in column}
            lo, hi = bootstrap_ci(plain, column)
            out[name] = {"lo": lo, "hi": hi, "sd": seed_spread(plain, column)}
    return out


def paired(units, reference_units, cols: TaskCols, names: list[str]) -> dict[str, dict]:
    """{column: {diff, lo, hi, p, test, n}} of row − reference on the items both have."""
    if units is None or reference_units is None:
        return {}
    a, b, sizes = align(units, reference_units)
    out = {}
    for name in names:
        column = cols.get(name)
        if column and all(u in a for u in column):
            out[name] = {**paired_difference(a, b, column), "n": sum(sizes[u] for u in column)}
    return out


def label_distribution(evals: list[dict], rule: str) -> dict[str, Counter]:
    """{domain/task: Counter of predicted labels} over all seeds (closed tasks with per-item predictions)."""
    out: dict[str, Counter] = {}
    for result in evals:
        for key, unit in (result.get("items") or {}).get("domain", {}).get(rule, {}).items():
            if "pred" in unit:
                out.setdefault(key, Counter()).update(unit["pred"])
    return out


def format_distribution(counts: Counter | dict) -> str:
    """``C 63 · A 20 · B 12 · D 5`` (% of answers, most frequent first)."""
    total = sum(counts.values())
    if not total:
        return "–"
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
    return " · ".join(f"{label} {100 * n / total:.0f}" for label, n in ordered)
