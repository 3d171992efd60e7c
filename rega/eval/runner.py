"""``rega evaluate``: evaluate the base model (zero-shot baseline) or a saved LoRA adapter standalone and write
``eval.json`` — the judge-free scores of :func:`rega.eval.pipeline.evaluate_model` and, optionally, LLM-judged
benchmarks (:mod:`rega.eval.judged.benchmarks`). It also grades an existing answer file (``judge_answers``) and
checks the MT-Bench judge pipeline against published judgments (``validate_judge``). See ``configs/eval/``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rega.config import ModelConfig
from rega.data.chat import ChatFormat
from rega.data.prompts import PromptConfig, resolve_prompts
from rega.data.records import GENERAL
from rega.data.strategies import ROLE, get_strategy
from rega.errors import ConfigError, EmptyDataError, JudgeError
from rega.eval.domain.scoring import TaskData, check_rule, settings_tasks
from rega.eval.general.retention import resolve_mc_set
from rega.eval.judged.benchmarks import (
    JUDGE_BENCHMARKS,
    JudgeRequest,
    judge_problems,
    prepare_judge,
    run_judge_benchmarks,
)
from rega.eval.pipeline import base_reference, evaluate_model, mc_set_names
from rega.eval.settings import EvalSettings
from rega.eval.summary import judge_text, summary_text
from rega.io import atomic_dir, check_output_dir, write_json
from rega.modules.export import check_adapter, load_adapter

EVAL_FILES = ("eval.json", "predictions.jsonl", "general_mc.jsonl")


@dataclass
class CommandOptions:
    """The command's own options (everything but :class:`EvalSettings` and the judge)."""

    model: ModelConfig
    adapter: str | None
    strategy: str
    rules: list[str] | None
    prompts: PromptConfig | None
    baseline: str | None
    compare_base: bool
    output: str
    device: str

    @property
    def inference(self) -> tuple[str, ...]:
        return tuple(self.rules) if self.rules else get_strategy(self.strategy).inference


@dataclass
class Prepared:
    """What is checked and loaded before the model: the output folder, the rules, the judge, the records."""

    out: Path
    inference: tuple[str, ...]
    judge: object
    client: object
    data: TaskData
    reference: dict | None


def relocate(obj, old: str, new: str):
    """``obj`` with every path under the temporary output folder ``old`` moved to the final folder ``new``."""
    if isinstance(obj, str):
        return new + obj[len(old) :] if obj.startswith(old) else obj
    if isinstance(obj, dict):
        return {key: relocate(value, old, new) for key, value in obj.items()}
    if isinstance(obj, list):
        return [relocate(value, old, new) for value in obj]
    return obj


def check_inputs(settings: EvalSettings, data: TaskData, request: JudgeRequest) -> None:
    """An evaluation of zero items is an error that names the sources, before the model loads."""
    if settings.tasks and not data.records:
        sources = ", ".join(source.path for source in settings.tasks)
        raise EmptyDataError(f"no evaluation items: the task sources hold no records ({sources})")
    general = mc_set_names(settings, data.records) or settings.drift or settings.general_gen
    if not (data.records or general or request.benchmarks):
        raise EmptyDataError("nothing to evaluate: set tasks, general_mc, drift, general_gen or judge")


def prepare(options: CommandOptions, settings: EvalSettings, request: JudgeRequest) -> Prepared:
    """Every check that can fail before the model loads, in this order."""
    inference = options.inference
    for rule in inference:
        check_rule(rule)
    if options.compare_base and not options.adapter:
        raise ConfigError("compare_base needs an adapter (the base model is what is being evaluated)")
    out = check_output_dir(options.output, [*EVAL_FILES, *JUDGE_BENCHMARKS], "evaluation outputs")
    if options.adapter:
        check_adapter(options.adapter)
    judge, client = prepare_judge(request)
    data = settings_tasks(settings)
    check_inputs(settings, data, request)
    for spec in mc_set_names(settings, data.records):
        resolve_mc_set(spec)  # fail on a bad name before the model loads
    reference = json.loads(Path(options.baseline).read_text(encoding="utf-8")) if options.baseline else None
    return Prepared(out, inference, judge, client, data, reference)


