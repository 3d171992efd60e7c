"""``rega records``: a grid's finished runs as the project commits them under ``docs/results/<grid>/runs``.

A record is what the report reads and nothing a reader cannot regenerate or should not see: ``done.json``, every
evaluation (``eval/``, ``eval_auto/``, ``eval_matrix/``) with its ``samples`` dropped (they quote the datasets),
the finished fit's ``summary.json`` and ``config.yaml`` in ``fit/``, and an SDFT run's rewrite summary as
``rewrite_summary.json``; no adapter, checkpoint, log or D_g. Each job's record replaces its folder whole, so an
archive of a grid between sittings adds the new seeds and keeps the committed ones.

    python cli.py records --runs runs/grid/cpu_en_forgetting_strategies \
        --output docs/results/cpu_en_forgetting_strategies/runs
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rega.errors import ConfigError
from rega.experiments.report_runs import finished_dones, latest_fit_dir
from rega.io import atomic_dir, write_json

FIT_FILES = ("summary.json", "config.yaml")
# an SDFT run's rewrite summary as a grid writes it, and as a record stores it
REWRITE_SUMMARIES = ("rewrite/summary.json", "rewrite_summary.json")


def finished_jobs(runs_dir: Path, only: list[str] | None = None) -> list[Path]:
    """Each finished job's folder (``<run>/`` or ``<run>/seed_<s>/`` with a ``done.json``), in name order."""
    jobs = [done.parent for done in finished_dones(runs_dir)]
    if only is not None:
        unknown = sorted(set(only) - {_run_name(runs_dir, job) for job in jobs})
        if unknown:
            raise ConfigError(f"--only names no finished run under {runs_dir}: {', '.join(unknown)}")
        jobs = [job for job in jobs if _run_name(runs_dir, job) in only]
    return jobs


def _run_name(runs_dir: Path, job: Path) -> str:
    return job.relative_to(runs_dir).parts[0]


def write_record(job: Path, target: Path) -> list[str]:
    """Write one job's record into ``target`` (replaced whole); returns the files written, relative to it."""
    written = []
    with atomic_dir(target) as tmp:
        shutil.copyfile(job / "done.json", tmp / "done.json")
        written.append("done.json")
        for evaluation in sorted(job.glob("eval*/eval.json")):
            result = json.loads(evaluation.read_text(encoding="utf-8"))
            if "samples" in result:
                result["samples"] = None
            name = evaluation.relative_to(job).as_posix()
            write_json(tmp / name, result)
            written.append(name)
        fit = latest_fit_dir(job)
        for name in FIT_FILES if fit else ():
            if (fit / name).is_file():
                (tmp / "fit").mkdir(exist_ok=True)
                shutil.copyfile(fit / name, tmp / "fit" / name)
                written.append(f"fit/{name}")
        rewrite = next((job / p for p in REWRITE_SUMMARIES if (job / p).is_file()), None)
        if rewrite:
            shutil.copyfile(rewrite, tmp / "rewrite_summary.json")
            written.append("rewrite_summary.json")
    return written


def archive_runs(runs_dir: str | Path, output: str | Path, only: list[str] | None = None) -> list[Path]:
    """Write the record of every finished job under ``runs_dir`` into ``output`` at the same relative path."""
    runs_dir, output = Path(runs_dir), Path(output)
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"no grid output folder {runs_dir}")
    if output.resolve() == runs_dir.resolve():
        raise ConfigError(f"--output is the grid's own folder {runs_dir}: records would replace its runs")
    jobs = finished_jobs(runs_dir, only)
    if not jobs:
        raise FileNotFoundError(f"no finished runs (done.json) under {runs_dir}")
    targets = []
    for job in jobs:
        target = output / job.relative_to(runs_dir)
        written = write_record(job, target)
        print(f"[records] {job.relative_to(runs_dir).as_posix()}: {', '.join(written)}", flush=True)
        targets.append(target)
    return targets


def records_command(runs: str, output: str, only: list[str] | None = None) -> None:
    """Copy a grid's finished runs into a results folder as the project commits them.

    A record is done.json, the evaluations without their samples, the finished fit's summary and config; no
    adapters, checkpoints or logs. Each job's record replaces its folder whole; records of jobs not under ``runs``
    are kept.

    Args:
        runs: the grid's output folder (``grid.output``).
        output: the records folder, e.g. docs/results/<grid>/runs (then ``rega report --runs`` it).
        only: copy these runs only (all their finished seeds).
    """
    targets = archive_runs(runs, output, only)
    print(f"wrote {len(targets)} records under {output}")
