"""MT-Bench: two-turn answers from the model under evaluation, graded 1-10 by an LLM judge, FastChat's way.

Data (FastChat's files, unchanged): ``question.jsonl`` (80 two-turn questions in 8 categories),
``judge_prompts.jsonl`` and ``reference_answer/gpt-4.jsonl``. The public source is
https://github.com/lm-sys/FastChat/tree/main/fastchat/llm_judge/data (``mt_bench/question.jsonl``,
``mt_bench/reference_answer/gpt-4.jsonl``, and ``judge_prompts.jsonl`` one folder up); download those three files
and pass the question file's path. In this project they are at ``shared:mt_bench/``.

What follows FastChat exactly (``fastchat/llm_judge/gen_model_answer.py``, ``common.py``, ``show_result.py``):

* answers: per-category temperature (:data:`TEMPERATURE_CONFIG`; temperature 0 means greedy), the second turn is
  generated with the model's own first answer in the conversation, answers saved in FastChat's ``model_answer``
  JSONL format (``question_id, answer_id, model_id, choices[{index, turns}], tstamp``);
* grading: single-answer prompts ``single-v1`` / ``single-v1-multi-turn``, and the reference-guided
  ``single-math-v1`` / ``single-math-v1-multi-turn`` for math, reasoning and coding; system prompt + user prompt
  as chat messages; temperature 0, max_tokens 2048; rating from ``[[x]]`` with ``[x]`` as fallback;
* scores: turn 1, turn 2, and overall = the mean over every judged turn.

Two deliberate differences: an unparsable rating is stored as ``"score": null`` (FastChat writes -1) and is left
out of every mean and counted as missing; and the conversation is rendered with the evaluated model's own chat
template (with the evaluation's system prompt: p_c or a role prompt) instead of FastChat's conversation table.

:func:`validate_judge_pipeline` checks the prompt building and rating parsing against published GPT-4 judgments.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rega.errors import ConfigError, EmptyDataError, JudgeError, UserError
from rega.eval.judge import JudgeClient, JudgeConfig, load_judge_config
from rega.eval.ratings import chat_messages, first_error, missing_problem, parse_bracket_rating, summarize
from rega.io import read_jsonl, write_json, write_jsonl
from rega.paths import resolve_path

log = logging.getLogger(__name__)

FASTCHAT_SOURCE = "https://github.com/lm-sys/FastChat/tree/main/fastchat/llm_judge/data"
DEFAULT_QUESTIONS = "shared:mt_bench/question.jsonl"

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
NEED_REF_CATS = ("math", "reasoning", "coding", "arena-hard-200")
DEFAULT_TEMPERATURE = 0.7  # FastChat's fallback for a category outside the table
GREEDY_BELOW = 1e-4  # FastChat: temperature < 1e-4 means greedy decoding
RATING_RANGE = (1.0, 10.0)


# -- files ------------------------------------------------------------------------------------------------


def load_questions(path: str | os.PathLike = DEFAULT_QUESTIONS) -> list[dict]:
    """FastChat ``question.jsonl``: ``question_id``, ``category``, ``turns`` (list of user messages)."""
    resolved = resolve_path(path)
    if not resolved.exists():
        raise FileNotFoundError(
            f"MT-Bench questions {path} not found (resolved to {resolved}); get them from {FASTCHAT_SOURCE}"
        )
    questions = read_jsonl(resolved)
    if not questions:
        raise EmptyDataError(f"MT-Bench question file {resolved} holds no questions")
    for lineno, q in enumerate(questions, start=1):
        turns = q.get("turns")
        if (
            "question_id" not in q
            or not isinstance(turns, list)
            or not turns
            or not all(isinstance(t, str) for t in turns)
        ):
            raise ConfigError(
                f"{resolved}:{lineno}: expected question_id, category and a non-empty list of turns"
            )
    return questions


def load_model_answers(path: str | os.PathLike) -> dict:
    """FastChat ``model_answer/<model>.jsonl`` as ``{question_id: row}`` (a later row replaces an earlier one)."""
    return {row["question_id"]: row for row in read_jsonl(resolve_path(path))}


def load_judge_prompts(path: str | os.PathLike) -> dict[str, dict]:
    return {row["name"]: row for row in read_jsonl(resolve_path(path))}


def find_beside(questions_path: str | os.PathLike, name: str) -> Path | None:
    """``name`` next to the question file or one folder up (FastChat keeps judge_prompts.jsonl there)."""
    folder = resolve_path(questions_path).parent
    for candidate in (folder / name, folder.parent / name):
        if candidate.exists():
            return candidate
    return None


def answer_turns(answer_row: dict) -> list[str]:
    return answer_row["choices"][0]["turns"]


# -- judge prompts (pure) ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgePrompt:
    name: str  # which FastChat judge prompt was used
    system: str
    user: str

    @property
    def messages(self) -> list[dict]:
        return chat_messages(self.system, self.user)


def judge_prompt_name(category: str, turn: int, has_reference: bool = True) -> str:
    math = category in NEED_REF_CATS and has_reference
    name = "single-math-v1" if math else "single-v1"
    return f"{name}-multi-turn" if turn == 2 else name


def build_judge_prompt(
    question: dict,
    answers: Sequence[str],
    turn: int,
    judge_prompts: dict[str, dict],
    reference: Sequence[str] | None = None,
) -> JudgePrompt:
    """The single-answer judge prompt for ``turn`` (1 or 2), built exactly as FastChat's ``run_judge_single``."""
    if turn not in (1, 2):
        raise ValueError(f"MT-Bench turns are 1 or 2, got {turn}")
    name = judge_prompt_name(question.get("category", ""), turn, has_reference=reference is not None)
    template = judge_prompts[name]
    kwargs = {}
    if "math" in name:
        kwargs["ref_answer_1"] = reference[0]
        if turn == 2:
            kwargs["ref_answer_2"] = reference[1]
    if turn == 2:
        user = template["prompt_template"].format(
            question_1=question["turns"][0],
            question_2=question["turns"][1],
            answer_1=answers[0],
            answer_2=answers[1],
            **kwargs,
        )
    else:
        user = template["prompt_template"].format(question=question["turns"][0], answer=answers[0], **kwargs)
    return JudgePrompt(name=name, system=template["system_prompt"], user=user)


