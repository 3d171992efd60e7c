"""One evaluation, as a plain function the training callback and the ``evaluate`` command both call.

``evaluate_model`` runs, for one model: domain evaluation under each prompt rule (:mod:`rega.eval.domain`),
judge-free general scores — general multiple choice and drift (:mod:`rega.eval.retention`) — and returns one
JSON-serialisable dict::

    {"rules": {"central": {"overall", "task_mean", "domains": {domain: {"score", "tasks": {task: {...}}}}}, ...},
     "general_mc": {name: {"acc", "acc_norm", "n", "metric", "score", "backend", ["base", "delta"]}},
     "drift": {name: {"logprob_per_token", "ppl", "n_records", "n_tokens", "truncated", ["base", "delta"]}},
     "judge": {...},            # only when the LLM-judge evaluations ran (evaluate command, optional)
     "samples": [...],          # a few answers per (rule, task), for reading
     "meta": {...}}             # rules, prompts, settings, timings, files

With ``output_dir`` it also writes the per-example rows there (rank 0 only): ``predictions.jsonl`` (domain
answers: response, extracted answer, gold, score) and ``general_mc.jsonl`` (option log-likelihoods).

``rega evaluate`` evaluates the base model (zero-shot baseline) or a saved LoRA adapter standalone and writes
``eval.json``; see :func:`evaluate_command` and ``configs/eval/``.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from rega.config import DataSource, ModelConfig
from rega.data.chat import ChatFormat
from rega.data.loaders import load_records
from rega.data.prompts import CENTRAL, PromptConfig, RolePrompts, resolve_prompts
from rega.data.records import GENERAL, Record
from rega.data.strategies import ROLE, get_strategy
from rega.errors import ConfigError, EmptyDataError, JudgeError
from rega.eval.domain import CLOSED_SCORING, TaskData, check_rule, evaluate_domains, load_task_records
from rega.eval.items import item_results, trivial_baselines
from rega.eval.metrics import dist_info
from rega.eval.retention import DEFAULT_MC, base_model, drift_scores, general_mc_scores, resolve_mc_set
from rega.eval.summary import samples_markdown, scalars, summary_text  # noqa: F401  (re-exported)
from rega.io import atomic_dir, check_output_dir, write_json, write_jsonl
from rega.modules.export import check_adapter, load_adapter

log = logging.getLogger(__name__)


@dataclass
class EvalSettings:
    """What to evaluate and how; shared by :class:`rega.callbacks.EvaluationCallback` and ``rega evaluate``.

    Args:
        tasks: domain evaluation sources (test or dev sets); each names its domain or its rows do.
        limit_per_task: keep the first N records of each (domain, task); ``None`` keeps all.
        max_new_tokens: generation cap for free-form answers (greedy decoding).
        closed_max_new_tokens: generation cap for closed tasks (labels, letters); ``None`` uses ``max_new_tokens``.
        batch_size: sequences per generation / scoring batch.
        loglik_choices: also score closed tasks by the log-likelihood of each option (``ll_acc``).
        loglik_norm: ``mean`` or ``sum`` of the option's token log-probabilities for ``ll_acc``.
        closed_scoring: ``generate`` (closed tasks scored by the greedy answer, the paper's metric) or ``loglik``
            (by the options' log-likelihood only, ``ll_acc``; nothing generated, about one prefill per question).
        max_batch_tokens: cap on a batch's padded tokens (rows times longest prompt): short prompts then go in
            batches of up to ``batch_size`` rows, long ones in fewer; ``None``: ``batch_size`` rows always.
        general_mc: general multiple-choice sets: built-in names (arc_easy, arc_challenge, piqa, boolq, hellaswag,
            winogrande, truthfulqa_mc1, commonsense_qa, openbookqa, ceval, cmmlu), JSONL paths (``name=PATH``,
            ``name:letters=PATH``) or ``lm_eval:<task>``; ``None`` picks two by the tasks' language (English:
            arc_easy, piqa; Chinese: ceval, cmmlu); ``[]`` skips them.
        general_mc_limit: first N items of each general multiple-choice set; ``None`` for all.
        general_mc_backend: ``auto``, ``lm_eval`` (lm-evaluation-harness) or ``native`` (see rega.eval.retention).
        drift: sources of reference responses whose log-likelihood under the model measures drift from the base
            model: held-out self-distilled base-model answers and general reference answers (records with output).
        drift_limit: first N records of each drift source; ``None`` for all.
        drift_max_length: token cap per drift example (responses are cut at their end).
        sample_rows: answers per (rule, task) kept in ``samples`` (and the TensorBoard table).
    """

    tasks: list[DataSource] = field(default_factory=list)
    limit_per_task: int | None = None
    max_new_tokens: int = 128
    closed_max_new_tokens: int | None = 32
    batch_size: int = 8
    loglik_choices: bool = False
    loglik_norm: str = "mean"
    closed_scoring: str = "generate"
    max_batch_tokens: int | None = None
    general_mc: list[str] | None = None
    general_mc_limit: int | None = 100
    general_mc_backend: str = "auto"
    drift: list[DataSource] = field(default_factory=list)
    drift_limit: int | None = 100
    drift_max_length: int = 1024
    sample_rows: int = 3

    def __post_init__(self) -> None:
        if self.closed_scoring not in CLOSED_SCORING:  # before any model loads
            raise ConfigError(
                f"closed_scoring must be {' or '.join(CLOSED_SCORING)}, got {self.closed_scoring!r}"
            )

    @classmethod
    def from_arguments(cls, arguments: dict) -> EvalSettings:
        """The settings among a function's keyword arguments (``locals()``): the CLI and the callback take them
        flat, so that YAML configs and ``--help`` list them one by one."""
        values = {f.name: arguments[f.name] for f in fields(cls) if f.name in arguments}
        for name in ("tasks", "drift"):
            values[name] = list(values.get(name) or [])
        if values.get("general_mc") is not None:
            values["general_mc"] = list(values["general_mc"])
        return cls(**values)


def source_name(source: DataSource) -> str:
    """A short name for a source: its task, else its folder (for train/dev/test files) or file stem."""
    if source.task:
        return source.task
    path = Path(source.path.split(":", 1)[-1])
    return path.parent.name if path.stem in ("train", "dev", "test") and path.parent.name else path.stem


def mc_set_names(settings: EvalSettings, records: Sequence[Record]) -> list[str]:
    if settings.general_mc is not None:
        return list(settings.general_mc)
    zh = sum(r.lang == "zh" for r in records)
    return DEFAULT_MC["zh" if zh > len(records) / 2 else "en"]


def load_drift_sources(settings: EvalSettings) -> dict[str, list[Record]]:
    out: dict[str, list[Record]] = {}
    for source in settings.drift:
        name = source_name(source)
        if name in out:
            raise ConfigError(
                f"two drift sources are both named {name!r}: set 'task' on one to tell them apart"
            )
        records = load_records(source, skip_invalid=True).records
        out[name] = records[: settings.drift_limit] if settings.drift_limit is not None else records
    return out


def _with_base(current: dict, base: dict | None, key: str) -> dict:
    if not base or current.get(key) is None or base.get(key) is None:
        return current
    return {**current, "base": base[key], "delta": current[key] - base[key]}


def samples(rows: Sequence[dict], per_task: int, width: int = 300) -> list[dict]:
    """The first ``per_task`` rows of each (rule, task), responses cut to ``width`` characters."""
    taken: dict[tuple[str, str], int] = defaultdict(int)
    out = []
    for row in rows:
        key = (row["rule"], row["task"])
        if taken[key] >= per_task:
            continue
        taken[key] += 1
        gold = str(row.get("gold", ""))
        out.append(
            {
                "rule": row["rule"],
                "domain": row["domain"],
                "task": row["task"],
                "id": row["id"],
                "gold": gold[:width],
                "pred": row.get("pred"),
                "score": row.get("score"),
                "response": row["response"][:width],
            }
        )
    return out


def evaluate_model(
    model,
    tokenizer,
    chat: ChatFormat,
    prompts: RolePrompts,
    inference_rules: Sequence[str],
    settings: EvalSettings,
    *,
    data: TaskData | None = None,
    output_dir: str | Path | None = None,
    base_reference: dict | None = None,
    domain_eval: bool = True,
) -> dict:
    """Evaluate one model (see the module docstring for the result's shape).

    Args:
        model: a causal LM (plain or peft-wrapped) on its device; its train/eval mode is restored afterwards.
        tokenizer, chat: its tokenizer and chat rendering.
        prompts: p_c and the role prompts p_i.
        inference_rules: prompt rules, ``central`` and/or ``role`` (a strategy's ``inference``).
        settings: what to evaluate.
        data: preloaded task records (else loaded from ``settings.tasks``).
        output_dir: where rank 0 writes predictions.jsonl and general_mc.jsonl; ``None`` writes nothing.
        base_reference: an earlier result of the base model; general MC and drift get ``base`` and ``delta``.
        domain_eval: run the domain tasks (off to measure only general MC and drift, e.g. for the base model).

    Under DDP every rank must call it (work is sharded and synced); all ranks return the same dict.
    """
    for rule in inference_rules:
        check_rule(rule)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    if data is None:
        data = load_task_records(settings.tasks, settings.limit_per_task) if domain_eval else TaskData([], {})
    result: dict = {"rules": {}, "general_mc": {}, "drift": {}}
    rows: list[dict] = []
    if domain_eval and data.records:
        t0 = time.perf_counter()
        result["rules"], rows = evaluate_domains(
            model,
            tokenizer,
            chat,
            prompts,
            list(inference_rules),
            data,
            max_new_tokens=settings.max_new_tokens,
            closed_max_new_tokens=settings.closed_max_new_tokens,
            batch_size=settings.batch_size,
            loglik_choices=settings.loglik_choices,
            loglik_norm=settings.loglik_norm,
            closed_scoring=settings.closed_scoring,
            max_batch_tokens=settings.max_batch_tokens,
        )
        timings["domain_s"] = round(time.perf_counter() - t0, 1)

    mc_rows: list[dict] = []
    sets = [resolve_mc_set(spec) for spec in mc_set_names(settings, data.records)]
    if sets:
        t0 = time.perf_counter()
        summary, mc_rows = general_mc_scores(
            model,
            tokenizer,
            chat,
            prompts.central,
            sets,
            limit=settings.general_mc_limit,
            batch_size=settings.batch_size,
            backend=settings.general_mc_backend,
        )
        base = (base_reference or {}).get("general_mc", {})
        result["general_mc"] = {
            name: _with_base(value, base.get(name), "score") for name, value in summary.items()
        }
        timings["general_mc_s"] = round(time.perf_counter() - t0, 1)

    drift_rows: list[dict] = []
    drift_sources = load_drift_sources(settings)
    if drift_sources:
        t0 = time.perf_counter()
        scores = drift_scores(
            model,
            tokenizer,
            chat,
            prompts.central,
            drift_sources,
            settings.batch_size,
            settings.drift_max_length,
            rows=drift_rows,
        )
        base = (base_reference or {}).get("drift", {})
        result["drift"] = {
            name: _with_base(value, base.get(name), "logprob_per_token") for name, value in scores.items()
        }
        timings["drift_s"] = round(time.perf_counter() - t0, 1)

    result["items"] = item_results(rows, mc_rows, result["general_mc"], drift_rows)  # for the report's tests
    result["baselines"] = trivial_baselines(settings.tasks, data.records, data.labels) if rows else {}
    result["samples"] = samples(rows, settings.sample_rows)
    timings["total_s"] = round(time.perf_counter() - started, 1)
    files = {}
    rank, _ = dist_info()
    if output_dir is not None and rank == 0:
        out = Path(output_dir)
        if rows:
            write_jsonl(out / "predictions.jsonl", rows)
            files["predictions"] = str(out / "predictions.jsonl")
        if mc_rows:
            write_jsonl(out / "general_mc.jsonl", mc_rows)
            files["general_mc"] = str(out / "general_mc.jsonl")
    result["meta"] = {
        "inference_rules": list(inference_rules),
        "prompts": prompts.to_dict(),
        "settings": asdict(settings),
        "n_records": len(data.records),
        "timings": timings,
        "files": files,
    }
    return result


def base_reference(
    model, tokenizer, chat: ChatFormat, prompts: RolePrompts, settings: EvalSettings, records=()
) -> dict:
    """General MC and drift of the base model: ``model`` with its LoRA adapters disabled (or as is)."""
    names = mc_set_names(settings, list(records))
    only_general = replace(settings, tasks=[], general_mc=names)
    with base_model(model):
        return evaluate_model(
            model, tokenizer, chat, prompts, [CENTRAL], only_general, data=TaskData([], {}), domain_eval=False
        )


# --------------------------------------------------------------------------------------------- command


EVAL_FILES = ("eval.json", "predictions.jsonl", "general_mc.jsonl")
JUDGE_BENCHMARKS = {
    "mt_bench": ("rega.eval.mt_bench", "run_mt_bench"),
    "general_zh": ("rega.eval.general_zh", "run_general_zh"),
    "general_en": ("rega.eval.general_zh", "run_general_en"),
}


def prepare_judge(names: Sequence[str], judge_config: str | None):
    """(JudgeConfig, JudgeClient), or (None, None) without a config (answers only): built before any model loads,
    so an unknown benchmark, a missing key or a missing ``openai`` package fails at once."""
    for name in names:
        if name not in JUDGE_BENCHMARKS:
            raise ConfigError(f"unknown judge benchmark {name!r}; use {', '.join(JUDGE_BENCHMARKS)}")
    if not (names and judge_config):
        return None, None
    from rega.eval.judge import JudgeClient, load_judge_config

    judge = load_judge_config(judge_config)
    return judge, JudgeClient(judge)


def run_judge_benchmarks(model, tokenizer, chat, system: str, names, judge, client, limit, out: Path) -> dict:
    """The LLM-judge evaluations (imported lazily: they are optional here). Without a judge only the answers are
    generated (no network). A benchmark whose judge fails is recorded with its ``error`` and the others still run:
    the evaluation fails at the end (:func:`judge_problems`), with every output kept."""
    import importlib

    results = {}
    for name in names:
        module, func = JUDGE_BENCHMARKS[name]
        run = getattr(importlib.import_module(module), func)
        kwargs = {"output_dir": str(out / name), "limit": limit, "judge_client": client}
        try:
            results[name] = run(model, tokenizer, chat, system, judge, **kwargs)
        except JudgeError as err:
            log.error("judge benchmark %s failed: %s", name, err)
            results[name] = {"benchmark": name, "error": str(err)}
    return results


def judge_problems(results: dict, judge) -> list[str]:
    """One line per judged benchmark that failed or has too many missing scores (none without a judge)."""
    from rega.eval.ratings import missing_problem

    if judge is None:
        return []
    problems = (missing_problem(name, result, judge.max_missing_share) for name, result in results.items())
    return [problem for problem in problems if problem]


def _relocate(obj, old: str, new: str):
    """``obj`` with every path under the temporary output folder ``old`` moved to the final folder ``new``."""
    if isinstance(obj, str):
        return new + obj[len(old) :] if obj.startswith(old) else obj
    if isinstance(obj, dict):
        return {key: _relocate(value, old, new) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_relocate(value, old, new) for value in obj]
    return obj


def _check_inputs(settings: EvalSettings, data: TaskData, judge: Sequence[str] | None) -> None:
    """An evaluation of zero items is an error that names the sources, before the model loads."""
    if settings.tasks and not data.records:
        sources = ", ".join(source.path for source in settings.tasks)
        raise EmptyDataError(f"no evaluation items: the task sources hold no records ({sources})")
    if not (data.records or mc_set_names(settings, data.records) or settings.drift or judge):
        raise EmptyDataError("nothing to evaluate: set tasks, general_mc, drift or judge")


def evaluate_command(
    model: ModelConfig | None = None,
    adapter: str | None = None,
    strategy: str = "zero_shot",
    rules: list[str] | None = None,
    prompts: PromptConfig | None = None,
    tasks: list[DataSource] | None = None,
    limit_per_task: int | None = None,
    max_new_tokens: int = 128,
    closed_max_new_tokens: int | None = 32,
    batch_size: int = 8,
    loglik_choices: bool = False,
    loglik_norm: str = "mean",
    closed_scoring: str = "generate",
    max_batch_tokens: int | None = None,
    general_mc: list[str] | None = None,
    general_mc_limit: int | None = 100,
    general_mc_backend: str = "auto",
    drift: list[DataSource] | None = None,
    drift_limit: int | None = 100,
    drift_max_length: int = 1024,
    baseline: str | None = None,
    compare_base: bool = False,
    judge: list[str] | None = None,
    judge_config: str | None = None,
    judge_limit: int | None = None,
    output: str = "runs/eval",
    device: str = "auto",
    threads: int | None = None,
) -> None:
    """Evaluate the base model (zero-shot baseline) or a saved LoRA adapter; write eval.json and print a summary.

    Args:
        model: the base model, as ModelConfig fields (``name_or_path``, ``chat_template``, ``system_placement``,
            ``dtype`` ...); default the embedded SmolLM2-135M-Instruct.
        adapter: a saved peft adapter folder to evaluate on top of the base model; none evaluates the base model.
        strategy: the strategy whose inference prompt rules apply (zero_shot, ft, ftsd: p_c; ftrp: p_i; rega: both).
        rules: override the prompt rules: ``[central]``, ``[role]`` or both.
        prompts: p_c and role prompts (default: the built-in prompts in the tasks' language; p_c = the model's own
            system prompt).
        tasks: domain evaluation sources (test or dev sets), e.g. ``{path: "shared:pubmedqa/dev.jsonl"}``.
        limit_per_task: first N records of each task.
        max_new_tokens: generation cap for free-form answers.
        closed_max_new_tokens: generation cap for closed tasks; null uses max_new_tokens.
        batch_size: sequences per batch.
        loglik_choices: also score closed tasks by option log-likelihood (ll_acc).
        loglik_norm: mean or sum of option token log-probabilities for ll_acc.
        closed_scoring: generate (greedy answers, accuracy: the paper's metric) or loglik (options by
            log-likelihood only: ll_acc, one prefill per question, no answer format involved).
        max_batch_tokens: cap on padded tokens per batch (short prompts go in batches of up to batch_size).
        general_mc: general multiple-choice sets (built-in names, JSONL paths or lm_eval:<task>); null picks two
            by the tasks' language; [] skips them.
        general_mc_limit: first N items per general multiple-choice set.
        general_mc_backend: auto, lm_eval or native.
        drift: reference-response sources for drift (self-distilled base answers, general references).
        drift_limit: first N records per drift source.
        drift_max_length: token cap per drift example.
        baseline: an earlier eval.json (e.g. the zero-shot run) whose general MC and drift values give deltas.
        compare_base: with an adapter, also measure general MC and drift with the adapter disabled (deltas).
        judge: LLM-judge benchmarks to run as well: mt_bench, general_en, general_zh (their scores go under
            ``judge`` in eval.json, next to the judge-free ones).
        judge_config: the judge's YAML (``configs/eval/judge_*.yaml``); without it only answers are generated.
        judge_limit: first N questions of each judge benchmark.
        output: output folder for eval.json, predictions.jsonl and general_mc.jsonl.
        device: auto (CUDA when available), cpu or cuda[:N].
        threads: CPU threads for torch (fewer than the cores can be faster on a shared machine); null = default.
    """
    import json

    import torch

    from rega.model_source import load_tokenizer
    from rega.modules.model import load_model

    started = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    model_config = model or ModelConfig()
    settings = EvalSettings.from_arguments(locals())
    inference = tuple(rules) if rules else get_strategy(strategy).inference
    for rule in inference:
        check_rule(rule)
    if compare_base and not adapter:
        raise ConfigError("compare_base needs an adapter (the base model is what is being evaluated)")
    out = check_output_dir(output, [*EVAL_FILES, *JUDGE_BENCHMARKS], "evaluation outputs")
    if adapter:
        check_adapter(adapter)
    judge_settings, judge_client = prepare_judge(judge or [], judge_config)
    data = load_task_records(settings.tasks, settings.limit_per_task)
    _check_inputs(settings, data, judge)
    for spec in mc_set_names(settings, data.records):
        resolve_mc_set(spec)  # fail on a bad name before the model loads
    reference = json.loads(Path(baseline).read_text(encoding="utf-8")) if baseline else None

    tokenizer = load_tokenizer(model_config)
    chat = ChatFormat(tokenizer, model_config.chat_template, model_config.system_placement)
    domains = sorted({r.domain for r in data.records if r.domain != GENERAL}) if ROLE in inference else []
    domains += [rule.split(":", 1)[1] for rule in inference if rule.startswith("role:")]  # prompt matrix
    if prompts is None:  # built-in role prompts in the tasks' language
        zh = sum(r.lang == "zh" for r in data.records)
        prompts = PromptConfig(lang="zh" if zh > len(data.records) / 2 else "en")
    role_prompts = resolve_prompts(prompts, domains, chat.default_system)
    target = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    lm = load_model(model_config).to(target)
    if adapter:
        lm = load_adapter(lm, adapter, model_config.name_or_path)
    lm.eval()
    load_s = round(time.perf_counter() - started, 1)
    if compare_base:
        reference = base_reference(lm, tokenizer, chat, role_prompts, settings, data.records)
    # Every output goes into a temporary folder that replaces `out` as a whole: never a mix of two runs.
    with atomic_dir(out) as tmp:
        result = evaluate_model(
            lm,
            tokenizer,
            chat,
            role_prompts,
            inference,
            settings,
            data=data,
            output_dir=tmp,
            base_reference=reference,
        )
        if judge:
            t0 = time.perf_counter()
            result["judge"] = run_judge_benchmarks(
                lm,
                tokenizer,
                chat,
                role_prompts.central,
                judge,
                judge_settings,
                judge_client,
                judge_limit,
                tmp,
            )
            result["meta"]["timings"]["judge_s"] = round(time.perf_counter() - t0, 1)
        result["meta"].update(
            model=asdict(model_config),
            adapter=adapter,
            strategy=strategy,
            baseline=baseline,
            compare_base=compare_base,
            device=target,
            threads=torch.get_num_threads(),
        )
        result["meta"]["timings"]["load_s"] = load_s
        result["meta"]["timings"]["wall_s"] = round(time.perf_counter() - started, 1)
        result = _relocate(result, str(tmp), str(out))
        write_json(tmp / "eval.json", result)
    print(summary_text(result))
    print(f"wrote {out / 'eval.json'}")
    problems = judge_problems(result.get("judge", {}), judge_settings)
    if problems:
        raise JudgeError(*(f"{problem} (outputs kept in {out})" for problem in problems))
