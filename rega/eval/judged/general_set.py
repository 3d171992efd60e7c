"""General-ability evaluation in the style of the paper's CGev: instructions with categories, answered greedily
under the evaluation's system prompt, each answer scored 0-10 by an LLM judge; per-category and overall means.

The paper's 650-item CGev set is private. The stand-ins here are the BELLE eval set (Chinese, 12 categories; the
project's 50-item dev slice is ``shared:general_eval_zh_dev/dev.jsonl``, the full public set is
``eval/eval_set.json`` of https://github.com/LianjiaTech/BELLE) and, for English, AlpacaEval items
(``shared:general_eval_en_dev/dev.jsonl``). Files may be in the project's record schema (``instruction``,
``input``, ``output`` = reference answer, ``category``) or BELLE's raw format (``question``, ``class``,
``std_answer``), recognised automatically.

Judge prompt styles (``prompt_style``), all reported on a 0-10 scale:

* ``cgev_zh`` (default for Chinese) - this project's own prompt: a Chinese rendering of FastChat's single-answer
  grading prompt that asks for a 0-10 rating as ``[[评分]]``; when the item has a reference answer the judge is
  told to compare against it (BELLE's reference-guided classes: math, code, classification, QA, extraction,
  translation, summarization). Rating parsed with FastChat's ``[[x]]`` / ``[x]`` rule, valid range 0-10.
* ``belle`` - BELLE's own per-class prompts (``eval_prompt.json``, class names matched ignoring case and kinds of space),
  composed exactly as BELLE's ``eval/ChatGPT_Score.html`` (no reference for generation, brainstorming and rewrite).
  They score 0-1 (``得分: x``); the 0-10 score is **10 × the BELLE score** (linear, so means map the same way).
* ``single_en`` (default for English) - FastChat's MT-Bench ``single-v1`` prompt (1-10, no reference).

A rating that cannot be parsed is missing (None), never 0: means skip it and report the missing count.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rega.config import DataSource
from rega.data.loaders import load_records
from rega.data.records import Record
from rega.errors import ConfigError, EmptyDataError
from rega.eval.judged.benchmarks import write_judged_run
from rega.eval.judged.client import JudgeClient, JudgeConfig
from rega.eval.judged.ratings import chat_messages, parse_bracket_rating, summarize
from rega.io import read_jsonl, write_jsonl
from rega.paths import resolve_path

log = logging.getLogger(__name__)

DEFAULT_ZH = "shared:general_eval_zh_dev/dev.jsonl"
DEFAULT_EN = "shared:general_eval_en_dev/dev.jsonl"
BELLE_FIELDS = {"instruction": "question", "category": "class", "output": "std_answer"}
BELLE_NO_REFERENCE = ("generation", "brainstorming", "rewrite")  # ChatGPT_Score.html leaves the reference out
UNCATEGORIZED = "uncategorized"

# This project's 0-10 Chinese prompt (modelled on FastChat's single-v1 / single-math-v1).
CGEV_ZH_SYSTEM = "你是一个乐于助人的助手。"
CGEV_ZH_TEMPLATE = (
    "[指令]\n请你作为一名公正的评审，评价下面AI助手对用户问题的回答质量。{criteria}"
    '请先给出简短的评价理由，尽可能客观。给出理由之后，你必须严格按照以下格式给出0到10分的评分："[[评分]]"，'
    '例如："评分：[[5]]"。\n\n[问题]\n{question}\n\n{reference_block}'
    "[AI助手的回答开始]\n{answer}\n[AI助手的回答结束]"
)
CGEV_ZH_CRITERIA = "评价应考虑回答的有用性、相关性、准确性、深度、创造性和详细程度。"
CGEV_ZH_CRITERIA_REF = (
    "评价应考虑回答的正确性和有用性。你会得到一个参考答案和AI助手的回答，请先将AI助手的回答与参考答案进行比较，"
    "找出并纠正其中的错误。"
)
CGEV_ZH_REFERENCE = "[参考答案开始]\n{reference}\n[参考答案结束]\n\n"

# FastChat judge_prompts.jsonl, "single-v1" (Apache-2.0).
SINGLE_EN_SYSTEM = "You are a helpful assistant."
SINGLE_EN_TEMPLATE = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. Your evaluation should consider factors such as the "
    "helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. Begin your "
    "evaluation by providing a short explanation. Be as objective as possible. After providing your explanation, "
    'you must rate the response on a scale of 1 to 10 by strictly following this format: "[[rating]]", for '
    'example: "Rating: [[5]]".\n\n[Question]\n{question}\n\n[The Start of Assistant\'s Answer]\n{answer}\n'
    "[The End of Assistant's Answer]"
)

BELLE_SCORE = re.compile(r"得分\s*[:：]?\s*(\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class PromptStyle:
    name: str
    scale: tuple[float, float]  # the range the judge is asked for
    factor: float  # multiplies the judge's number into 0-10
    description: str


PROMPT_STYLES = {
    "cgev_zh": PromptStyle(
        "cgev_zh", (0.0, 10.0), 1.0, "project's 0-10 Chinese prompt, reference-guided when a reference exists"
    ),
    "belle": PromptStyle("belle", (0.0, 1.0), 10.0, "BELLE per-class prompts (0-1), score x10"),
    "single_en": PromptStyle("single_en", (1.0, 10.0), 1.0, "FastChat single-v1 (1-10), no reference"),
}
DEFAULT_STYLE = {"zh": "cgev_zh", "en": "single_en"}


# -- data ------------------------------------------------------------------------------------------------------


def _looks_like_belle(path: Path) -> bool:
    with open(path, encoding="utf-8") as handle:
        if path.suffix == ".json":
            data = json.load(handle)
            first = data[0] if isinstance(data, list) and data else {}
        else:
            line = next((line for line in handle if line.strip()), "{}")
            first = json.loads(line)
    return isinstance(first, dict) and "question" in first and "instruction" not in first


def load_general_eval(path: str | os.PathLike, lang: str = "zh", limit: int | None = None) -> list[Record]:
    """Evaluation items as records (``output`` = reference answer, may be empty); BELLE's raw format is mapped."""
    resolved = resolve_path(path)
    if not resolved.exists():
        raise FileNotFoundError(f"general evaluation set {path} not found (resolved to {resolved})")
    fields = BELLE_FIELDS if _looks_like_belle(resolved) else {}
    source = DataSource(
        path=str(resolved), domain="general", lang=lang, fields=fields, limit=limit, require_output=False
    )
    return load_records(source).records