def parse_rating(judgment: str | None) -> float | None:
    """FastChat's rule (``[[x]]``, then ``[x]``); None when absent or outside 1-10."""
    return parse_bracket_rating(judgment, *RATING_RANGE)


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


# -- grading -------------------------------------------------------------------------------------------------


def build_judge_jobs(
    questions: Sequence[dict],
    answers: dict,
    judge_prompts: dict[str, dict],
    references: dict | None,
) -> list[dict]:
    """One job per (question, turn) with an answer: question_id, category, turn, and the judge prompt."""
    jobs = []
    missing_refs = set()
    for q in questions:
        row = answers.get(q["question_id"])
        if row is None:
            continue
        turns = answer_turns(row)
        ref_row = (references or {}).get(q["question_id"])
        reference = answer_turns(ref_row) if ref_row else None
        if q.get("category") in NEED_REF_CATS and reference is None:
            missing_refs.add(q["question_id"])
        for turn in (1, 2):
            if len(q["turns"]) < turn or len(turns) < turn:
                continue
            prompt = build_judge_prompt(q, turns, turn, judge_prompts, reference)
            jobs.append(
                {
                    "question_id": q["question_id"],
                    "category": q.get("category"),
                    "turn": turn,
                    "prompt": prompt,
                }
            )
    if missing_refs:
        log.warning(
            "MT-Bench: no reference answer for %d reference-guided questions (%s); graded with single-v1 instead",
            len(missing_refs),
            sorted(missing_refs)[:10],
        )
    return jobs


def judge_answers(
    questions: Sequence[dict],
    answers: dict,
    client: JudgeClient,
    judge_prompts: dict[str, dict],
    references: dict | None,
    model_id: str,
) -> list[dict]:
    """FastChat ``model_judgment`` rows (single-answer grading); ``score`` is None when missing."""
    jobs = build_judge_jobs(questions, answers, judge_prompts, references)
    replies = client.complete_many([job["prompt"].messages for job in jobs])
    now = time.time()
    rows = []
    for job, reply in zip(jobs, replies):
        row = {
            "question_id": job["question_id"],
            "model": model_id,
            "judge": [client.config.model, job["prompt"].name],
            "user_prompt": job["prompt"].user,
            "judgment": reply.content if reply.content is not None else "",
            "score": parse_rating(reply.content),
            "turn": job["turn"],
            "tstamp": now,
            "category": job["category"],
        }
        if reply.error:
            row["error"] = reply.error
        rows.append(row)
    return rows


