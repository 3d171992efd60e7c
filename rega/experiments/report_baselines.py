"""Trivial baselines in the report: majority-class and uniform-chance rates of every closed task, the marks on
scores that do not beat the majority rate, the predicted-label distributions (position bias), and the
evaluations whose scores rest on fewer items because they skipped invalid rows.

The rates come from a run's eval.json (``baselines``, written by every evaluation since they were added); for an
older run they are computed from the data its evaluation names (the tasks and per-task limit in its recorded
settings), which needs that data on this machine.
"""

from __future__ import annotations

import logging

from rega.experiments.report_stats import format_distribution, label_distribution

log = logging.getLogger(__name__)


def recompute_baselines(result: dict) -> dict:
    """Baselines of the items an evaluation scored, from its recorded settings (older eval.json files)."""
    from rega.config import DataSource
    from rega.eval.domain.scoring import load_task_records
    from rega.eval.items import trivial_baselines

    settings = result.get("meta", {}).get("settings", {})
    sources = [DataSource(**t) for t in settings.get("tasks") or []]
    if not sources:
        return {}
    data = load_task_records(
        sources, settings.get("limit_per_task"), settings.get("domains"), settings.get("skip_invalid", True)
    )  # an eval.json from before the option skipped its invalid rows
    return trivial_baselines(sources, data.records, data.labels)


def report_baselines(groups: list[dict]) -> dict[str, dict]:
    """{domain/task: {n, majority, majority_rate, majority_from, chance, gold}} of the evaluated closed tasks."""
    for group in groups:
        for result in group["evals"]:
            if result.get("baselines"):
                return result["baselines"]
    for group in groups:
        for result in group["evals"]:
            try:
                if found := recompute_baselines(result):
                    return found
            except Exception as err:  # the data may not be on this machine: the report still comes out
                log.warning("trivial baselines not computed (%s: %s)", type(err).__name__, err)
                return {}
    return {}


def _task_key(row: dict, column: str) -> str | None:
    """``domain/task`` of a task column (``pubmedqa (acc)``), None for means and general columns."""
    units = row["_cols"].get(column) or {}
    if len(units) != 1 or not column.endswith(")"):
        return None
    kind, key = next(iter(units)).split(":", 1)
    return key if kind in ("task", "ll") else None


def mark_below_majority(rows: list[dict], baselines: dict[str, dict]) -> None:
    """``row['_below']``: the closed-task columns whose score is not above the majority-class rate."""
    for row in rows:
        below = set()
        for column in row["_cols"]:
            key = _task_key(row, column)
            value = row.get(column)
            if key in baselines and value is not None and value <= baselines[key]["majority_rate"] + 1e-12:
                below.add(column)
        row["_below"] = below


def baseline_markdown(rows: list[dict], baselines: dict[str, dict]) -> list[str]:
    """The trivial-baseline table and, where predictions were kept, the predicted-label distributions."""
    if not baselines:
        return []
    lines = [
        "",
        "Trivial baselines of the closed tasks (majority class from the training split where the evaluated file "
        "has one, else from the evaluated items; chance = mean of 1 / options):",
        "",
        "| task | n | majority class (from) | majority rate | chance rate | gold labels (%) |",
        "|---|---|---|---|---|---|",
    ]
    for key, b in sorted(baselines.items()):
        lines.append(
            f"| {key} | {b['n']} | {b['majority']} ({b['majority_from']}) | {100 * b['majority_rate']:.1f} "
            f"| {100 * b['chance']:.1f} | {format_distribution(b['gold'])} |"
        )
    dists = [(row, label_distribution(row["_group"]["evals"], row["rule"])) for row in rows]
    dists = [(row, d) for row, d in dists if d]
    if dists:
        keys = sorted(baselines)
        lines += ["", "Predicted labels (% of answers; (none): no answer extracted):", ""]
        lines += ["| strategy | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
        lines.append("| gold | " + " | ".join(format_distribution(baselines[k]["gold"]) for k in keys) + " |")
        for row, d in dists:
            lines.append(
                f"| {row['label']} | " + " | ".join(format_distribution(d.get(k, {})) for k in keys) + " |"
            )
    return lines


def skipped_markdown(groups: list[dict]) -> list[str]:
    """One line per run whose evaluation skipped invalid rows (``skip_invalid``): its scores are over fewer items."""
    lines = []
    for group in groups:
        for seed, result in zip(group["seeds"], group["evals"]):
            skipped = result.get("meta", {}).get("skipped_invalid") or {}
            if skipped.get("n"):
                run = group["name"] + (f" (seed {seed})" if seed is not None else "")
                first = ", ".join(skipped.get("first", [])[:3])
                lines.append(f"* {run}: {skipped['n']} invalid rows skipped in evaluation (first: {first})")
    return ["", "Evaluations that skipped invalid rows (skip_invalid):", "", *lines] if lines else []
