"""``rega records``: a grid's finished runs copied as the project commits them; ``rega report --seeds`` and
``--versus``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rega.errors import ConfigError
from rega.experiments.records import archive_runs
from rega.experiments.report import write_report
from rega.experiments.report_runs import load_runs
from rega.io import write_json

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
GRIDS = sorted(p.parent.name for p in RESULTS.glob("*/runs"))


def grid_job(job: Path, name: str, seed: int | None, score: float) -> None:
    """A job folder as `rega grid` leaves it: records beside an adapter, logs, a resumed fit's two versions."""
    write_json(job / "done.json", {"name": name, "strategy": "ft", "seed": seed, "label": "Ré"})
    write_json(
        job / "eval" / "eval.json",
        {
            "rules": {"central": {"overall": score, "domains": {}}},
            "samples": [{"prompt": "a dataset's question"}],
            "general_gen_answers": {"item-1": "Café ® naïve"},
        },
    )
    write_json(job / "eval_matrix" / "eval.json", {"rules": {}, "samples": []})
    (job / "adapter").mkdir(parents=True)
    (job / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (job / "fit.log").write_text("log\n")
    (job / "fit" / "version_0").mkdir(parents=True)
    (job / "fit" / "version_0" / "config.yaml").write_text("seed_everything: 0  # interrupted\n")
    for version in ("version_1", "version_10"):  # numeric order: version_10 is the finished one
        write_json(job / "fit" / version / "summary.json", {"version": version})
        (job / "fit" / version / "config.yaml").write_text(f"# {version}\n")
    (job / "fit" / "version_10" / "checkpoints").mkdir()
    write_json(job / "rewrite" / "summary.json", {"kept": 3})


def test_records_keep_what_the_report_reads_and_nothing_else(tmp_path):
    runs, out = tmp_path / "grid", tmp_path / "records"
    grid_job(runs / "ft" / "seed_1", "ft", 1, 0.5)
    grid_job(runs / "ft" / "seed_2", "ft", 2, 0.7)
    (runs / "ft" / "seed_3").mkdir()  # not finished: no done.json

    archive_runs(runs, out)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    per_job = ["done.json", "eval/eval.json", "eval_matrix/eval.json", "fit/config.yaml", "fit/summary.json",
               "rewrite_summary.json"]  # fmt: skip
    assert files == [f"ft/seed_{s}/{name}" for s in (1, 2) for name in per_job]
    job = out / "ft" / "seed_2"
    assert (job / "done.json").read_bytes() == (runs / "ft" / "seed_2" / "done.json").read_bytes()
    assert (job / "fit" / "config.yaml").read_text() == "# version_10\n"
    evaluation = (job / "eval" / "eval.json").read_text(encoding="utf-8")
    assert json.loads(evaluation)["samples"] is None and "Café ® naïve" in evaluation  # no \\u escapes
    assert json.loads((job / "rewrite_summary.json").read_text()) == {"kept": 3}
    # the report reads the same runs from either folder
    assert [r["eval"]["rules"] for r in load_runs(out)] == [r["eval"]["rules"] for r in load_runs(runs)]


def test_records_add_new_seeds_and_replace_a_jobs_folder_whole(tmp_path):
    runs, out = tmp_path / "grid", tmp_path / "records"
    grid_job(runs / "ft" / "seed_2", "ft", 2, 0.7)
    grid_job(runs / "rega" / "seed_2", "rega", 2, 0.8)
    # committed in an earlier sitting
    write_json(out / "ft" / "seed_1" / "done.json", {"name": "ft", "seed": 1})
    write_json(out / "ft" / "seed_2" / "stale.json", {})

    archive_runs(runs, out, only=["ft"])
    assert (out / "ft" / "seed_1" / "done.json").exists()  # kept
    assert not (out / "ft" / "seed_2" / "stale.json").exists()  # the job's record replaced whole
    assert not (out / "rega").exists()  # not asked for


def test_records_refuse_bad_requests(tmp_path):
    runs = tmp_path / "grid"
    with pytest.raises(FileNotFoundError, match="no grid output folder"):
        archive_runs(runs, tmp_path / "out")
    grid_job(runs / "ft", "ft", None, 0.5)
    with pytest.raises(ConfigError, match="--only names no finished run .*: lwf"):
        archive_runs(runs, tmp_path / "out", only=["ft", "lwf"])
    with pytest.raises(ConfigError, match="would replace its runs"):
        archive_runs(runs, runs)
    assert (runs / "ft" / "adapter").exists()


@pytest.mark.parametrize("grid", GRIDS)
def test_committed_records_are_what_records_writes(grid, tmp_path):
    """Every committed record is byte for byte what `rega records` writes: archiving docs/results/<grid>/runs
    again changes nothing, so the results READMEs' commands reproduce what is committed."""
    committed = RESULTS / grid / "runs"
    archive_runs(committed, tmp_path)
    ours = {p.relative_to(committed): p.read_bytes() for p in committed.rglob("*") if p.is_file()}
    theirs = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert sorted(theirs) == sorted(ours)
    assert [name for name in ours if ours[name] != theirs[name]] == []


def test_report_of_some_seeds(tmp_path):
    runs = tmp_path / "grid"
    grid_job(runs / "zero_shot", "zero_shot", None, 0.4)
    for seed, score in ((1, 0.5), (2, 0.7)):
        grid_job(runs / "ft" / f"seed_{seed}", "ft", seed, score)
    assert [r.get("seed") for r in load_runs(runs, seeds=[2])] == [2, None]
    assert [r["eval"]["rules"]["central"]["overall"] for r in load_runs(runs, seeds=[1])] == [0.5, 0.4]
    with pytest.raises(FileNotFoundError, match=r"no finished runs of seeds \[9\]"):
        write_report(tmp_path / "empty_dir_that_is_missing", tmp_path / "out", seeds=[9])


def test_report_pairs_rows_with_another_strategy_on_request(tmp_path):
    """``--versus '[ftsd]'``: every row also paired with FTSD on the same items (REGA − FTSD), in results.md and
    results.csv; a strategy without a plain run is refused."""
    committed = RESULTS / "cpu_en_forgetting_strategies" / "runs"
    report = write_report(committed, tmp_path, seeds=[1234], versus=("ftsd",))
    rega, ftsd = (
        next(r for r in report["rows"] if r["label"] == label) for label in ("REGA_c (r=0.1)", "FTSD")
    )
    column = "gen_f1_vs_base:general_en"
    assert rega["_vs"]["FTSD"][column]["diff"] == pytest.approx(rega[column] - ftsd[column])
    assert "FTSD" not in ftsd["_vs"]  # not paired with itself
    assert "Paired difference to FTSD on the same items" in (tmp_path / "results.md").read_text()
    assert f"{column} vs FTSD diff" in (tmp_path / "results.csv").read_text().splitlines()[0]
    with pytest.raises(ConfigError, match="--versus sdft: no plain sdft run"):
        write_report(committed, tmp_path, seeds=[1234], versus=("sdft",))