def role_prompts(options: CommandOptions, chat: ChatFormat, ready: Prepared):
    """p_c and the role prompts of the domains the rules need (built-in prompts in the tasks' language)."""
    records = ready.data.records
    domains = sorted({r.domain for r in records if r.domain != GENERAL}) if ROLE in ready.inference else []
    domains += [
        rule.split(":", 1)[1] for rule in ready.inference if rule.startswith("role:")
    ]  # prompt matrix
    prompts = options.prompts
    if prompts is None:
        zh = sum(r.lang == "zh" for r in records)
        prompts = PromptConfig(lang="zh" if zh > len(records) / 2 else "en")
    return resolve_prompts(prompts, domains, chat.default_system)


def load_lm(options: CommandOptions, device: str):
    """(model on ``device`` in eval mode, with the adapter when given; tokenizer; chat format)."""
    from rega.model_source import load_tokenizer
    from rega.modules.model import load_model

    tokenizer = load_tokenizer(options.model)
    chat = ChatFormat(tokenizer, options.model.chat_template, options.model.system_placement)
    model = load_model(options.model).to(device)
    if options.adapter:
        model = load_adapter(model, options.adapter, options.model.name_or_path)
    model.eval()
    return model, tokenizer, chat


def run_judged(result: dict, lm, system: str, request: JudgeRequest, ready: Prepared, tmp: Path) -> None:
    if request.benchmarks:
        started = time.perf_counter()
        result["judge"] = run_judge_benchmarks(lm, system, request, ready.judge, ready.client, tmp)
        result["meta"]["timings"]["judge_s"] = round(time.perf_counter() - started, 1)


def finish(result: dict, ready: Prepared, tmp: Path, started: float) -> dict:
    """eval.json written into the temporary folder (its paths pointing at the final one); the result."""
    result["meta"]["timings"]["wall_s"] = round(time.perf_counter() - started, 1)
    result = relocate(result, str(tmp), str(ready.out))
    write_json(tmp / "eval.json", result)
    for scores in tmp.glob("*/scores.json"):  # each judged benchmark's own record of its files
        write_json(scores, relocate(json.loads(scores.read_text(encoding="utf-8")), str(tmp), str(ready.out)))
    return result


def report(result: dict, ready: Prepared) -> None:
    """The printed summary; a JudgeError naming every judged benchmark that failed, outputs kept."""
    print(summary_text(result))
    print(f"wrote {ready.out / 'eval.json'}")
    problems = judge_problems(result.get("judge", {}), ready.judge)
    if problems:
        raise JudgeError(*(f"{problem} (outputs kept in {ready.out})" for problem in problems))


def evaluate(options: CommandOptions, settings: EvalSettings, request: JudgeRequest, started: float) -> None:
    import torch

    ready = prepare(options, settings, request)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if options.device == "auto" else options.device
    lm = load_lm(options, device)
    prompts = role_prompts(options, lm[2], ready)
    load_s = round(time.perf_counter() - started, 1)
    if options.compare_base:
        ready.reference = base_reference(*lm, prompts, settings, ready.data.records)
    # Every output goes into a temporary folder that replaces `out` as a whole: never a mix of two runs.
    with atomic_dir(ready.out) as tmp:
        result = evaluate_model(
            *lm,
            prompts,
            ready.inference,
            settings,
            data=ready.data,
            output_dir=tmp,
            base_reference=ready.reference,
        )
        run_judged(result, lm, prompts.central, request, ready, tmp)
        meta = {key: getattr(options, key) for key in ("adapter", "strategy", "baseline", "compare_base")}
        result["meta"].update(
            model=asdict(options.model), **meta, device=device, threads=torch.get_num_threads()
        )
        result["meta"]["timings"]["load_s"] = load_s
        result = finish(result, ready, tmp, started)
    report(result, ready)