def load_belle_prompts(path: str | os.PathLike) -> dict[str, str]:
    """BELLE ``eval_prompt.json`` (one JSON object per line, or a JSON list) as ``{class (lower case): prompt}``."""
    text = resolve_path(path).read_text(encoding="utf-8").strip()
    rows = (
        json.loads(text)
        if text.startswith("[")
        else [json.loads(line) for line in text.splitlines() if line.strip()]
    )
    return {_normalize_category(row["class"]): row["prompt"] for row in rows}


# -- judge prompts and parsing (pure) -----------------------------------------------------------------------


def _normalize_category(name: str) -> str:
    # BELLE's eval_prompt.json writes "open QA" and "closed\xa0QA" (a no-break space); its items "open qa".
    return " ".join(name.split()).lower()


def category_of(record: Record) -> str:
    return _normalize_category(record.category or UNCATEGORIZED)


def build_prompt(
    style: str, record: Record, answer: str, belle_prompts: dict[str, str] | None = None
) -> list[dict]:
    """Chat messages asking the judge to grade ``answer`` to ``record``."""
    question = record.user_text
    reference = record.output.strip()
    if style == "cgev_zh":
        user = CGEV_ZH_TEMPLATE.format(
            criteria=CGEV_ZH_CRITERIA_REF if reference else CGEV_ZH_CRITERIA,
            question=question,
            reference_block=CGEV_ZH_REFERENCE.format(reference=reference) if reference else "",
            answer=answer,
        )
        return chat_messages(CGEV_ZH_SYSTEM, user)
    if style == "single_en":
        return chat_messages(SINGLE_EN_SYSTEM, SINGLE_EN_TEMPLATE.format(question=question, answer=answer))
    if style == "belle":
        category = category_of(record)
        if not belle_prompts or category not in belle_prompts:
            raise ConfigError(f"no BELLE judge prompt for category {category!r} (item {record.id})")
        prompt = belle_prompts[category]
        # Spacing and quotes exactly as BELLE's eval/ChatGPT_Score.html composes them.
        if category in BELLE_NO_REFERENCE:
            user = f"{prompt} {question}  模型回答： '{answer}'。请针对模型回答给出得分，顺便给出理由："
        else:
            user = f"{prompt} {question} 标准回答:{record.output}  模型回答：' {answer}'。请针对模型回答给出得分，顺便给出理由："
        return chat_messages(None, user)
    raise ConfigError(f"unknown prompt_style {style!r}; choose from {', '.join(PROMPT_STYLES)}")


