"""The one record schema every loader produces, and its validation.

A record is one instruction-response pair: ``id, instruction, input, output, domain, task, lang`` plus, for closed
tasks, ``choices`` and ``answer`` (a letter for multiple choice, else one of the choices) and, for judged general
sets, ``category``. ``meta`` carries provenance (for example which model and sampling produced a distilled answer).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rega.errors import RecordError  # defined in rega.errors; imported from here by older code

DOMAIN_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
GENERAL = "general"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True, slots=True)
class Record:
    id: str
    instruction: str
    input: str
    output: str
    domain: str
    task: str
    lang: str = "en"
    choices: tuple[str, ...] | None = None
    answer: str | None = None
    category: str | None = None
    meta: Mapping[str, Any] | None = None
    origin: str = field(default="", compare=False)  # "file:line", for error messages only

    @property
    def user_text(self) -> str:
        """The user turn: instruction, then the input (context, options) on its own paragraph."""
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction

    def gold_choice(self) -> str | None:
        """The gold option text of a closed task (resolving a letter answer), or None."""
        if self.answer is None or not self.choices:
            return None
        if self.answer in self.choices:
            return self.answer
        return self.choices[LETTERS.index(self.answer)]

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "id": self.id,
            "instruction": self.instruction,
            "input": self.input,
            "output": self.output,
            "domain": self.domain,
            "task": self.task,
            "lang": self.lang,
        }
        if self.choices is not None:
            row["choices"] = list(self.choices)
        if self.answer is not None:
            row["answer"] = self.answer
        if self.category is not None:
            row["category"] = self.category
        if self.meta:
            row["meta"] = dict(self.meta)
        return row


def _text(obj: Mapping, name: str, where: str, *, required: bool, default: str = "") -> str:
    value = obj.get(name)
    if value is None:
        if required:
            raise RecordError(where, name, "missing")
        return default
    if not isinstance(value, str):
        raise RecordError(where, name, f"expected a string, got {type(value).__name__} {value!r:.60}")
    return value


def record_from_dict(
    obj: Any,
    where: str,
    *,
    domain: str | None = None,
    task: str | None = None,
    lang: str | None = None,
    default_id: str | None = None,
    require_output: bool = True,
    allowed_domains: frozenset[str] | None = None,
) -> Record:
    """Validate one raw row (already mapped to schema names) and build a :class:`Record`.

    ``domain``/``task``/``lang`` fill fields the row lacks; a row whose own domain contradicts the source's is an
    error, since it almost always means the wrong file was given for a domain.
    """
    if not isinstance(obj, Mapping):
        raise RecordError(where, None, f"expected a JSON object, got {type(obj).__name__}")
    rid = obj.get("id", default_id)
    if isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    if rid is None:
        raise RecordError(where, "id", "missing")
    if not isinstance(rid, str) or not rid.strip():
        raise RecordError(where, "id", f"expected a non-empty string, got {rid!r:.60}")
    instruction = _text(obj, "instruction", where, required=True)
    if not instruction.strip():
        raise RecordError(where, "instruction", "is empty")
    output = _text(obj, "output", where, required=require_output)
    if require_output and not output.strip():
        raise RecordError(where, "output", "is empty (a training record needs a response)")

    row_domain = _text(obj, "domain", where, required=False) or None
    if row_domain and domain and row_domain != domain:
        raise RecordError(
            where, "domain", f"is {row_domain!r} but this source is declared as domain {domain!r}"
        )
    final_domain = row_domain or domain
    if not final_domain:
        raise RecordError(where, "domain", "missing (set it in the row or as the source's domain)")
    if not DOMAIN_NAME.match(final_domain):
        raise RecordError(where, "domain", f"{final_domain!r} is not a lowercase identifier")
    if allowed_domains is not None and final_domain not in allowed_domains:
        known = ", ".join(sorted(allowed_domains))
        raise RecordError(where, "domain", f"unknown domain {final_domain!r} (configured: {known})")

    choices = obj.get("choices")
    if choices is not None:
        if (
            not isinstance(choices, list | tuple)
            or not all(isinstance(c, str) for c in choices)
            or not choices
        ):
            raise RecordError(where, "choices", "expected a non-empty list of strings")
        choices = tuple(choices)
    answer = obj.get("answer")
    if answer is not None:
        if not isinstance(answer, str):
            raise RecordError(where, "answer", f"expected a string, got {type(answer).__name__}")
        if choices is not None and answer not in choices:
            letters = LETTERS[: len(choices)]
            if not (len(answer) == 1 and answer in letters):
                raise RecordError(
                    where, "answer", f"{answer!r} is neither one of the choices nor a letter A-{letters[-1]}"
                )
    meta = obj.get("meta")
    if meta is not None and not isinstance(meta, Mapping):
        raise RecordError(where, "meta", "expected an object")
    return Record(
        id=rid,
        instruction=instruction,
        input=_text(obj, "input", where, required=False),
        output=output,
        domain=final_domain,
        task=_text(obj, "task", where, required=False) or task or final_domain,
        lang=_text(obj, "lang", where, required=False) or lang or "en",
        choices=choices,
        answer=answer,
        category=_text(obj, "category", where, required=False) or None,
        meta=meta,
        origin=where,
    )


def check_unique_ids(records: list[Record]) -> None:
    seen: dict[str, str] = {}
    for rec in records:
        if rec.id in seen:
            raise RecordError(rec.origin, "id", f"duplicate id {rec.id!r} (first seen at {seen[rec.id]})")
        seen[rec.id] = rec.origin