def grade_answers(options: CommandOptions, request: JudgeRequest, started: float) -> None:
    """``judge_answers``: one benchmark's existing answers graded by the judge; no model is loaded."""
    if not request.config:
        raise ConfigError("judge_answers needs judge_config (the judge that grades the answers)")
    out = check_output_dir(options.output, [*EVAL_FILES, *JUDGE_BENCHMARKS], "evaluation outputs")
    judge, client = prepare_judge(request)
    ready = Prepared(out, (), judge, client, TaskData([], {}), None)
    with atomic_dir(out) as tmp:
        result: dict = {"meta": {"answers": request.answers, "timings": {}}}
        run_judged(result, (None, None, None), "", request, ready, tmp)
        result = finish(result, ready, tmp, started)
    print(judge_text(result))
    print(f"wrote {out / 'eval.json'}")
    problems = judge_problems(result["judge"], judge)
    if problems:
        raise JudgeError(*(f"{problem} (outputs kept in {out})" for problem in problems))


def check_judge_pipeline(data_dir: str) -> None:
    """``validate_judge``: MT-Bench prompt building and rating parsing against published GPT-4 judgments."""
    from rega.eval.judged.mt_bench_validate import validate_judge_pipeline

    report = validate_judge_pipeline(data_dir)
    print(json.dumps(report, indent=2))
    if report["all_match"] != report["records"]:
        raise JudgeError(
            f"{report['records'] - report['all_match']} of {report['records']} judgments disagree"
        )


def evaluate_command(
    model: ModelConfig | None = None,
    adapter: str | None = None,
    strategy: str = "zero_shot",
    rules: list[str] | None = None,
    prompts: PromptConfig | None = None,
    baseline: str | None = None,
    compare_base: bool = False,
    judge: list[str] | None = None,
    judge_config: str | None = None,
    judge_limit: int | None = None,
    judge_answers: str | None = None,
    validate_judge: str | None = None,
    output: str = "runs/eval",
    device: str = "auto",
    threads: int | None = None,
    **settings,
) -> None:
    """Evaluate the base model (zero-shot baseline) or a saved LoRA adapter; write eval.json and print a summary.
    What to measure (tasks, limit_per_task, general_mc, drift ...): the fields of EvalSettings, listed below.

    Args:
        model: the base model, as ModelConfig fields (name_or_path, chat_template, system_placement, dtype ...);
            default the embedded SmolLM2-135M-Instruct.
        adapter: a saved peft adapter folder to evaluate on top of the base model; none evaluates the base model.
        strategy: the strategy whose inference prompt rules apply (zero_shot, ft, ftsd: p_c; ftrp: p_i; rega: both).
        rules: override the prompt rules: [central], [role] or both.
        prompts: p_c and role prompts (default: the built-in prompts in the tasks' language; p_c = the model's own
            system prompt).
        baseline: an earlier eval.json (e.g. the zero-shot run) whose general MC and drift values give deltas and
            whose general_gen answers are the base answers general_gen compares with.
        compare_base: with an adapter, also measure general MC and drift with the adapter disabled (deltas) and
            answer the general_gen instructions with it (the base answers general_gen compares with).
        judge: LLM-judge benchmarks to run as well: mt_bench, general_en, general_zh (under judge in eval.json).
        judge_config: the judge's YAML (configs/eval/judge_*.yaml); without it only answers are generated.
        judge_limit: first N questions of each judge benchmark.
        judge_answers: grade this answer file instead of evaluating a model (one benchmark in judge: a FastChat
            model_answer JSONL for mt_bench, an earlier answers.jsonl for a general set); needs judge_config.
        validate_judge: a FastChat data folder (e.g. shared:mt_bench): rebuild the judge prompts of its published
            GPT-4 judgments, re-parse their ratings, print the agreement and stop (no model, no judge).
        output: output folder for eval.json, predictions.jsonl, general_mc.jsonl and the judged benchmarks.
        device: auto (CUDA when available), cpu or cuda[:N].
        threads: CPU threads for torch (fewer than the cores can be faster on a shared machine); null = default.
    """
    import torch

    started = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    chosen = EvalSettings(**settings)
    if validate_judge:
        return check_judge_pipeline(validate_judge)
    request = JudgeRequest(judge or [], judge_config, judge_limit, judge_answers)
    options = CommandOptions(
        model or ModelConfig(), adapter, strategy, rules, prompts, baseline, compare_base, output, device
    )
    if judge_answers:
        return grade_answers(options, request, started)
    evaluate(options, chosen, request, started)