def parse_score(style: str, judgment: str | None) -> tuple[float | None, float | None]:
    """(judge's own number, score on 0-10); both None when no valid rating is found."""
    spec = PROMPT_STYLES[style]
    if style == "belle":
        match = BELLE_SCORE.search(judgment or "")
        raw = float(match.group(1)) if match else None
        if raw is not None and not spec.scale[0] <= raw <= spec.scale[1]:
            raw = None
    else:
        raw = parse_bracket_rating(judgment, *spec.scale)
    return raw, (None if raw is None else round(raw * spec.factor, 4))


def score_items(rows: Sequence[dict]) -> dict:
    """Overall (item mean), macro (mean of category means) and per-category means, with missing counts."""
    by_cat: dict[str, list] = defaultdict(list)
    for row in rows:
        by_cat[row["category"]].append(row.get("score"))
    per_category = {cat: summarize(by_cat[cat]) for cat in sorted(by_cat)}
    cat_means = [v["mean"] for v in per_category.values() if v["mean"] is not None]
    return {
        "overall": summarize(row.get("score") for row in rows),
        "macro_mean": round(sum(cat_means) / len(cat_means), 4) if cat_means else None,
        "per_category": per_category,
    }


# -- run -------------------------------------------------------------------------------------------------------


def generate_general_answers(
    model,
    tokenizer,
    chat_format,
    system_prompt: str,
    records: Sequence[Record],
    *,
    max_new_tokens: int = 512,
    batch_size: int = 8,
) -> list[dict]:
    """Greedy answers, one row per item: id, category, instruction, reference, answer, finish_reason."""
    from rega.modules.generation import GREEDY, generate

    sampling = dataclasses.replace(GREEDY, max_new_tokens=max_new_tokens)
    prompts = [chat_format.encode_prompt(system_prompt, r.user_text) for r in records]
    rows: list[dict | None] = [None] * len(records)
    for gen in generate(model, tokenizer, prompts, sampling, batch_size=batch_size):
        r = records[gen.index]
        rows[gen.index] = {
            "id": r.id,
            "category": category_of(r),
            "instruction": r.user_text,
            "reference": r.output,
            "answer": gen.text,
            "finish_reason": gen.finish_reason,
        }
    return rows


def _style(prompt_style: str | None, lang: str) -> str:
    style = prompt_style or DEFAULT_STYLE.get(lang, "single_en")
    if style not in PROMPT_STYLES:
        raise ConfigError(f"unknown prompt_style {style!r}; choose from {', '.join(PROMPT_STYLES)}")
    return style


def _belle_prompts(style: str, records, data_path, belle_prompts_path) -> dict[str, str] | None:
    """BELLE's per-class prompts when ``style`` is belle (every item's class must have one), else None."""
    if style != "belle":
        return None
    prompts_file = belle_prompts_path or resolve_path(data_path).parent / "eval_prompt.json"
    belle_prompts = load_belle_prompts(prompts_file)
    unknown = sorted({category_of(r) for r in records} - set(belle_prompts))
    if unknown:  # before any generation
        raise ConfigError(f"{prompts_file} has no BELLE prompt for categories {unknown}")
    return belle_prompts


