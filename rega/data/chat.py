"""Render (prompt, user, response) with a model's chat template and tokenize with response-only labels.

The prompt (p_c or a role prompt p_i) goes into the template's system slot, or is prefixed to the user turn for
templates without one. Tokenizers without a chat template get the exact format their model was tuned with as a
named template (Vicuna v1.1, BELLE).
"""

from __future__ import annotations

from dataclasses import dataclass

from rega.data.prompts import ConfigError

IGNORE_INDEX = -100
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
    labels: list[int]
    truncated: bool


class ChatFormat:
    """Chat rendering for one tokenizer; ``template`` names a :data:`NAMED_TEMPLATES` entry to override it."""

    def __init__(self, tokenizer, template: str | None = None, system_placement: str = "auto"):
        if system_placement not in ("auto", "system", "prefix"):
            raise ConfigError(f"system_placement must be auto, system or prefix, got {system_placement!r}")
        self.tokenizer = tokenizer
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

    def prompt_text(self, system: str, user: str) -> str:
        """Everything before the answer: what generation starts from."""
        if not self.use_system_slot and system:
            user = f"{system}\n\n{user}"
        if self.named:
            text = self.named.prompt.format(system=system if self.use_system_slot else "", user=user)
            return text.lstrip() if not (self.use_system_slot and system) else text
        messages = [{"role": "user", "content": user}]
        if self.use_system_slot:
            # Passed even when empty, so templates with a built-in default do not insert theirs.
            messages.insert(0, {"role": "system", "content": system})
        return self._render_hf(messages, generation=True)

    def response_text(self, system: str, user: str, response: str, prompt: str | None = None) -> str:
        """The answer as the template writes it after the prompt (with its end-of-turn tokens)."""
        if self.named:
            return self.named.response.format(response=response, eos=self.tokenizer.eos_token or "")
        prompt = prompt if prompt is not None else self.prompt_text(system, user)
        messages = [
            {
                "role": "user",
                "content": f"{system}\n\n{user}" if (system and not self.use_system_slot) else user,
            }
        ]
        if self.use_system_slot:
            messages.insert(0, {"role": "system", "content": system})
        full = self._render_hf([*messages, {"role": "assistant", "content": response}], generation=False)
        if not full.startswith(prompt):
            raise ConfigError(
                "chat template renders the prompt differently with and without the answer; set model.chat_template"
            )
        return full[len(prompt) :]

    def encode(
        self, system: str, user: str, response: str, max_length: int, min_response_tokens: int = 8
    ) -> Encoded | None:
        """Token ids with labels = -100 on every prompt token (see :meth:`encode_many`)."""
        return self.encode_many([(system, user, response)], max_length, min_response_tokens)[0]

    def encode_many(
        self, items: list[tuple[str, str, str]], max_length: int, min_response_tokens: int = 8
    ) -> list[Encoded | None]:
        """Encode (system, user, response) triples; texts are tokenized in batched calls.

        Truncation policy: the prompt is kept whole (it carries the role prompt and the answer marker); the
        response is cut at its end to fit ``max_length``. When fewer than ``min_response_tokens`` answer tokens
        would remain, the example is dropped (``None``). The caller counts both cases.
        """
        prompts = [self.prompt_text(system, user) for system, user, _ in items]
        responses = [self.response_text(s, u, r, p) for (s, u, r), p in zip(items, prompts)]
        prompt_ids = self._ids_many(prompts, bos=True)
        response_ids = self._ids_many(responses, bos=False)
        out: list[Encoded | None] = []
        for p_ids, r_ids in zip(prompt_ids, response_ids):
            room = max_length - len(p_ids)
            if room < min(min_response_tokens, len(r_ids)):
                out.append(None)
                continue
            out.append(
                Encoded(p_ids + r_ids[:room], [IGNORE_INDEX] * len(p_ids) + r_ids[:room], len(r_ids) > room)
            )
        return out

    def encode_prompt(self, system: str, user: str) -> list[int]:
        return self._ids(self.prompt_text(system, user), bos=True)

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
