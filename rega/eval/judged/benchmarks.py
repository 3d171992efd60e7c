"""LLM-judged benchmarks next to the judge-free scores: MT-Bench (:mod:`rega.eval.judged.mt_bench`) and the judged
general sets (:mod:`rega.eval.judged.general_set`), run by ``rega evaluate`` and, optionally, by the training
callback.

Each benchmark writes its answers, its judgments (when judged) and ``scores.json`` under its own folder through
:func:`write_judged_run`. The judge's API key comes only from the environment variable its config names
(:class:`rega.eval.judged.client.JudgeConfig`); it is never written anywhere.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rega.errors import ConfigError, JudgeError
from rega.eval.judged.ratings import first_error, missing_problem
from rega.io import write_json, write_jsonl

log = logging.getLogger(__name__)

JUDGE_BENCHMARKS = {
    "mt_bench": ("rega.eval.judged.mt_bench", "run_mt_bench"),
    "general_zh": ("rega.eval.judged.general_set", "run_general_zh"),
    "general_en": ("rega.eval.judged.general_set", "run_general_en"),
}


@dataclass
class JudgeRequest:
    """Which judged benchmarks to run, with which judge.

    Args:
        benchmarks: mt_bench, general_en, general_zh.
        config: the judge's YAML (``configs/eval/judge_*.yaml``); without it only answers are generated.
        limit: first N questions of each benchmark.
        answers: grade this answer file instead of generating (one benchmark: a FastChat ``model_answer`` JSONL
            for mt_bench, an ``answers.jsonl`` of an earlier run for a general set); no model is loaded.
        max_new_tokens: answer length cap; ``None`` keeps each benchmark's own (MT-Bench 1024, general sets 512).
    """

    benchmarks: list[str] = field(default_factory=list)
    config: str | None = None
    limit: int | None = None
    answers: str | None = None
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        self.benchmarks = list(self.benchmarks or [])
        for name in self.benchmarks:
            if name not in JUDGE_BENCHMARKS:
                raise ConfigError(f"unknown judge benchmark {name!r}; use {', '.join(JUDGE_BENCHMARKS)}")
        if self.answers and len(self.benchmarks) != 1:
            raise ConfigError("judge_answers grades one benchmark's answers: name exactly one in judge")


def prepare_judge(request: JudgeRequest):
    """(JudgeConfig, JudgeClient), or (None, None) without a config (answers only): built before any model loads,
    so a missing key or a missing ``openai`` package fails at once."""
    if not (request.benchmarks and request.config):
        return None, None
    from rega.eval.judged.client import JudgeClient, load_judge_config

    judge = load_judge_config(request.config)
    return judge, JudgeClient(judge)


def run_judge_benchmarks(lm, system: str, request: JudgeRequest, judge, client, out: Path) -> dict:
    """The LLM-judge evaluations of ``lm`` (model, tokenizer, chat) under the prompt ``system``, each under
    ``out/<name>``. Without a judge only the answers are generated (no network). A benchmark whose judge fails is
    recorded with its ``error`` and the others still run: the caller decides at the end (:func:`judge_problems`),
    with every output kept."""
    results = {}
    for name in request.benchmarks:
        module, func = JUDGE_BENCHMARKS[name]
        run = getattr(importlib.import_module(module), func)
        kwargs = {"output_dir": str(out / name), "limit": request.limit, "judge_client": client}
        if request.answers:
            kwargs["answers_file"] = request.answers
        if request.max_new_tokens:
            kwargs["max_new_tokens"] = request.max_new_tokens
        try:
            results[name] = run(*lm, system, judge, **kwargs)
        except JudgeError as err:
            log.error("judge benchmark %s failed: %s", name, err)
            results[name] = {"benchmark": name, "error": str(err)}
    return results


def judge_problems(results: dict, judge) -> list[str]:
    """One line per judged benchmark that failed or has too many missing scores (none without a judge)."""
    if judge is None:
        return []
    problems = (missing_problem(name, result, judge.max_missing_share) for name, result in results.items())
    return [problem for problem in problems if problem]


def write_judged_run(
    output: Path,
    result: dict,
    scores: dict,
    client=None,
    judgments: Sequence[dict] = (),
    judgments_path: Path | None = None,
) -> dict:
    """The end of every judged run: the judgments file (when judged), the judge, its statistics, the first error
    and the scores added to ``result``, which is written as ``output/scores.json`` and returned."""
    if client is None:
        result.update(judge=None, judgments_path=None, **scores)
    else:
        write_jsonl(judgments_path, list(judgments))
        result.update(
            judge=client.config.describe(),
            judgments_path=str(judgments_path),
            judge_stats=client.stats.to_dict(),
            first_error=first_error(judgments),
            **scores,
        )
    write_json(output / "scores.json", result)
    return result
