"""The one record schema every loader produces, and its validation.

A record is one instruction-response pair: ``id, instruction, input, output, domain, task, lang`` plus, for closed
tasks, ``choices`` and ``answer`` (a letter for multiple choice, else one of the choices) and, for judged general
sets, ``category``. ``meta`` carries provenance (for example which model and sampling produced a distilled answer).

A multi-turn row (OpenAI ``messages`` with role/content, or ShareGPT ``conversations`` with from/value) becomes the
same record: its last user turn is ``instruction``, the assistant turn answering it is ``output``, and the earlier
exchanges are ``history``, so every consumer that answers or scores "the question" keeps working. The row's own
system message is kept in ``system`` but never rendered: the strategy's prompt (p_c or p_i) owns the system slot.
A row without ``lang`` (and a source without one) gets it from its text, see :func:`detect_lang`.
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
    # The earlier (user, assistant) exchanges of a conversation, oldest first; () for a single-turn record.
    history: tuple[tuple[str, str], ...] = ()
    system: str | None = None  # the conversation's own system message (dropped: the strategy's prompt wins)

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

    @property
    def is_conversation(self) -> bool:
        return bool(self.history) or self.system is not None

    def messages(self) -> list[dict[str, str]]:
        """The record as OpenAI messages (its own system message first, if any; no assistant turn if no output)."""
        out = [{"role": "system", "content": self.system}] if self.system is not None else []
        for user, assistant in self.history:
            out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        out.append({"role": "user", "content": self.user_text})
        if self.output:
            out.append({"role": "assistant", "content": self.output})
        return out

    def to_dict(self) -> dict[str, Any]:
        # A conversation is written as messages, so that reading it back gives the same record.
        texts = (
            {"messages": self.messages()}
            if self.is_conversation
            else {"instruction": self.instruction, "input": self.input, "output": self.output}
        )
        row: dict[str, Any] = {
            "id": self.id,
            **texts,
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
    error, since it almost always means the wrong file was given for a domain. Without either ``lang``, the
    language is detected from the row's user turns.
    """
    if not isinstance(obj, Mapping):
        raise RecordError(where, None, f"expected a JSON object, got {type(obj).__name__}")
    rid = _record_id(obj, where, default_id)
    texts = _texts(obj, where, require_output)
    final_domain = _domain(obj, where, domain, allowed_domains)
    choices, answer = _closed(obj, where)
    meta = obj.get("meta")
    if meta is not None and not isinstance(meta, Mapping):
        raise RecordError(where, "meta", "expected an object")
    user_side = [texts["instruction"], texts["input"], *(u for u, _ in texts["history"])]
    return Record(
        id=rid,
        **texts,
        domain=final_domain,
        task=_text(obj, "task", where, required=False) or task or final_domain,
        lang=_text(obj, "lang", where, required=False) or lang or detect_lang(user_side, where),
        choices=choices,
        answer=answer,
        category=_text(obj, "category", where, required=False) or None,
        meta=meta,
        origin=where,
    )


def _record_id(obj: Mapping, where: str, default_id: str | None) -> str:
    rid = obj.get("id", default_id)
    if isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    if rid is None:
        raise RecordError(where, "id", "missing")
    if not isinstance(rid, str) or not rid.strip():
        raise RecordError(where, "id", f"expected a non-empty string, got {rid!r:.60}")
    return rid


def _texts(obj: Mapping, where: str, require_output: bool) -> dict[str, Any]:
    """instruction, input, output, history and system of a single-turn row or a conversation."""
    key = next((k for k in CONVERSATION_FIELDS if obj.get(k) is not None), None)
    if key is not None:
        both = [name for name in ("instruction", "input", "output") if obj.get(name)]
        if both:
            raise RecordError(where, key, f"given together with {both[0]!r}: a row is a conversation or not")
        return conversation_texts(obj[key], key, where, require_output)
    instruction = _text(obj, "instruction", where, required=True)
    if not instruction.strip():
        raise RecordError(where, "instruction", "is empty")
    output = _text(obj, "output", where, required=require_output)
    if require_output and not output.strip():
        raise RecordError(where, "output", "is empty (a training record needs a response)")
    return {
        "instruction": instruction,
        "input": _text(obj, "input", where, required=False),
        "output": output,
        "history": (),
        "system": None,
    }


def _domain(obj: Mapping, where: str, domain: str | None, allowed: frozenset[str] | None) -> str:
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
    if allowed is not None and final_domain not in allowed:
        known = ", ".join(sorted(allowed))
        raise RecordError(where, "domain", f"unknown domain {final_domain!r} (configured: {known})")
    return final_domain


