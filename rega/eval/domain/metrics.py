"""Domain metrics: answer extraction for closed tasks, unigram F1 for free-form tasks, and a rank-aware mean.

Everything here is a pure function or :class:`WeightedMean`, a :class:`torchmetrics.Metric` whose states are sums
(``dist_reduce_fx="sum"``), so the states of metrics updated on different ranks add up to the metric of the union
and ``compute()`` syncs them under DDP.

Answer extraction (closed tasks), documented here because every number depends on it:

* **Which records are closed.** A record is closed when it has ``choices`` and ``answer``. It is *multiple choice*
  (``mc``) when ``answer`` is a letter A.. that is not itself one of the choices; otherwise it is a *label* task
  whose labels are the choices. A record with an ``answer`` but no ``choices`` (cmedtc, finnl, finre, finnsp) is a
  label task whose label set is the set of answers among the task's records.
* **Labels** (yes/no/maybe, Yes/No, 是/否, sentiment, categories): the label mentioned *first* in the response wins;
  when two labels start at the same position the *longest* wins ("公司，中国" over "公司", "Non-Neoplasm Disease
  Stage" over "Non"). Latin labels match case-insensitively at word boundaries (ASCII letters and digits delimit
  words, so "no" does not match inside "not" or "cannot", and whitespace inside a label matches any run of
  whitespace); labels containing CJK characters match as substrings. "是否" (whether) is blanked before matching so
  a restated question ("两句话的意思是否相同") does not count as 是 or 否.
* **Multiple choice**, tried in order, first hit wins:

  1. a *leading* letter, optionally after an answer marker and inside brackets: ``B``, ``B.``, ``(B)``, ``[B]``,
     ``B) text``, ``Answer: B``, ``The answer is B``, ``答案：B``, ``C．案件…``. A bare letter followed by a space and
     more words counts only when those words begin the option's own text (``B Patient having beard``), so the
     article in "A patient with…" is not read as option A. Lowercase letters count only when bracketed or alone.
  2. an answer statement anywhere: ``… the answer is (C)``, ``correct option: D``, ``答案是B``, ``选C``.
  3. the option text itself, by the label rule above (first mentioned, longest on ties).
  4. a letter in brackets ``(B)`` or starting a line as ``B.``/``B)`` anywhere.

  A letter outside the record's options (E with four options) is ignored. No hit means no answer (scored wrong
  and counted as ``no_answer``).

Unigram F1 (free-form tasks): SQuAD normalisation for English (lowercase, drop ASCII punctuation and the articles
a/an/the, split on whitespace); for Chinese (``lang == "zh"``) the tokens are characters after lowercasing and
dropping whitespace and Unicode punctuation. Token multisets are compared; two empty texts score 1, one empty 0.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchmetrics import Metric

from rega.data.records import LETTERS, Record

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)

MC, LABEL = "mc", "label"


def has_cjk(text: str) -> bool:
    return bool(_CJK.search(text))


# --------------------------------------------------------------------------------------------- unigram F1


def normalize_en(text: str) -> str:
    """SQuAD's answer normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def tokens(text: str, lang: str = "en") -> list[str]:
    """Unigrams for F1: words for English (after SQuAD normalisation), characters for Chinese."""
    if lang == "zh":
        return [
            ch for ch in text.lower() if not ch.isspace() and not unicodedata.category(ch).startswith("P")
        ]
    return normalize_en(text).split()


def unigram_f1(prediction: str, reference: str, lang: str = "en") -> float:
    pred, ref = tokens(prediction, lang), tokens(reference, lang)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------------------------- extraction


def _label_pattern(label: str) -> re.Pattern | None:
    if has_cjk(label):
        return None  # substring match
    body = r"\s+".join(re.escape(part) for part in label.casefold().split())
    return re.compile(rf"(?<![0-9a-z]){body}(?![0-9a-z])")


def label_mentions(text: str, labels: Sequence[str]) -> list[tuple[int, str]]:
    """(position, label) of the first mention of every label found in ``text`` (see module docstring)."""
    folded = text.casefold().replace("是否", "  ")
    found = []
    for label in labels:
        if not label.strip():
            continue
        pattern = _label_pattern(label)
        if pattern is None:
            pos = folded.find(label.casefold())
        else:
            match = pattern.search(folded)
            pos = match.start() if match else -1
        if pos >= 0:
            found.append((pos, label))
    return found


def extract_label(text: str, labels: Sequence[str]) -> str | None:
    """The label mentioned first in ``text``; the longest one when several start at the same position."""
    found = label_mentions(text, labels)
    if not found:
        return None
    return min(found, key=lambda item: (item[0], -len(item[1])))[1]


