"""MT-Bench: two-turn answers from the model under evaluation, graded 1-10 by an LLM judge, FastChat's way.

Data (FastChat's files, unchanged): ``question.jsonl`` (80 two-turn questions in 8 categories),
``judge_prompts.jsonl`` and ``reference_answer/gpt-4.jsonl``. The public source is
https://github.com/lm-sys/FastChat/tree/main/fastchat/llm_judge/data (``mt_bench/question.jsonl``,
``mt_bench/reference_answer/gpt-4.jsonl``, and ``judge_prompts.jsonl`` one folder up); download those three files
and pass the question file's path. In this project they are at ``shared:mt_bench/``.

What follows FastChat exactly (``fastchat/llm_judge/gen_model_answer.py``, ``common.py``, ``show_result.py``):

* answers (:mod:`rega.eval.judged.mt_bench_answers`): per-category temperature (temperature 0 means greedy), the
  second turn is generated with the model's own first answer in the conversation, answers saved in FastChat's
  ``model_answer`` JSONL format (``question_id, answer_id, model_id, choices[{index, turns}], tstamp``);
* grading: single-answer prompts ``single-v1`` / ``single-v1-multi-turn``, and the reference-guided
  ``single-math-v1`` / ``single-math-v1-multi-turn`` for math, reasoning and coding; system prompt + user prompt
  as chat messages; temperature 0, max_tokens 2048; rating from ``[[x]]`` with ``[x]`` as fallback;
* scores: turn 1, turn 2, and overall = the mean over every judged turn.

Two deliberate differences: an unparsable rating is stored as ``"score": null`` (FastChat writes -1) and is left
out of every mean and counted as missing; and the conversation is rendered with the evaluated model's own chat
template (with the evaluation's system prompt: p_c or a role prompt) instead of FastChat's conversation table.

:func:`rega.eval.judged.mt_bench_validate.validate_judge_pipeline` checks the prompt building and rating parsing
against published GPT-4 judgments (``rega evaluate --validate_judge shared:mt_bench``); ``rega evaluate --judge [mt_bench]
--judge_config JUDGE.yaml --judge_answers ANSWERS.jsonl`` grades an existing FastChat answer file.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rega.errors import ConfigError, EmptyDataError
from rega.eval.judged.benchmarks import write_judged_run
from rega.eval.judged.client import JudgeClient, JudgeConfig
from rega.eval.judged.ratings import chat_messages, parse_bracket_rating, summarize
from rega.io import read_jsonl, write_jsonl
from rega.paths import resolve_path

log = logging.getLogger(__name__)

FASTCHAT_SOURCE = "https://github.com/lm-sys/FastChat/tree/main/fastchat/llm_judge/data"
DEFAULT_QUESTIONS = "shared:mt_bench/question.jsonl"

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


def select_questions(questions_path, question_ids: Sequence[int] | None, limit: int | None) -> list[dict]:
    questions = load_questions(questions_path)
    if question_ids is not None:
        wanted = set(question_ids)
        questions = [q for q in questions if q["question_id"] in wanted]
    if limit is not None:
        questions = questions[:limit]
    if not questions:
        raise EmptyDataError(f"MT-Bench: question_ids/limit select none of the questions in {questions_path}")
    return questions


def _answers(lm, system_prompt: str, questions, answers_path: Path, reuse: bool, generation: dict) -> dict:
    """{question_id: model_answer row}: generated and written to ``answers_path``, or read from it (``reuse``)."""
    if reuse:
        answers = load_model_answers(answers_path)
        log.info("MT-Bench: re-using %d answers from %s", len(answers), answers_path)
        return answers
    from rega.eval.judged.mt_bench_answers import generate_answers

    rows = generate_answers(*lm, system_prompt, questions, **generation)
    write_jsonl(answers_path, rows)
    return {row["question_id"]: row for row in rows}


def _grade(
    client: JudgeClient, questions, answers: dict, questions_path, prompts_path, reference_path, model_id
):
    prompts_file = prompts_path or find_beside(questions_path, "judge_prompts.jsonl")
    if prompts_file is None:
        raise ConfigError(
            f"judge_prompts.jsonl not found beside {questions_path}; pass judge_prompts_path ({FASTCHAT_SOURCE})"
        )
    refs_file = reference_path or find_beside(questions_path, "reference_answer/gpt-4.jsonl")
    references = load_model_answers(refs_file) if refs_file else None
    return judge_answers(questions, answers, client, load_judge_prompts(prompts_file), references, model_id)


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
    answers_file: str | os.PathLike | None = None,
) -> dict:
    """Generate MT-Bench answers and (when ``judge`` is given) grade them; returns a JSON-serialisable dict.

    Writes, FastChat's layout, under ``output_dir``: ``model_answer/<model_id>.jsonl``,
    ``model_judgment/<judge model>_single.jsonl`` (when judged) and ``scores.json`` (the returned dict).
    Without a judge only answers are generated and every score is reported missing (no network).
    ``reuse_answers`` re-grades an existing answer file instead of generating (e.g. after a judge outage);
    ``answers_file`` grades that FastChat ``model_answer`` file (any model's; its ``model_id``) without a model.
    ``judge_client`` replaces the client built from ``judge`` (tests, or sharing one cache and pool).
    """
    output = Path(output_dir)
    questions = select_questions(questions_path, question_ids, limit)
    if answers_file:  # graded as the model it names
        model_id = next(iter(load_model_answers(answers_file).values()), {}).get("model_id", model_id)
    answers_path = Path(answers_file or output / "model_answer" / f"{_safe_name(model_id)}.jsonl")
    reuse = bool(answers_file) or (reuse_answers and answers_path.exists())
    settings = dict(model_id=model_id, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    answers = _answers(
        (model, tokenizer, chat_format), system_prompt, questions, answers_path, reuse, settings
    )
    result: dict = {
        "benchmark": "mt_bench", "model_id": model_id, "system_prompt": system_prompt,
        "n_questions": len(questions), "scale": "1-10", "questions_path": str(questions_path),
        "answers_path": str(answers_path),
        "generation": {"max_new_tokens": max_new_tokens, "temperatures": "FastChat per-category", "seed": seed},
    }  # fmt: skip
    if judge is None and judge_client is None:
        return write_judged_run(output, result, _missing_scores(questions))
    client = judge_client or JudgeClient(judge)
    judgments = _grade(
        client, questions, answers, questions_path, judge_prompts_path, reference_path, model_id
    )
    path = output / "model_judgment" / f"{_safe_name(client.config.model)}_single.jsonl"
    scores = score_judgments(judgments, {q["question_id"]: q.get("category") for q in questions})
    return write_judged_run(output, result, scores, client, judgments, path)