def score_judgments(judgments: Iterable[dict], categories: dict | None = None) -> dict:
    """Turn-1, turn-2, overall (all judged turns, as FastChat) and per-category means, each with missing counts.

    A row's score of None or -1 (FastChat's marker) counts as missing. ``categories`` maps question_id to
    category for rows without one.
    """
    rows = list(judgments)

    def score(row):
        value = row.get("score")
        return None if value is None or value == -1 else float(value)

    def category(row):
        return row.get("category") or (categories or {}).get(row["question_id"]) or "unknown"

    by_cat: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_cat[category(row)].append(row)
    per_category = {}
    for cat in sorted(by_cat):
        cat_rows = by_cat[cat]
        per_category[cat] = {
            **summarize(score(r) for r in cat_rows),
            "turn_1": summarize(score(r) for r in cat_rows if r["turn"] == 1)["mean"],
            "turn_2": summarize(score(r) for r in cat_rows if r["turn"] == 2)["mean"],
        }
    return {
        "turn_1": summarize(score(r) for r in rows if r["turn"] == 1),
        "turn_2": summarize(score(r) for r in rows if r["turn"] == 2),
        "overall": summarize(score(r) for r in rows),
        "per_category": per_category,
    }


def _missing_scores(questions: Sequence[dict]) -> dict:
    """The score block of a run without a judge: every turn missing."""
    judgments = [
        {"question_id": q["question_id"], "category": q.get("category"), "turn": t, "score": None}
        for q in questions
        for t in (1, 2)
        if len(q["turns"]) >= t
    ]
    return score_judgments(judgments)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def run_mt_bench(
    model,
    tokenizer,
    chat_format,
    system_prompt: str,
    judge: JudgeConfig | None,
    questions_path: str | os.PathLike = DEFAULT_QUESTIONS,
    output_dir: str | os.PathLike = "mt_bench",
    *,
    model_id: str = "rega",
    judge_prompts_path: str | os.PathLike | None = None,
    reference_path: str | os.PathLike | None = None,
    question_ids: Sequence[int] | None = None,
    limit: int | None = None,
    max_new_tokens: int = 1024,
    batch_size: int = 8,
    seed: int = 42,
    reuse_answers: bool = False,
    judge_client: JudgeClient | None = None,
) -> dict:
    """Generate MT-Bench answers and (when ``judge`` is given) grade them; returns a JSON-serialisable dict.

    Writes, FastChat's layout, under ``output_dir``: ``model_answer/<model_id>.jsonl``,
    ``model_judgment/<judge model>_single.jsonl`` (when judged) and ``scores.json`` (the returned dict).
    Without a judge only answers are generated and every score is reported missing (no network).
    ``reuse_answers`` re-grades an existing answer file instead of generating (e.g. after a judge outage).
    ``judge_client`` replaces the client built from ``judge`` (tests, or sharing one cache and pool).
    """
    output = Path(output_dir)
    questions = load_questions(questions_path)
    if question_ids is not None:
        wanted = set(question_ids)
        questions = [q for q in questions if q["question_id"] in wanted]
    if limit is not None:
        questions = questions[:limit]
    if not questions:
        raise EmptyDataError(f"MT-Bench: question_ids/limit select none of the questions in {questions_path}")
    answers_path = output / "model_answer" / f"{_safe_name(model_id)}.jsonl"
    if reuse_answers and answers_path.exists():
        answers = load_model_answers(answers_path)
        log.info("MT-Bench: re-using %d answers from %s", len(answers), answers_path)
    else:
        rows = generate_answers(
            model,
            tokenizer,
            chat_format,
            system_prompt,
            questions,
            model_id=model_id,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            seed=seed,
        )
        write_jsonl(answers_path, rows)
        answers = {row["question_id"]: row for row in rows}
    result: dict = {
        "benchmark": "mt_bench",
        "model_id": model_id,
        "system_prompt": system_prompt,
        "n_questions": len(questions),
        "scale": "1-10",
        "questions_path": str(questions_path),
        "answers_path": str(answers_path),
        "generation": {
            "max_new_tokens": max_new_tokens,
            "temperatures": "FastChat per-category",
            "seed": seed,
        },
    }
    if judge is None and judge_client is None:
        result.update(judge=None, judgments_path=None, **_missing_scores(questions))
        write_json(output / "scores.json", result)
        return result
    client = judge_client or JudgeClient(judge)
    prompts_file = judge_prompts_path or find_beside(questions_path, "judge_prompts.jsonl")
    if prompts_file is None:
        raise ConfigError(
            f"judge_prompts.jsonl not found beside {questions_path}; pass judge_prompts_path ({FASTCHAT_SOURCE})"
        )
    refs_file = reference_path or find_beside(questions_path, "reference_answer/gpt-4.jsonl")
    references = load_model_answers(refs_file) if refs_file else None
    judgments = judge_answers(
        questions, answers, client, load_judge_prompts(prompts_file), references, model_id
    )
    judgments_path = output / "model_judgment" / f"{_safe_name(client.config.model)}_single.jsonl"
    write_jsonl(judgments_path, judgments)
    result.update(
        judge=client.config.describe(),
        judgments_path=str(judgments_path),
        judge_stats=client.stats.to_dict(),
        first_error=first_error(judgments),
        **score_judgments(judgments, {q["question_id"]: q.get("category") for q in questions}),
    )
    write_json(output / "scores.json", result)
    return result