_MARKER = (
    r"(?:(?i:(?:the\s+)?(?:correct\s+|final\s+|best\s+)?(?:answer|option|choice)(?:\s+(?:is|would\s+be|will\s+be))?)"
    r"|(?:正确)?答案(?:是|为|应该是|应为|应选)?|应选|选择|选项|选)"
)
_LEADING = re.compile(
    rf"^[\s*_\"'`>#]*(?P<marker>{_MARKER}\s*[:：]?\s*)?(?P<open>[\(\[（【])?\s*(?P<letter>[A-Za-z])(?![A-Za-z0-9])"
    r"(?P<rest>.*)$",
    re.S,
)
_STATEMENT = re.compile(rf"{_MARKER}\s*[:：]?\s*[\(\[（【]?\s*(?P<letter>[A-Z])(?![A-Za-z0-9])")
_LOOSE = re.compile(r"[\(（\[【]\s*(?P<a>[A-Z])\s*[\)）\]】]|(?:^|\n)\s*(?P<b>[A-Z])[\.\)、．:：]")
_AFTER_LETTER = set(".:：、,，．)）]】;；!?*\"'`")


def _leading_letter(text: str, options: Sequence[str]) -> str | None:
    match = _LEADING.match(text)
    if not match:
        return None
    letter, rest, bracketed = match["letter"], match["rest"], bool(match["open"])
    if letter.islower():
        if not (bracketed or not rest.strip(" .:)）]】")):
            return None
        letter = letter.upper()
    stripped = rest.lstrip()
    if bracketed or match["marker"] or not stripped or stripped[0] in _AFTER_LETTER or has_cjk(stripped[0]):
        return letter
    if rest[0].isspace():
        index = LETTERS.find(letter)
        if 0 <= index < len(options) and normalize_en(stripped).startswith(
            normalize_en(options[index]) or "\0"
        ):
            return letter
    return None


def extract_choice(text: str, options: Sequence[str]) -> str | None:
    """The option letter a free-text answer picks among ``options`` (rules in the module docstring), or None."""
    valid = LETTERS[: len(options)]
    letter = _leading_letter(text, options)
    if letter is not None and letter in valid:
        return letter
    for match in _STATEMENT.finditer(text):
        if match["letter"] in valid:
            return match["letter"]
    picked = extract_label(text, options)
    if picked is not None:
        return valid[list(options).index(picked)]
    for match in _LOOSE.finditer(text):
        letter = match["a"] or match["b"]
        if letter in valid:
            return letter
    return None


@dataclass(frozen=True)
class ClosedSpec:
    """How one closed record is graded: ``kind`` mc (options + gold letter) or label (labels + gold label)."""

    kind: str
    options: tuple[str, ...]
    gold: str


def closed_spec(record: Record, task_labels: Sequence[str] | None = None) -> ClosedSpec | None:
    """The grading spec of a closed record, or None for a free-form one.

    ``task_labels`` is the label set of a task without ``choices`` (the answers among its records).
    """
    if record.answer is None:
        return None
    if record.choices:
        if record.answer not in record.choices and record.answer in LETTERS[: len(record.choices)]:
            return ClosedSpec(MC, tuple(record.choices), record.answer)
        return ClosedSpec(LABEL, tuple(record.choices), record.answer)
    labels = tuple(task_labels) if task_labels else (record.answer,)
    return ClosedSpec(LABEL, labels, record.answer)


def task_label_sets(records: Sequence[Record]) -> dict[tuple[str, str], tuple[str, ...]]:
    """(domain, task) -> sorted set of answers, for tasks whose records have an answer but no choices."""
    sets: dict[tuple[str, str], set[str]] = {}
    for rec in records:
        if rec.answer is not None and not rec.choices:
            sets.setdefault((rec.domain, rec.task), set()).add(rec.answer)
    return {key: tuple(sorted(values)) for key, values in sets.items()}


def extract_answer(response: str, spec: ClosedSpec) -> str | None:
    return (
        extract_choice(response, spec.options) if spec.kind == MC else extract_label(response, spec.options)
    )


def grade_closed(response: str, spec: ClosedSpec) -> tuple[str | None, float]:
    """(extracted answer or None, 1.0 if it equals the gold answer else 0.0)."""
    pred = extract_answer(response, spec)
    return pred, float(pred is not None and pred == spec.gold)


# --------------------------------------------------------------------------------------------- metrics


class WeightedMean(Metric):
    """sum(values) / sum(weights), with both sums as states reduced by summation across ranks.

    An empty metric computes NaN (reported as ``None`` in JSON). Per-item scores come from plain functions and
    feed it: ``acc.update([grade_closed(response, spec)[1]])``, ``f1.update([unigram_f1(pred, ref, lang)])``.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self, values: Sequence[float] | torch.Tensor, weights: Sequence[float] | torch.Tensor | None = None
    ) -> None:
        values = torch.as_tensor(values, dtype=torch.float64, device=self.total.device).flatten()
        if weights is None:
            weights = torch.ones_like(values)
        else:
            weights = torch.as_tensor(weights, dtype=torch.float64, device=self.total.device).flatten()
        self.total += values.sum()
        self.weight += weights.sum()

    def compute(self) -> torch.Tensor:
        if self.weight == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return self.total / self.weight


def metric_value(metric: Metric) -> float | None:
    """``compute()`` as a float, None when empty (JSON has no NaN)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "compute called before update" on a rank that saw no items
        value = float(metric.compute())
    return None if value != value else value
