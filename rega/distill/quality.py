"""Quality gates for self-distilled answers: a pure function of (text, finish_reason, policy).

Each answer gets exactly one label, the first that applies:

1. ``empty``: nothing but whitespace. Always dropped (a training record needs a response).
2. ``degenerate``: a repetition loop. Rule: take the answer's last ``window`` units (a unit is a word, a
   punctuation mark, or one CJK character, so the rule works for English and Chinese alike and does not depend
   on the tokenizer or the backend); if the answer has at least ``min_units`` units and more than
   ``max_repeat_ratio`` of the window's ``ngram``-grams repeat an earlier n-gram of the window, it loops.
   The tail is used because small models tend to answer sensibly and then fall into a loop until the token cap.
3. ``truncated``: stopped by ``max_new_tokens`` (finish_reason ``length``), not by the end-of-turn token.
4. ``ok``.

Labels are assigned when the merged output is written, not when answers are generated, so changing the policy
only re-merges the shards and never asks for regeneration.
"""

from __future__ import annotations

import re

from rega.config import QualityPolicy

LABELS = ("ok", "truncated", "degenerate", "empty")

# One CJK/kana/hangul character, or a run of letters/digits, or one punctuation mark.
_UNIT = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]|[^\W_]+|[^\w\s]|_")


def text_units(text: str) -> list[str]:
    return _UNIT.findall(text.lower())


def repeat_ratio(units: list[str], n: int) -> float:
    """Share of n-grams that already occurred earlier in ``units`` (0.0 when there are none)."""
    grams = [tuple(units[i : i + n]) for i in range(len(units) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def classify(text: str, finish_reason: str, policy: QualityPolicy) -> str:
    """The label of one answer: empty, degenerate, truncated or ok (first that applies)."""
    if not text.strip():
        return "empty"
    units = text_units(text)
    if (
        len(units) >= policy.min_units
        and repeat_ratio(units[-policy.window :], policy.ngram) > policy.max_repeat_ratio
    ):
        return "degenerate"
    if finish_reason == "length":
        return "truncated"
    return "ok"


def keeps(label: str, policy: QualityPolicy) -> bool:
    if label == "empty":
        return False
    if label == "degenerate":
        return policy.keep_degenerate
    if label == "truncated":
        return policy.keep_truncated
    return True


def check_policy(policy: QualityPolicy) -> None:
    from rega.errors import ConfigError

    if policy.ngram < 1 or policy.window < policy.ngram or policy.min_units < 0:
        raise ConfigError(f"quality: need ngram >= 1, window >= ngram, min_units >= 0; got {policy}")
    if not 0.0 <= policy.max_repeat_ratio <= 1.0:
        raise ConfigError(f"quality.max_repeat_ratio must be within [0, 1], got {policy.max_repeat_ratio}")