# -- validation against published GPT-4 judgments --------------------------------------------------------------


def validate_judge_pipeline(
    data_dir: str | os.PathLike = "shared:mt_bench",
    judgment_file: str = "model_judgment/gpt-4_single.jsonl",
    max_examples: int = 5,
) -> dict:
    """Rebuild every judge prompt in a published FastChat judgment file and re-parse every stored judgment.

    Uses the folder's ``question.jsonl``, ``judge_prompts.jsonl``, ``reference_answer/gpt-4.jsonl`` and
    ``model_answer/<model>.jsonl``. Counts records whose prompt name, user prompt (character for character) and
    parsed score (stored -1 = missing) agree with the file.
    """
    root = resolve_path(data_dir)
    questions = {q["question_id"]: q for q in load_questions(root / "question.jsonl")}
    judge_prompts = load_judge_prompts(root / "judge_prompts.jsonl")
    references = load_model_answers(root / "reference_answer" / "gpt-4.jsonl")
    answers: dict[str, dict] = {}
    counts = {"records": 0, "prompt_name_match": 0, "user_prompt_exact": 0, "score_match": 0, "all_match": 0}
    mismatches = []
    for row in read_jsonl(root / judgment_file):
        counts["records"] += 1
        model = row["model"]
        if model not in answers:
            answers[model] = load_model_answers(root / "model_answer" / f"{model}.jsonl")
        question = questions[row["question_id"]]
        ref = references.get(row["question_id"])
        prompt = build_judge_prompt(
            question,
            answer_turns(answers[model][row["question_id"]]),
            row["turn"],
            judge_prompts,
            answer_turns(ref) if ref else None,
        )
        stored = None if row["score"] == -1 else float(row["score"])
        checks = {
            "prompt_name_match": prompt.name == row["judge"][1],
            "user_prompt_exact": prompt.user == row["user_prompt"],
            "score_match": parse_rating(row["judgment"]) == stored,
        }
        for name, ok in checks.items():
            counts[name] += ok
        counts["all_match"] += all(checks.values())
        if not all(checks.values()) and len(mismatches) < max_examples:
            mismatches.append(
                {"model": model, "question_id": row["question_id"], "turn": row["turn"], **checks}
            )
    return {**counts, "mismatches": mismatches}


# -- command line ----------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m rega.eval.mt_bench validate|judge ...``: validation, or grading an existing answer file."""
    parser = argparse.ArgumentParser(prog="python -m rega.eval.mt_bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    val = sub.add_parser(
        "validate", help="check prompt building and rating parsing against published judgments"
    )
    val.add_argument("--data", default="shared:mt_bench")
    grade = sub.add_parser("judge", help="grade a FastChat model_answer file")
    grade.add_argument("--answers", required=True, help="model_answer JSONL")
    grade.add_argument("--judge", required=True, help="judge YAML, e.g. configs/eval/judge_gpt4.yaml")
    grade.add_argument("--questions", default=DEFAULT_QUESTIONS)
    grade.add_argument("--output", required=True, help="folder for model_judgment/ and scores.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "validate":
        print(json.dumps(validate_judge_pipeline(args.data), indent=2))
        return
    answers = load_model_answers(args.answers)
    model_id = next(iter(answers.values()))["model_id"] if answers else Path(args.answers).stem
    questions = load_questions(args.questions)
    client = JudgeClient(load_judge_config(args.judge))
    prompts_file = find_beside(args.questions, "judge_prompts.jsonl")
    refs_file = find_beside(args.questions, "reference_answer/gpt-4.jsonl")
    if prompts_file is None:
        raise ConfigError(f"judge_prompts.jsonl not found beside {args.questions}")
    judgments = judge_answers(
        questions,
        answers,
        client,
        load_judge_prompts(prompts_file),
        load_model_answers(refs_file) if refs_file else None,
        model_id,
    )
    out = Path(args.output)
    write_jsonl(out / "model_judgment" / f"{_safe_name(client.config.model)}_single.jsonl", judgments)
    scores = {"model_id": model_id, "judge": client.config.describe(), **score_judgments(judgments)}
    write_json(out / "scores.json", scores)
    print(json.dumps({k: scores[k] for k in ("turn_1", "turn_2", "overall")}, indent=2))
    problem = missing_problem(
        "mt_bench", {**scores, "first_error": first_error(judgments)}, client.config.max_missing_share
    )
    if problem:
        raise JudgeError(f"{problem} (judgments kept in {out})")


if __name__ == "__main__":
    try:
        main()
    except UserError as err:  # as the rega command does: one line, exit 2
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
