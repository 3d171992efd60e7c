"""Judge ratings, pure: parse a rating from a judgment, average the present ones, and decide when too many are
missing for a judged benchmark to count (:func:`missing_problem`). A missing rating is ``None``, never 0."""

from __future__ import annotations

import re
from collections.abc import Iterable

# FastChat llm_judge/common.py: "[[8]]" first, then "[8]" as fallback.
ONE_SCORE_PATTERN = re.compile(r"\[\[(\d+\.?\d*)\]\]")
ONE_SCORE_PATTERN_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


def parse_bracket_rating(
    text: str | None, low: float | None = None, high: float | None = None
) -> float | None:
    """The rating in ``[[x]]`` (else ``[x]``), FastChat's rule; None when absent or outside ``[low, high]``."""
    if not text:
        return None
    match = ONE_SCORE_PATTERN.search(text) or ONE_SCORE_PATTERN_BACKUP.search(text)
    if not match:
        return None
    try:
        value = float(match.group(1))
    except ValueError:
        return None
    if (low is not None and value < low) or (high is not None and value > high):
        return None
    return value


def summarize(scores: Iterable[float | None]) -> dict:
    """``{"mean", "n", "missing"}``: the mean of the present scores (None when there are none)."""
    values = list(scores)
    present = [float(v) for v in values if v is not None]
    mean = round(sum(present) / len(present), 4) if present else None
    return {"mean": mean, "n": len(present), "missing": len(values) - len(present)}


def missing_problem(name: str, result: dict, max_share: float | None) -> str | None:
    """Why a judged benchmark's result fails the run, or None: an error, no items, or too many missing scores."""
    if result.get("error"):
        return f"{name}: {result['error']}"
    overall = result.get("overall") or {}
    n, missing = overall.get("n", 0), overall.get("missing", 0)
    if n + missing == 0:
        return f"{name}: no item was judged"
    too_many = missing == n + missing if max_share is None else missing > max_share * (n + missing)
    if not too_many:
        return None
    rule = "all of them" if max_share is None else f"more than max_missing_share={max_share:g}"
    first = f"; first error: {result['first_error']}" if result.get("first_error") else ""
    return f"{name}: {missing} of {n + missing} judge scores missing ({rule}){first}"


def first_error(rows: Iterable[dict]) -> str | None:
    """The first request error among judgment rows, else a note when ratings were unparsable."""
    rows = list(rows)
    error = next((row["error"] for row in rows if row.get("error")), None)
    if error is None and any(row.get("score") is None for row in rows):
        return "a judgment without a valid rating (unparsable or out of range)"
    return error


def chat_messages(system: str | None, user: str) -> list[dict]:
    """OpenAI-style messages; an empty system prompt is left out, as FastChat does."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user})
    return messages