def _answer_rows(
    lm, system_prompt, records, answers_path: Path, reuse: bool, model_id: str, generation: dict
):
    """(records answered, their answer rows): generated and written to ``answers_path``, or read from it."""
    if reuse:
        by_id = {row["id"]: row for row in read_jsonl(answers_path)}
        return [r for r in records if r.id in by_id], [by_id[r.id] for r in records if r.id in by_id]
    rows = generate_general_answers(*lm, system_prompt, records, **generation)
    for row in rows:
        row["model_id"] = model_id
    write_jsonl(answers_path, rows)
    return records, rows


def _judgments(client: JudgeClient, style: str, records, rows, belle_prompts) -> list[dict]:
    requests = [build_prompt(style, r, row["answer"], belle_prompts) for r, row in zip(records, rows)]
    replies = client.complete_many(requests)
    judgments = []
    for record, row, messages, reply in zip(records, rows, requests, replies):
        raw, score = parse_score(style, reply.content)
        judgment = {
            "id": record.id, "category": row["category"], "judge": [client.config.model, style],
            "user_prompt": messages[-1]["content"], "judgment": reply.content if reply.content is not None else "",
            "raw_score": raw, "score": score,
        }  # fmt: skip
        judgments.append({**judgment, "error": reply.error} if reply.error else judgment)
    return judgments


def run_general_eval(
    model,
    tokenizer,
    chat_format,
    system_prompt: str,
    judge: JudgeConfig | None,
    data_path: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    *,
    lang: str = "zh",
    benchmark: str | None = None,
    prompt_style: str | None = None,
    belle_prompts_path: str | os.PathLike | None = None,
    limit: int | None = None,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    model_id: str = "rega",
    reuse_answers: bool = False,
    judge_client: JudgeClient | None = None,
    answers_file: str | os.PathLike | None = None,
) -> dict:
    """Answer every item greedily and (with a judge) score it 0-10; returns a JSON-serialisable dict.

    Writes ``answers.jsonl``, ``judgments.jsonl`` (when judged) and ``scores.json`` under ``output_dir``.
    Without a judge, scores are reported missing and nothing touches the network. ``reuse_answers`` grades the
    answers of an earlier run in ``output_dir``, ``answers_file`` those of that file (no model needed).
    """
    style = _style(prompt_style, lang)
    data_path = data_path or (DEFAULT_ZH if lang == "zh" else DEFAULT_EN)
    records = load_general_eval(data_path, lang=lang, limit=limit)
    if not records:
        raise EmptyDataError(f"general evaluation set {data_path} has no items to evaluate")
    belle_prompts = _belle_prompts(style, records, data_path, belle_prompts_path)
    output = Path(output_dir or f"general_{lang}")
    answers_path = Path(answers_file) if answers_file else output / "answers.jsonl"
    reuse = bool(answers_file) or (reuse_answers and answers_path.exists())
    generation = {"max_new_tokens": max_new_tokens, "batch_size": batch_size}
    lm = (model, tokenizer, chat_format)
    records, rows = _answer_rows(lm, system_prompt, records, answers_path, reuse, model_id, generation)
    result: dict = {
        "benchmark": benchmark or f"general_{lang}", "model_id": model_id, "system_prompt": system_prompt,
        "data_path": str(data_path), "n_items": len(records), "scale": "0-10", "prompt_style": style,
        "score_mapping": PROMPT_STYLES[style].description, "answers_path": str(answers_path),
        "generation": {"decoding": "greedy", "max_new_tokens": max_new_tokens},
    }  # fmt: skip
    if judge is None and judge_client is None:
        return write_judged_run(output, result, score_items([{**row, "score": None} for row in rows]))
    client = judge_client or JudgeClient(judge)
    judgments = _judgments(client, style, records, rows, belle_prompts)
    return write_judged_run(
        output, result, score_items(judgments), client, judgments, output / "judgments.jsonl"
    )


def run_general_zh(*args, **kwargs) -> dict:
    """Chinese general evaluation (CGev style) on :data:`DEFAULT_ZH`; arguments as :func:`run_general_eval`'s."""
    return run_general_eval(*args, lang="zh", **kwargs)


def run_general_en(*args, **kwargs) -> dict:
    """English general evaluation on :data:`DEFAULT_EN`, judged with FastChat's single-v1 prompt by default;
    arguments as :func:`run_general_eval`'s."""
    return run_general_eval(*args, lang="en", **kwargs)
