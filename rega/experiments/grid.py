"""Run a grid of strategies: for each run, ``fit`` then ``evaluate`` in their own processes, skipping finished runs.

Here runs go one after another; on a cluster, one job per run: ``rega grid --config G --index $SLURM_ARRAY_TASK_ID``
(see ``scripts/slurm_grid.sh``). A run is finished when its ``done.json`` exists; a run that was interrupted
mid-fit resumes from its ``last.ckpt``, and one whose fit had finished (its ``adapter/`` is complete) is not trained
again: only what comes after runs. Two jobs on the same run take turns (a lock in its folder).

With ``seeds`` every run is repeated once per seed, in ``<output>/<name>/seed_<s>``: the seed sets the fit's
seed (``seed_everything``: LoRA init, dropout, batch order and the corpus draw D'_i) and the
self-distillation's sampling seed (each seed's D_g in its own folder). A run may also rewrite its domain data
first (``rewrite``: SDFT) or, instead of training, merge the adapters of other runs (``merge``: one LoRA per
domain); see :mod:`rega.experiments.stages`. A run with ``heldout_domains`` trains on the grid's other domains and
is evaluated on the held-out ones alone, under p_c and their hand-written p_i, and with the grid's ``auto_prompts``
also under the automatic p_i (``eval_auto/``): the report's held-out section (:mod:`rega.experiments.report_heldout`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rega.data.strategies import get_strategy
from rega.distill.rewrite import RewriteConfig
from rega.errors import ConfigError
from rega.eval.progress import format_duration
from rega.experiments.stages import (
    auto_eval_command,
    check_auto_prompts,
    cli_command,  # noqa: F401  (kept importable from here)
    domains_of,
    eval_command,
    fit_command,
    heldout_rules,
    merge_command,
    rewrite_command,
    run_logged,
    stage_env,  # noqa: F401
    trained,
    trained_domains,
)
from rega.io import waiting_lock, write_json


@dataclass
class MergeSpec:
    """Merge the adapters of other runs (same seed) into this run's adapter, instead of training one.

    Args:
        runs: names of the runs whose adapters are merged (e.g. one FT run per domain).
        combination_type: peft's ``add_weighted_adapter`` combination: linear, cat, ties, dare_linear,
            dare_ties, magnitude_prune, or an ``*_svd`` variant.
        weights: one weight per adapter (default 1 each).
        density: share of entries kept by TIES, DARE and magnitude pruning.
    """

    runs: list[str] = field(default_factory=list)
    combination_type: str = "ties"
    weights: list[float] | None = None
    density: float = 0.5


@dataclass
class GridRun:
    """One run of a grid.

    Args:
        name: folder name of the run under the grid's output.
        strategy: a registered strategy (zero_shot runs only the evaluation).
        mix_ratio: r for strategies that use role integration.
        only_domains: train on these domains only and evaluate on their tasks (single-domain variants).
        fit_args: extra ``fit`` arguments for this run, e.g. ``["--trainer.max_epochs", "1"]``.
        eval_args: extra ``evaluate`` arguments for this run.
        prompt_matrix: override the grid's ``prompt_matrix`` for this run.
        configs: extra ``fit`` config files, layered after the grid's (a loss term, replay data).
        label: the run's row label in the report (default: from the strategy).
        seeds: override the grid's seeds for this run (``[]``: run once, with the configs' own seeds).
        evaluate: evaluate the run (off for runs that only provide adapters, e.g. to a merge).
        rewrite: rewrite settings (:class:`rega.distill.rewrite.RewriteConfig`; its empty source and model are the
            fit configs'): the base model rewrites the domain data first (SDFT) and the fit trains on the rewrites.
        merge: merge other runs' adapters instead of training (see :class:`MergeSpec`).
        heldout_domains: unseen-domain evaluation: train on every domain of the grid's evaluation tasks but these,
            and evaluate on these alone, under p_c and their hand-written p_i (and the grid's ``auto_prompts``);
            not with ``only_domains``. A zero_shot run with them measures the base model under those prompts.
    """

    name: str
    strategy: str
    mix_ratio: float | None = None
    only_domains: list[str] = field(default_factory=list)
    fit_args: list[str] = field(default_factory=list)
    eval_args: list[str] = field(default_factory=list)
    prompt_matrix: bool | None = None
    configs: list[str] = field(default_factory=list)
    label: str | None = None
    seeds: list[int] | None = None
    evaluate: bool = True
    rewrite: RewriteConfig | None = None
    merge: MergeSpec | None = None
    heldout_domains: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # plain dicts when built from YAML without the CLI's parser (tests, scripts)
        if isinstance(self.merge, dict):
            self.merge = MergeSpec(**self.merge)
        if isinstance(self.rewrite, dict):
            self.rewrite = RewriteConfig(**self.rewrite)


@dataclass
class Grid:
    """A grid of runs sharing the same model, data and evaluation.

    Args:
        output: folder holding one sub-folder per run.
        fit_configs: ``fit`` config files, layered in order (model, trainer, experiment).
        eval_config: ``evaluate`` config file (tasks, general sets, drift sources).
        runs: the runs.
        prompt_matrix: also evaluate every test set under every domain's role prompt (inter-domain confusion),
            for strategies trained with role prompts.
        seeds: run every run once per seed (``<name>/seed_<s>``); ``None``: once, with the configs' seeds.
        distill_dir: where each seed's D_g is distilled (``<distill_dir>/seed_<s>``); default ``<output>/distill``.
        auto_prompts: a role-prompts file written by ``rega prompts``: runs with ``heldout_domains`` are also
            evaluated under its p_i of their held-out domains (``<run>/eval_auto``).
    """

    output: str = "runs/grid"
    fit_configs: list[str] = field(default_factory=list)
    eval_config: str | None = None
    runs: list[GridRun] = field(default_factory=list)
    prompt_matrix: bool = True
    seeds: list[int] | None = None
    distill_dir: str | None = None
    auto_prompts: str | None = None


def run_seeds(grid: Grid, run: GridRun) -> list[int | None]:
    seeds = grid.seeds if run.seeds is None else run.seeds
    return list(seeds) if seeds else [None]


def run_dir(grid: Grid, run: GridRun, seed: int | None) -> Path:
    base = Path(grid.output) / run.name
    return base if seed is None else base / f"seed_{seed}"


def jobs(grid: Grid, runs: list[GridRun] | None = None) -> list[tuple[GridRun, int | None]]:
    """(run, seed) pairs in grid order; a cluster array job's index counts these."""
    return [(run, seed) for run in (grid.runs if runs is None else runs) for seed in run_seeds(grid, run)]


def _evaluate(grid: Grid, run: GridRun, seed, directory: Path, timings: dict) -> list[str]:
    spec = get_strategy(run.strategy)
    rules = heldout_rules(run.strategy) if run.heldout_domains else list(spec.inference)
    command = eval_command(grid, run, directory, rules + _matrix_rules(grid, run), directory / "eval")
    _run_stage(directory, timings, "eval_s", command, "eval.log")
    if run.heldout_domains and grid.auto_prompts:
        _run_stage(directory, timings, "auto_s", auto_eval_command(grid, run, directory), "eval.log")
    return rules


def _matrix_rules(grid: Grid, run: GridRun) -> list[str]:
    """The prompt matrix's rules (every test set under every domain's p_i), evaluated with the run's own rules:
    one model load, and a rendering two rules share (``role`` and ``role:<its domain>``) answered once; the
    report moves them out of the run's rules (:func:`rega.experiments.report_runs.split_matrix`). A held-out
    run's prompt comparison is the held-out section's instead."""
    wants = grid.prompt_matrix if run.prompt_matrix is None else run.prompt_matrix
    if not wants or run.heldout_domains or "role" not in get_strategy(run.strategy).inference:
        return []
    return [f"role:{d}" for d in domains_of(grid)]


def _train(grid: Grid, run: GridRun, seed, directory: Path, timings: dict) -> None:
    if run.merge is not None:
        for name in run.merge.runs:  # the adapters it merges, trained first when they are not yet
            source = next((r for r in grid.runs if r.name == name), None)
            if source is None:
                raise ConfigError(f"run {run.name!r} merges run {name!r}, which is not in the grid")
            run_one(grid, source, seed)
        adapters = {name: str(run_dir(grid, _named(grid, name), seed) / "adapter") for name in run.merge.runs}
        command = merge_command(grid, run.merge, adapters, directory / "adapter")
        _run_stage(directory, timings, "merge_s", command, "merge.log")
        return
    extra: list[str] = []
    if run.rewrite:
        command = rewrite_command(grid, run, seed, directory / "rewrite")
        _run_stage(directory, timings, "rewrite_s", command, "rewrite.log")
        rewritten = json.dumps([{"path": str(directory / "rewrite" / "rewritten.jsonl")}])
        extra = ["--data.corpus.domains", rewritten]
    _run_stage(directory, timings, "fit_s", fit_command(grid, run, directory, seed) + extra, "fit.log")


TIMINGS = "timings.json"  # each finished stage's seconds, kept when a job stops before done.json


def _run_stage(directory: Path, timings: dict, key: str, command: list[str], log_name: str) -> None:
    """Run one stage of a job, logged to ``<run>/<log_name>``; its seconds go into ``timings`` and its file."""
    timings[key] = round(run_logged(command, directory / log_name), 1)
    write_json(directory / TIMINGS, timings)


def _named(grid: Grid, name: str) -> GridRun:
    return next(r for r in grid.runs if r.name == name)


LOCK = ".grid.lock"  # held by the job running a run, so two jobs never run the same one at once


def _say_waiting(tag: str) -> None:
    print(f"[grid] {tag}: another job is running it; waiting for that job", flush=True)


def run_one(grid: Grid, run: GridRun, seed: int | None = None) -> dict:
    """Run one (run, seed) job unless it is finished; returns its ``done.json``.

    Jobs that start together on one run (a cluster array's merge job and the per-domain jobs it merges, or one job
    submitted twice) take turns: the later one waits, then skips what the first finished or resumes what it left.
    """
    directory = run_dir(grid, run, seed)
    done = directory / "done.json"
    tag = run.name if seed is None else f"{run.name} seed {seed}"
    if not done.exists():
        with waiting_lock(directory / LOCK, on_wait=lambda: _say_waiting(tag)):
            if not done.exists():  # the job it waited for may have finished it
                return _run_job(grid, run, seed, directory, tag)
    print(f"[grid] {tag}: finished before, skipped", flush=True)
    return json.loads(done.read_text(encoding="utf-8"))


def _run_job(grid: Grid, run: GridRun, seed: int | None, directory: Path, tag: str) -> dict:
    print(f"[grid] {tag}: strategy={run.strategy} r={run.mix_ratio}", flush=True)
    saved = directory / TIMINGS  # stages an earlier job finished before it stopped
    timings: dict[str, float] = json.loads(saved.read_text(encoding="utf-8")) if saved.exists() else {}
    started, earlier = time.perf_counter(), bool(timings)
    if trained(directory):
        print(
            f"[grid] {tag}: its adapter/ is complete (an earlier job trained it), not trained again",
            flush=True,
        )
    elif run.strategy != "zero_shot":
        _train(grid, run, seed, directory, timings)
    rules = _evaluate(grid, run, seed, directory, timings) if run.evaluate else []
    meta = {
        **asdict(run),
        "seed": seed,
        "inference": rules,
        **({"auto_prompts": grid.auto_prompts} if run.heldout_domains and grid.auto_prompts else {}),
        "timings": timings,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json(directory / "done.json", meta)
    spent = f" (with an earlier job's stages: {format_duration(sum(timings.values()))})" if earlier else ""
    print(f"[grid] {tag}: done in {format_duration(time.perf_counter() - started)}{spent}", flush=True)
    return meta


def check_grid(grid: Grid) -> None:
    names = [r.name for r in grid.runs]
    for run in grid.runs:
        get_strategy(run.strategy)  # unknown strategies fail before anything runs
        for name in run.merge.runs if run.merge else []:
            if name not in names:
                raise ConfigError(f"run {run.name!r} merges run {name!r}, which is not in the grid")
    if len(set(names)) != len(names):
        raise ConfigError(f"run names must be unique: {names}")
    held = [run for run in grid.runs if run.heldout_domains]
    domains = domains_of(grid) if held else []
    for run in held:
        trained_domains(run, domains)  # a bad split fails before anything runs
    check_auto_prompts(grid.auto_prompts, sorted({d for run in held for d in run.heldout_domains}))


def grid_command(grid: Grid, only: list[str] | None = None, index: int | None = None) -> None:
    """Run every run of a grid (or some) once per seed, skipping finished ones; ``rega report`` then compares them.

    Args:
        grid: the grid: output folder, fit and evaluate configs, runs, seeds.
        only: run only the runs with these names.
        index: run only the (run, seed) job at this position (a cluster array job's index).
    """
    check_grid(grid)
    names = [r.name for r in grid.runs]
    runs = grid.runs
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise ConfigError(f"no run named {', '.join(unknown)} in the grid ({', '.join(names)})")
        runs = [r for r in runs if r.name in only]
    todo = jobs(grid, runs)
    if index is not None:
        every = jobs(grid)
        if not 0 <= index < len(every):
            raise ConfigError(f"index {index} outside the grid's {len(every)} jobs (runs x seeds)")
        todo = [every[index]]
    started, timed = time.perf_counter(), []
    for k, (run, seed) in enumerate(todo):
        t0 = time.perf_counter()
        was_done = (run_dir(grid, run, seed) / "done.json").exists()
        run_one(grid, run, seed)
        if not was_done:
            timed.append(time.perf_counter() - t0)
        left = len(todo) - k - 1
        eta = f", about {format_duration(left * sum(timed) / len(timed))} left" if timed and left else ""
        print(
            f"[grid] {k + 1}/{len(todo)} jobs, {format_duration(time.perf_counter() - started)}{eta}",
            flush=True,
        )
