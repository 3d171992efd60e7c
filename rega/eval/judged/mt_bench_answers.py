"""MT-Bench answers, FastChat's way (``fastchat/llm_judge/gen_model_answer.py``): per-category temperature
(:data:`TEMPERATURE_CONFIG`; temperature 0 means greedy), the second turn generated with the model's own first
answer in the conversation, rows in FastChat's ``model_answer`` JSONL format (``question_id, answer_id, model_id,
choices[{index, turns}], tstamp``). The conversation is rendered with the evaluated model's own chat template (with
the evaluation's system prompt: p_c or a role prompt) instead of FastChat's conversation table.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence

log = logging.getLogger(__name__)

# FastChat llm_judge/common.py
TEMPERATURE_CONFIG = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
    "arena-hard-200": 0.0,
}
DEFAULT_TEMPERATURE = 0.7  # FastChat's fallback for a category outside the table
GREEDY_BELOW = 1e-4  # FastChat: temperature < 1e-4 means greedy decoding


# -- multi-turn rendering with the evaluated model's chat template -------------------------------------------


def render_conversation(chat_format, system: str, users: Sequence[str], assistants: Sequence[str]) -> str:
    """Text of a conversation ending where the next answer starts: ``len(assistants) == len(users) - 1``.

    Uses the tokenizer's chat template (system prompt in the system slot, or prefixed to the first user turn for
    templates without one, like :class:`rega.data.chat.ChatFormat`), or the named template's turn format.
    """
    if len(assistants) != len(users) - 1:
        raise ValueError("a conversation to continue has one assistant turn fewer than user turns")
    if chat_format.named is not None:
        # Named templates are plain text: first turn with the system prompt, later turns without it.
        text = chat_format.prompt_text(system, users[0])
        for answer, user in zip(assistants, users[1:]):
            text += chat_format.named.response.format(
                response=answer, eos=chat_format.tokenizer.eos_token or ""
            )
            text += chat_format.prompt_text("", user)
        return text
    messages = []
    first = users[0]
    if chat_format.use_system_slot:
        # Passed even when empty, so templates with a built-in default do not insert theirs.
        messages.append({"role": "system", "content": system})
    elif system:
        first = f"{system}\n\n{first}"
    messages.append({"role": "user", "content": first})
    for answer, user in zip(assistants, users[1:]):
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": user}]
    return chat_format.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_conversation(
    chat_format, system: str, users: Sequence[str], assistants: Sequence[str]
) -> list[int]:
    text = render_conversation(chat_format, system, users, assistants)
    tokenizer = chat_format.tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # As ChatFormat does: named (plain-text) templates get the BOS token the model was trained with.
    if chat_format.named and tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", True):
        ids = [tokenizer.bos_token_id, *ids]
    return ids


# -- answer generation ---------------------------------------------------------------------------------------


def _generate_grouped(model, tokenizer, prompts, temperatures, max_new_tokens, batch_size, seed):
    """One batched ``generate`` pass per distinct temperature; results in prompt order."""
    from rega.config import SamplingConfig
    from rega.modules.generation import generate

    groups: dict[float, list[int]] = defaultdict(list)
    for index, temperature in enumerate(temperatures):
        groups[temperature].append(index)
    results = [None] * len(prompts)
    for temperature, indices in sorted(groups.items()):
        greedy = temperature < GREEDY_BELOW
        sampling = SamplingConfig(
            do_sample=not greedy,
            temperature=1.0 if greedy else temperature,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            seed=seed,
        )
        for gen in generate(model, tokenizer, [prompts[i] for i in indices], sampling, batch_size=batch_size):
            results[indices[gen.index]] = gen
    return results


def generate_answers(
    model,
    tokenizer,
    chat_format,
    system_prompt: str,
    questions: Sequence[dict],
    *,
    model_id: str = "rega",
    max_new_tokens: int = 1024,
    batch_size: int = 8,
    seed: int = 42,
    temperature: float | None = None,
) -> list[dict]:
    """FastChat ``model_answer`` rows; every turn is generated for all questions at once, in batches.

    ``temperature`` overrides the per-category table (``None``: FastChat's :data:`TEMPERATURE_CONFIG`).
    """
    temps = [
        temperature
        if temperature is not None
        else TEMPERATURE_CONFIG.get(q.get("category", ""), DEFAULT_TEMPERATURE)
        for q in questions
    ]
    answers: list[list[str]] = [[] for _ in questions]
    finish: list[list[str]] = [[] for _ in questions]
    max_turns = max(len(q["turns"]) for q in questions) if questions else 0
    for turn in range(max_turns):
        active = [i for i, q in enumerate(questions) if len(q["turns"]) > turn]
        prompts = [
            encode_conversation(chat_format, system_prompt, questions[i]["turns"][: turn + 1], answers[i])
            for i in active
        ]
        gens = _generate_grouped(
            model, tokenizer, prompts, [temps[i] for i in active], max_new_tokens, batch_size, seed + turn
        )
        for i, gen in zip(active, gens):
            answers[i].append(gen.text)
            finish[i].append(gen.finish_reason)
        log.info(
            "MT-Bench turn %d: %d answers (%d hit max_new_tokens)",
            turn + 1,
            len(active),
            sum(g.finish_reason == "length" for g in gens),
        )
    now = time.time()
    return [
        {
            "question_id": q["question_id"],
            "answer_id": uuid.uuid4().hex[:22],
            "model_id": model_id,
            "choices": [{"index": 0, "turns": answers[i]}],
            "tstamp": now,
        }
        for i, q in enumerate(questions)
    ]
