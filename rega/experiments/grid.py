"""Run a grid of strategies: for each run, ``fit`` then ``evaluate`` in their own processes, skipping finished runs.

Here runs go one after another; on a cluster, one job per run: ``rega grid --config G --index $SLURM_ARRAY_TASK_ID``
(see ``scripts/slurm_grid.sh``). A run is finished when ``<output>/<name>/done.json`` exists; a run that was
interrupted mid-fit resumes from its ``last.ckpt``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rega.data.prompts import ConfigError
from rega.data.strategies import get_strategy
from rega.io import write_json
from rega.paths import REPO_ROOT


@dataclass
class GridRun:
    """One run of a grid.

    Args:
        name: folder name of the run under the grid's output.
        strategy: a registered strategy (zero_shot runs only the evaluation).
        mix_ratio: r for strategies that use role integration.
        only_domains: train on these domains only (single-domain variants).
        fit_args: extra ``fit`` arguments for this run, e.g. ``["--trainer.max_epochs", "1"]``.
        eval_args: extra ``evaluate`` arguments for this run.
        prompt_matrix: override the grid's ``prompt_matrix`` for this run.
    """

    name: str
    strategy: str
    mix_ratio: float | None = None
    only_domains: list[str] = field(default_factory=list)
    fit_args: list[str] = field(default_factory=list)
    eval_args: list[str] = field(default_factory=list)
    prompt_matrix: bool | None = None


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
    """

    output: str = "runs/grid"
    fit_configs: list[str] = field(default_factory=list)
    eval_config: str | None = None
    runs: list[GridRun] = field(default_factory=list)
    prompt_matrix: bool = True


def cli_command(*args: str) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "cli.py"), *args]


def fit_command(grid: Grid, run: GridRun, run_dir: Path) -> list[str]:
    args = [a for cfg in grid.fit_configs for a in ("--config", cfg)]
    args += ["--data.corpus.strategy", run.strategy]
    if run.mix_ratio is not None:
        args += ["--data.corpus.mix_ratio", str(run.mix_ratio)]
    if run.only_domains:
        args += ["--data.corpus.only_domains", json.dumps(run.only_domains)]
    args += [
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.logger.init_args.save_dir", str(run_dir),
        "--trainer.logger.init_args.name", "fit",
        "--model.adapter_dir", str(run_dir / "adapter"),
        *run.fit_args,
    ]  # fmt: skip
    last = sorted(run_dir.glob("fit/version_*/checkpoints/last.ckpt"))
    if last and not (run_dir / "adapter" / "adapter_config.json").exists():
        args += ["--ckpt_path", str(last[-1])]  # an interrupted fit continues where it stopped
    return cli_command("fit", *args)


def eval_command(grid: Grid, run: GridRun, run_dir: Path, rules: list[str], output: Path) -> list[str]:
    args = ["--config", grid.eval_config] if grid.eval_config else []
    args += ["--strategy", run.strategy, "--rules", json.dumps(rules), "--output", str(output)]
    if run.strategy != "zero_shot":
        args += ["--adapter", str(run_dir / "adapter")]
    return cli_command("evaluate", *args, *run.eval_args)


def run_logged(command: list[str], log_path: Path) -> float:
    """Run a stage with its output in ``log_path``; raise with the log's tail if it fails."""
    start = time.perf_counter()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ {' '.join(command)}\n")
        log.flush()
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=stage_env(os.environ))
    if done.returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"stage failed (exit {done.returncode}), see {log_path}:\n{tail}")
    return time.perf_counter() - start


def stage_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of a stage. A grid running as a SLURM job's single task (``--ntasks-per-node=1``) hides
    that layout from its fits, which Lightning would otherwise reject with more than one GPU; a fit then starts one
    process per GPU of the node itself."""
    env = {**environ, "PYTHONUNBUFFERED": "1"}
    if env.get("SLURM_NTASKS") == "1":
        env.pop("SLURM_NTASKS")
    return env


def domains_of(grid: Grid) -> list[str]:
    """The role-prompt domains of the evaluation tasks (for the prompt-by-domain matrix)."""
    if not grid.eval_config:
        return []
    import yaml

    from rega.data.loaders import DataSource, load_many

    config = yaml.safe_load(Path(grid.eval_config).read_text(encoding="utf-8")) or {}
    sources = [DataSource(**t) for t in config.get("tasks", [])]
    return sorted({r.domain for r in load_many(sources).records} - {"general"})


def run_one(grid: Grid, run: GridRun) -> dict:
    spec = get_strategy(run.strategy)
    run_dir = Path(grid.output) / run.name
    done = run_dir / "done.json"
    if done.exists():
        print(f"[grid] {run.name}: finished before, skipped")
        return json.loads(done.read_text(encoding="utf-8"))
    print(f"[grid] {run.name}: strategy={run.strategy} r={run.mix_ratio}", flush=True)
    timings = {}
    if run.strategy != "zero_shot":
        timings["fit_s"] = round(run_logged(fit_command(grid, run, run_dir), run_dir / "fit.log"), 1)
    rules = list(spec.inference)
    timings["eval_s"] = round(
        run_logged(eval_command(grid, run, run_dir, rules, run_dir / "eval"), run_dir / "eval.log"), 1
    )
    wants_matrix = grid.prompt_matrix if run.prompt_matrix is None else run.prompt_matrix
    if wants_matrix and "role" in spec.inference:
        matrix_rules = [f"role:{d}" for d in domains_of(grid)]
        command = eval_command(grid, run, run_dir, matrix_rules, run_dir / "eval_matrix")
        command += ["--general_mc", "[]", "--drift", "[]"]
        timings["matrix_s"] = round(run_logged(command, run_dir / "eval.log"), 1)
    meta = {
        **asdict(run),
        "inference": rules,
        "timings": timings,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json(done, meta)
    print(f"[grid] {run.name}: done in {sum(timings.values()):.0f} s", flush=True)
    return meta


def grid_command(grid: Grid, only: list[str] | None = None, index: int | None = None) -> None:
    """Run every run of a grid (or some), skipping finished ones; ``rega report`` then compares them.

    Args:
        grid: the grid: output folder, fit and evaluate configs, runs.
        only: run only the runs with these names.
        index: run only the run at this position (a cluster array job's index).
    """
    runs = grid.runs
    for run in runs:
        get_strategy(run.strategy)  # unknown strategies fail before anything runs
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"run names must be unique: {names}")
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise ConfigError(f"no run named {', '.join(unknown)} in the grid ({', '.join(names)})")
        runs = [r for r in runs if r.name in only]
    if index is not None:
        if not 0 <= index < len(grid.runs):
            raise ConfigError(f"index {index} outside the grid's {len(grid.runs)} runs")
        runs = [grid.runs[index]]
    for run in runs:
        run_one(grid, run)