def _closed(obj: Mapping, where: str) -> tuple[tuple[str, ...] | None, str | None]:
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
    return choices, answer


# --- conversations ---------------------------------------------------------------------------------------
CONVERSATION_FIELDS = ("messages", "conversations")  # OpenAI (role/content), ShareGPT (from/value)
ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
}


def _turns(turns: Any, key: str, where: str) -> list[tuple[str, str]]:
    """(role, text) of every turn, roles normalised; either key pair is read in either format."""
    if not isinstance(turns, list | tuple) or not turns:
        raise RecordError(where, key, "expected a non-empty list of turns")
    out = []
    for k, turn in enumerate(turns):
        name = f"{key}[{k}]"
        if not isinstance(turn, Mapping):
            raise RecordError(where, name, f"expected an object, got {type(turn).__name__}")
        role = turn.get("role", turn.get("from"))
        if role not in ROLES:
            known = ", ".join(ROLES)
            raise RecordError(where, name, f"unknown role {role!r} (known: {known})")
        text = turn.get("content", turn.get("value"))
        if not isinstance(text, str) or not text.strip():
            raise RecordError(where, name, f"the {ROLES[role]} turn has no text (got {text!r:.60})")
        out.append((ROLES[role], text))
    return out


def conversation_texts(turns: Any, key: str, where: str, require_output: bool) -> dict[str, Any]:
    """A conversation as record texts: an optional leading system turn, then user and assistant turns taking
    turns, starting with the user. The last user turn is the instruction, its answer (if any) the output."""
    parsed = _turns(turns, key, where)
    system = parsed.pop(0)[1] if parsed[0][0] == "system" else None
    if not parsed:
        raise RecordError(where, key, "has a system message but no user turn")
    offset = len(turns) - len(parsed)
    for k, (role, _) in enumerate(parsed):
        expected = "user" if k % 2 == 0 else "assistant"
        if role != expected:
            raise RecordError(
                where, f"{key}[{k + offset}]", f"role {role!r} where {expected!r} belongs"
                " (one optional system turn first, then user and assistant alternate, starting with the user)",
            )  # fmt: skip
    if require_output and parsed[-1][0] != "assistant":
        raise RecordError(where, key, "ends with a user turn (a training record needs an answer)")
    if parsed[-1][0] == "user":
        parsed.append(("assistant", ""))
    pairs = [(parsed[i][1], parsed[i + 1][1]) for i in range(0, len(parsed), 2)]
    instruction, output = pairs.pop()
    return {
        "instruction": instruction,
        "input": "",
        "output": output,
        "history": tuple(pairs),
        "system": system,
    }


# --- language --------------------------------------------------------------------------------------------
HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
LATIN_WORD = re.compile(r"[A-Za-z]+")
# On the shared data (user turns): Chinese sets have >= 31 % (cmedtc lists 44 English labels), English <= 2.5 %.
ZH_MIN_SHARE, EN_MAX_SHARE = 0.25, 0.05


def han_share(text: str) -> float | None:
    """Chinese characters / (Chinese characters + Latin words); None when the text has neither. A character and
    a word are counted alike because each carries about one word of meaning."""
    han, words = len(HAN.findall(text)), len(LATIN_WORD.findall(text))
    return han / (han + words) if han + words else None


def detect_lang(user_texts: list[str], where: str) -> str:
    """``zh`` or ``en`` from the user turns (what is asked decides; answers quote code and terms), refused when
    neither script clearly dominates."""
    share = han_share("\n".join(user_texts))
    if share is None:
        raise RecordError(
            where, "lang", "cannot tell the language (no letters, no Chinese characters): set lang"
        )
    if share >= ZH_MIN_SHARE:
        return "zh"
    if share <= EN_MAX_SHARE:
        return "en"
    raise RecordError(
        where, "lang", f"neither English nor Chinese dominates ({share:.0%} Chinese characters among Chinese "
        f"characters and Latin words; zh needs >= {ZH_MIN_SHARE:.0%}, en <= {EN_MAX_SHARE:.0%}): set lang",
    )  # fmt: skip


def check_unique_ids(records: list[Record]) -> None:
    seen: dict[str, str] = {}
    for rec in records:
        if rec.id in seen:
            raise RecordError(rec.origin, "id", f"duplicate id {rec.id!r} (first seen at {seen[rec.id]})")
        seen[rec.id] = rec.origin
