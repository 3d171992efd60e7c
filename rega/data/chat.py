"""Render (prompt, user, response) with a model's chat template and tokenize with response-only labels.

The prompt (p_c or a role prompt p_i) goes into the template's system slot, or is prefixed to the (first) user turn
for templates without one. Tokenizers without a chat template get the exact format their model was tuned with as a
named template (Vicuna v1.1, BELLE).

A conversation (earlier (user, assistant) exchanges as ``history``) is rendered as segments: the text before each
answer, then the answer with its end-of-turn. Segments are tokenized one by one, so the labels cover every answer
and nothing else, and a single exchange gives exactly the tokens of ``prompt + response``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rega.errors import ConfigError

IGNORE_INDEX = -100
History = Sequence[tuple[str, str]]  # earlier (user, assistant) exchanges, oldest first
_SENTINEL = "\u2063REGA_SYSTEM\u2063"


@dataclass(frozen=True)
class NamedTemplate:
    default_system: str | None  # the system prompt the model was tuned with, None if it had none
    prompt: str  # with {system} (optional) and {user}; ends where the answer starts
    response: str  # with {response} and {eos}
    has_system: bool


NAMED_TEMPLATES = {
    # FastChat's vicuna_v1.1: "<system> USER: <msg> ASSISTANT: <reply></s>"
    "vicuna_v1.1": NamedTemplate(
        default_system=(
            "A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions."
        ),
        prompt="{system} USER: {user} ASSISTANT:",
        response=" {response}{eos}",
        has_system=True,
    ),
    # BELLE: "Human: <msg>\n\nAssistant: <reply></s>", no system prompt.
    "belle": NamedTemplate(
        default_system=None,
        prompt="Human: {user}\n\nAssistant:",
        response=" {response}{eos}",
        has_system=False,
    ),
}


@dataclass
class Encoded:
    input_ids: list[int]
    spans: list[tuple[int, int]]  # the supervised [start, end) runs: the answers, in order
    truncated: bool

    @property
    def labels(self) -> list[int]:
        """Per-token labels: the id on an answer token, IGNORE_INDEX elsewhere."""
        labels = [IGNORE_INDEX] * len(self.input_ids)
        for start, end in self.spans:
            labels[start:end] = self.input_ids[start:end]
        return labels


class ChatFormat:
    """Chat rendering for one tokenizer; ``template`` names a :data:`NAMED_TEMPLATES` entry to override it."""

    def __init__(self, tokenizer, template: str | None = None, system_placement: str = "auto"):
        if system_placement not in ("auto", "system", "prefix"):
            raise ConfigError(f"system_placement must be auto, system or prefix, got {system_placement!r}")
        self.tokenizer = tokenizer
        self.template, self.system_placement = template, system_placement
        self.named = None
        if template is not None:
            if template not in NAMED_TEMPLATES:
                raise ConfigError(
                    f"unknown chat template {template!r}; named templates: {', '.join(NAMED_TEMPLATES)}"
                )
            self.named = NAMED_TEMPLATES[template]
        elif not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "the tokenizer has no chat template: set model.chat_template to one of "
                + ", ".join(NAMED_TEMPLATES)
            )
        has_slot = self.named.has_system if self.named else self._template_has_system_slot()
        if system_placement == "system" and not has_slot:
            raise ConfigError("system_placement=system but this chat template has no system slot")
        self.use_system_slot = has_slot if system_placement == "auto" else system_placement == "system"
        self.default_system = self.named.default_system if self.named else self._template_default_system()

    def _render_hf(self, messages: list[dict], generation: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    def _template_has_system_slot(self) -> bool:
        try:
            text = self._render_hf(
                [{"role": "system", "content": _SENTINEL}, {"role": "user", "content": "x"}], True
            )
        except Exception:  # templates without a system role raise
            return False
        return _SENTINEL in text

    def _template_default_system(self) -> str | None:
        """The system text a template inserts when none is given (SmolLM2, Qwen, ...), found by comparison."""
        if not self._template_has_system_slot():
            return None
        with_sys = self._render_hf(
            [{"role": "system", "content": _SENTINEL}, {"role": "user", "content": "x"}], True
        )
        without = self._render_hf([{"role": "user", "content": "x"}], True)
        head, tail = with_sys.split(_SENTINEL, 1)
        if without.startswith(head) and without.endswith(tail) and len(without) > len(head) + len(tail):
            return without[len(head) : len(without) - len(tail)]
        return None

    def prompt_text(self, system: str, user: str, history: History = ()) -> str:
        """Everything before the answer: what generation starts from."""
        if history:
            return "".join(text for text, _ in self.segments(system, history, user))
        if not self.named:
            return self._render_hf(self._messages(system, (), user), generation=True)
        if not self.use_system_slot and system:
            user = f"{system}\n\n{user}"
        text = self.named.prompt.format(system=system if self.use_system_slot else "", user=user)
        return text.lstrip() if not (self.use_system_slot and system) else text

    def _messages(self, system: str, history: History, user: str) -> list[dict]:
        """HF messages: the system slot (or the prompt prefixed to the first user turn), then the exchanges."""
        turns = [*history, (user, None)]
        first = f"{system}\n\n{turns[0][0]}" if (system and not self.use_system_slot) else turns[0][0]
        # The system message is passed even when empty, so templates with a built-in default do not insert theirs.
        messages = [{"role": "system", "content": system}] if self.use_system_slot else []
        for k, (question, answer) in enumerate(turns):
            messages.append({"role": "user", "content": first if k == 0 else question})
            if answer is not None:
                messages.append({"role": "assistant", "content": answer})
        return messages

    def segments(
        self, system: str, history: History, user: str, response: str | None = None
    ) -> list[tuple[str, bool]]:
        """(text, is_answer) pieces whose concatenation is the rendered conversation: before each answer the text
        that leads to it, each answer with its end-of-turn; without ``response`` it ends at the last prompt."""
        if self.named:
            return self._named_segments(system, [*history, (user, response)])
        messages = self._messages(system, history, user)
        if response is not None:
            messages.append({"role": "assistant", "content": response})
        ends = [j for j, m in enumerate(messages) if m["role"] == "assistant"]
        out: list[tuple[str, bool]] = []
        done = ""
        for j in ends if response is not None else [*ends, len(messages)]:
            prompt = self._render_hf(messages[:j], generation=True)
            if not prompt.startswith(done):
                raise ConfigError(
                    "chat template renders earlier turns differently later; set model.chat_template"
                )
            out.append((prompt[len(done) :], False))
            if j == len(messages):
                break
            done = self._render_hf(messages[: j + 1], generation=False)
            if not done.startswith(prompt):
                raise ConfigError(
                    "chat template renders the prompt differently with and without the answer; set model.chat_template"
                )
            out.append((done[len(prompt) :], True))
        return out

    def _named_segments(self, system: str, exchanges: list[tuple[str, str | None]]) -> list[tuple[str, bool]]:
        # FastChat-style: later turns repeat the user/answer pattern without the system text.
        out = [(self.prompt_text(system, exchanges[0][0]), False)]
        for k, (question, answer) in enumerate(exchanges):
            if k:
                out.append((self.named.prompt.format(system="", user=question).lstrip(), False))
            if answer is not None:
                out.append(
                    (self.named.response.format(response=answer, eos=self.tokenizer.eos_token or ""), True)
                )
        return out

    def response_text(self, system: str, user: str, response: str, prompt: str | None = None) -> str:
        """The answer as the template writes it after the prompt (with its end-of-turn tokens)."""
        if self.named:
            return self.named.response.format(response=response, eos=self.tokenizer.eos_token or "")
        prompt = prompt if prompt is not None else self.prompt_text(system, user)
        messages = [*self._messages(system, (), user), {"role": "assistant", "content": response}]
        full = self._render_hf(messages, generation=False)
        if not full.startswith(prompt):
            raise ConfigError(
                "chat template renders the prompt differently with and without the answer; set model.chat_template"
            )
        return full[len(prompt) :]

    def encode_many(
        self, items: Sequence[tuple], max_length: int, min_response_tokens: int = 8
    ) -> list[Encoded | None]:
        """Encode (system, user, response) or (system, user, response, history) items; texts are tokenized in
        batched calls, one segment at a time (see :meth:`segments`).

        Truncation policy: the first prompt is kept whole (it carries the role prompt and the answer marker); the
        rest is cut at ``max_length``, and a conversation cut inside a later user turn ends at the answer before
        it. When fewer than ``min_response_tokens`` tokens of the first answer would remain, the example is
        dropped (``None``). The caller counts both cases.
        """
        pieces = [self.segments(it[0], it[3] if len(it) > 3 else (), it[1], it[2]) for it in items]
        firsts = self._ids_many([segs[0][0] for segs in pieces], bos=True)
        rest = iter(self._ids_many([text for segs in pieces for text, _ in segs[1:]], bos=False))
        out = []
        for segs, first in zip(pieces, firsts):
            ids = [first, *(next(rest) for _ in segs[1:])]
            out.append(
                _fit(
                    [(part, answer) for part, (_, answer) in zip(ids, segs)], max_length, min_response_tokens
                )
            )
        return out

    def encode_prompt(self, system: str, user: str, history: History = ()) -> list[int]:
        """The ids generation starts from; a conversation's are tokenized segment by segment, as in training."""
        if not history:
            return self._ids(self.prompt_text(system, user), bos=True)
        texts = [text for text, _ in self.segments(system, history, user)]
        return [t for k, text in enumerate(texts) for t in self._ids(text, bos=k == 0)]

    def _ids(self, text: str, bos: bool) -> list[int]:
        return self._ids_many([text], bos)[0]

    def _ids_many(self, texts: list[str], bos: bool) -> list[list[int]]:
        if not texts:
            return []
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        # Named templates are plain text: add BOS the way the model saw it (LLaMA tokenizers).
        if (
            bos
            and self.named
            and self.tokenizer.bos_token_id is not None
            and getattr(self.tokenizer, "add_bos_token", True)
        ):
            ids = [[self.tokenizer.bos_token_id, *row] for row in ids]
        return ids


