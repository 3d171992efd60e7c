"""A grid's finished runs as the report reads them: each ``done.json`` with its evaluations and its fit's summary,
and the seeds of one run grouped together."""

from __future__ import annotations

import json
from pathlib import Path

from rega.eval.domain.scoring import FIXED_ROLE
from rega.eval.general.generative import compare_with_base_answers


def latest_fit_dir(run_dir: Path) -> Path | None:
    """The folder of a run's finished fit: its last ``fit/version_<n>`` with a summary.json, or ``fit/`` as
    records store it; None when there is none (a merge, a zero-shot run)."""
    versions = sorted(
        run_dir.glob("fit/version_*/summary.json"), key=lambda p: int(p.parent.name.split("_")[1])
    )
    found = [p for p in (run_dir / "fit" / "summary.json", *versions) if p.exists()]
    return found[-1].parent if found else None


def fit_summary(run_dir: Path) -> dict:
    """The summary.json of a run's finished fit (:func:`latest_fit_dir`); empty when there is none."""
    fit = latest_fit_dir(run_dir)
    return json.loads((fit / "summary.json").read_text(encoding="utf-8")) if fit else {}


def _read_run(done: Path) -> dict | None:
    run_dir = done.parent
    eval_path = run_dir / "eval" / "eval.json"
    if not eval_path.exists():
        return None
    run = json.loads(done.read_text(encoding="utf-8"))
    # r as the fit's corpus was built with it (None for a strategy without D'_i); done.json holds the grid's
    # request (None when unset), all that older fits recorded.
    fitted = fit_summary(run_dir)
    if "mix_ratio" in fitted:
        run["mix_ratio"] = fitted["mix_ratio"]
    run["eval"] = json.loads(eval_path.read_text(encoding="utf-8"))
    run["_eval_path"] = str(eval_path)
    run["matrix"] = split_matrix(run["eval"])
    matrix = run_dir / "eval_matrix" / "eval.json"  # where grids before the fused matrix wrote it
    if matrix.exists():
        run["matrix"] = json.loads(matrix.read_text(encoding="utf-8"))
    return run


def split_matrix(result: dict) -> dict | None:
    """The prompt matrix a grid evaluates together with a run's own rules (its ``role:<domain>`` rules), moved
    out of the run's evaluation ``result`` into ``{"rules": ...}``; None when there is none."""
    rules = result.get("rules", {})
    matrix = {rule: rules.pop(rule) for rule in list(rules) if rule.startswith(FIXED_ROLE)}
    return {"rules": matrix} if matrix else None


def finished_dones(runs_dir: Path) -> list[Path]:
    """Each finished job's ``done.json``: ``<name>/done.json`` and, for grids with seeds,
    ``<name>/seed_<s>/done.json``, in path order."""
    return sorted([*runs_dir.glob("*/done.json"), *runs_dir.glob("*/seed_*/done.json")])


def load_runs(runs_dir: Path, seeds: list[int] | None = None) -> list[dict]:
    """Every evaluated run (:func:`finished_dones`; of ``seeds`` only, where given, and a run without seeds, such
    as greedy zero-shot, always); general answers evaluated without the base model's are compared with a zero-shot
    run's (its answers are the base's)."""
    runs = [run for done in finished_dones(runs_dir) if (run := _read_run(done))]
    if seeds is not None:
        runs = [run for run in runs if run.get("seed") is None or run["seed"] in seeds]
    base = next((answers for run in runs if run.get("strategy") == "zero_shot"
                 and (answers := run["eval"].get("general_gen_answers"))), None)  # fmt: skip
    for run in runs if base else []:
        compare_with_base_answers(run["eval"], base)
    return runs


def group_runs(runs: list[dict]) -> list[dict]:
    """One group per run name: its seeds' evaluations together."""
    groups: dict[str, dict] = {}
    for run in runs:
        group = groups.setdefault(run["name"], {**run, "evals": [], "matrices": [], "seeds": []})
        group["evals"].append(run["eval"])
        group["seeds"].append(run.get("seed"))
        if run.get("matrix"):
            group["matrices"].append(run["matrix"])
    return list(groups.values())
