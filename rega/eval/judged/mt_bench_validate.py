"""MT-Bench judge-pipeline validation: every judge prompt of a published FastChat judgment file rebuilt from
question, model answer and reference, and every stored judgment re-parsed (``rega evaluate --validate_judge``)."""

from __future__ import annotations

import os

from rega.eval.judged.mt_bench import (
    answer_turns,
    build_judge_prompt,
    load_judge_prompts,
    load_model_answers,
    load_questions,
    parse_rating,
)
from rega.io import read_jsonl
from rega.paths import resolve_path


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