def _fit(parts: list[tuple[list[int], bool]], max_length: int, min_response_tokens: int) -> Encoded | None:
    """Join (ids, is_answer) parts into ids and answer spans, cut to ``max_length`` (see ``encode_many``)."""
    start = len(parts[0][0])  # the first answer starts after the first prompt
    first_answer = len(parts[1][0]) if len(parts) > 1 else 0
    if max_length - start < min(min_response_tokens, first_answer):
        return None
    input_ids = [t for ids, _ in parts for t in ids]
    spans = _answer_spans(parts, max_length)
    end = max(start, spans[-1][1]) if spans else start  # no trailing unanswered user turn
    return Encoded(input_ids[:end], spans, truncated=len(input_ids) > max_length)


def _answer_spans(parts: list[tuple[list[int], bool]], max_length: int) -> list[tuple[int, int]]:
    """The [start, end) runs of answer tokens within the first ``max_length`` tokens (touching runs joined)."""
    spans: list[tuple[int, int]] = []
    pos = 0
    for ids, answer in parts:
        end = min(pos + len(ids), max_length)
        if answer and end > pos:
            if spans and spans[-1][1] == pos:
                spans[-1] = (spans[-1][0], end)
            else:
                spans.append((pos, end))
        pos += len(ids)
    return spans
