"""The experiment grid (fit + evaluate per run, skip finished runs) and the report that compares runs."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from rega.experiments import grid as grid_module
from rega.experiments.grid import Grid, GridRun, grid_command
from rega.experiments.report import write_report
from rega.io import waiting_lock, write_json

REPO = Path(__file__).resolve().parent.parent


def domain_rule(scores: dict[str, dict[str, float]]) -> dict:
    domains = {}
    for domain, tasks in scores.items():
        domains[domain] = {
            "score": sum(tasks.values()) / len(tasks),
            "tasks": {t: {"metric": "acc", "score": s} for t, s in tasks.items()},
        }
    overall = sum(d["score"] for d in domains.values()) / len(domains)
    return {"overall": overall, "task_mean": overall, "domains": domains}


def fake_run(
    root: Path, name: str, strategy: str, rules: dict, mc: float, mix_ratio=None, matrix=None, **meta
) -> None:
    write_json(
        root / name / "done.json", {"name": name, "strategy": strategy, "mix_ratio": mix_ratio, **meta}
    )
    write_json(
        root / name / "eval" / "eval.json",
        {
            "rules": rules,
            "general_mc": {"arc_easy": {"score": mc}},
            "drift": {"ref": {"logprob_per_token": -2.0}},
        },
    )
    if matrix:
        write_json(root / name / "eval_matrix" / "eval.json", {"rules": matrix})


def test_report_table_and_plots(tmp_path):
    runs = tmp_path / "runs"
    med = {"medical": {"pubmedqa": 0.5}, "legal": {"overruling": 0.6}}
    fake_run(runs, "zero_shot", "zero_shot", {"central": domain_rule(med)}, 0.70)
    fake_run(
        runs,
        "ft",
        "ft",
        {"central": domain_rule({"medical": {"pubmedqa": 0.7}, "legal": {"overruling": 0.8}})},
        0.50,
    )
    for r, mc in ((0.1, 0.66), (0.3, 0.64)):
        rules = {"central": domain_rule(med), "role": domain_rule(med)}
        matrix = {f"role:{p}": domain_rule(med) for p in ("medical", "legal")} if r == 0.1 else None
        fake_run(runs, f"rega_r{r}", "rega", rules, mc, mix_ratio=r, matrix=matrix)
    (runs / "unfinished").mkdir()  # no done.json: ignored

    report = write_report(runs, tmp_path / "out")
    labels = [row["label"] for row in report["rows"]]
    assert labels == [
        "zero-shot",
        "FT",
        "REGA_c (r=0.1)",
        "REGA_r (r=0.1)",
        "REGA_c (r=0.3)",
        "REGA_r (r=0.3)",
    ]
    ft = report["rows"][1]
    assert ft["domain mean"] == pytest.approx(0.75) and ft["general MC mean"] == pytest.approx(0.5)
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "| FT | 80.0 | 80.0 | 70.0 | 70.0 | 75.0 | 50.0 | 50.0 | -2.000 |" in markdown
    assert "Prompt × test domain, rega_r0.1" in markdown
    assert (tmp_path / "out" / "results.csv").read_text().count("\n") == len(labels) + 1
    assert report["plots"] == {
        "mix_ratio": True,
        "prompt_matrix": True,
        "general_vs_zero_shot": False,
    }  # no items
    first = (tmp_path / "out" / "mix_ratio.png").read_bytes()
    write_report(runs, tmp_path / "out")  # regenerating gives the same bytes
    assert (tmp_path / "out" / "mix_ratio.png").read_bytes() == first


def test_report_without_runs_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished runs"):
        write_report(tmp_path, tmp_path / "out")


def test_grid_rejects_unknown_runs_and_strategies(tmp_path):
    from rega.errors import ConfigError

    grid = Grid(output=str(tmp_path), runs=[GridRun("a", "ft"), GridRun("b", "nope")])
    with pytest.raises(ConfigError, match="unknown strategy 'nope'"):
        grid_command(grid)
    with pytest.raises(ConfigError, match="no run named zz"):
        grid_command(Grid(output=str(tmp_path), runs=[GridRun("a", "ft")]), only=["zz"])


def test_grid_runs_fit_and_eval_then_skips_finished_runs(tiny_model_dir, tmp_path):
    eval_config = tmp_path / "eval.yaml"
    eval_config.write_text(
        json.dumps(
            {
                "model": {"name_or_path": str(tiny_model_dir)},
                "tasks": [{"path": "demo:medical.jsonl"}, {"path": "demo:legal.jsonl"}],
                "limit_per_task": 2,
                "max_new_tokens": 4,
                "closed_max_new_tokens": 4,
                "general_mc": [],
                "drift": [],
                "device": "cpu",
            }
        )  # fmt: skip
    )
    grid = Grid(
        output=str(tmp_path / "grid"),
        fit_configs=[str(REPO / "configs/trainer/cpu.yaml"), str(REPO / "tests/configs/tiny_fit.yaml")],
        eval_config=str(eval_config),
        runs=[
            GridRun("zero_shot", "zero_shot"),
            GridRun(
                "ftrp",
                "ftrp",
                fit_args=[
                    "--model.model.name_or_path",
                    str(tiny_model_dir),
                    "--trainer.max_steps",
                    "2",
                    "--data.cache",
                    str(tmp_path / "cache"),
                ],
            ),
        ],  # fmt: skip
    )
    grid_command(grid)
    for name in ("zero_shot", "ftrp"):
        assert (tmp_path / "grid" / name / "done.json").exists()
        assert (tmp_path / "grid" / name / "eval" / "eval.json").exists()
    ftrp = tmp_path / "grid" / "ftrp"
    assert (ftrp / "adapter" / "adapter_config.json").exists()
    # The prompt matrix is answered in the run's own evaluation: one model load, and each domain's records under
    # ``role`` and under ``role:<that domain>`` (the same rendering) answered once.
    result = json.loads((ftrp / "eval" / "eval.json").read_text())
    assert set(result["rules"]) == {"role", "role:medical", "role:legal"}
    assert not (ftrp / "eval_matrix").exists()
    for domain in ("medical", "legal"):
        assert (
            result["rules"][f"role:{domain}"]["domains"][domain] == result["rules"]["role"]["domains"][domain]
        )
    stamp = (ftrp / "done.json").stat().st_mtime_ns
    grid_command(grid)  # finished runs are skipped
    assert (ftrp / "done.json").stat().st_mtime_ns == stamp
    report = write_report(tmp_path / "grid", tmp_path / "report")
    assert [row["label"] for row in report["rows"]] == ["zero-shot", "FTRP"]  # the matrix is no row
    assert (
        report["plots"]["prompt_matrix"]
        and "Prompt × test domain, ftrp" in (tmp_path / "report" / "results.md").read_text()
    )


def _hold_run_while(directory: Path, waiting: threading.Event, finish) -> threading.Thread:
    """Another job on the same run: holds its lock until the grid says it waits, then ``finish()`` and let go."""
    held = threading.Event()

    def other_job():
        with waiting_lock(directory / grid_module.LOCK):
            held.set()
            waiting.wait(timeout=60)
            finish()

    thread = threading.Thread(target=other_job)
    thread.start()
    held.wait(timeout=60)
    return thread


@pytest.mark.parametrize("other_finishes", [True, False])
def test_a_job_waits_for_another_job_on_the_same_run(tmp_path, monkeypatch, other_finishes):
    """A cluster array's merge job trains its per-domain runs unless they are done, while their own array jobs may
    be running them: it must wait for them, then skip what they finished (or resume what a dead one left)."""
    grid = Grid(output=str(tmp_path), runs=[GridRun("ft_medical", "ft", evaluate=False)])
    run, calls, waiting = grid.runs[0], [], threading.Event()
    directory = grid_module.run_dir(grid, run, 7)
    monkeypatch.setattr(grid_module, "_train", lambda *args: calls.append("train"))
    monkeypatch.setattr(grid_module, "_say_waiting", lambda tag: waiting.set())

    def finish():
        if other_finishes:
            write_json(directory / "done.json", {"name": "ft_medical", "by": "the other job"})

    thread = _hold_run_while(directory, waiting, finish)
    meta = grid_module.run_one(grid, run, 7)
    thread.join()
    assert waiting.is_set()
    if other_finishes:
        assert meta == {"name": "ft_medical", "by": "the other job"} and calls == []
    else:  # the other job died before done.json: this one runs it (a fit resumes from last.ckpt)
        assert calls == ["train"] and meta["seed"] == 7
        assert json.loads((directory / "done.json").read_text())["name"] == "ft_medical"


def test_a_job_that_stopped_after_its_fit_evaluates_without_training_again(tmp_path, monkeypatch, capsys):
    """A job killed during evaluation left a complete adapter: the next job evaluates it (a single-domain run on
    its own domain) and keeps the fit's time, instead of training from scratch."""
    grid = Grid(
        output=str(tmp_path),
        eval_config="eval.yaml",
        runs=[GridRun("ft_medical", "ft", only_domains=["medical"])],
    )
    run, commands = grid.runs[0], []
    directory = grid_module.run_dir(grid, run, 7)

    def fake_stage(command, log_path):
        commands.append(command[2])  # cli.py's subcommand
        if command[2] == "fit":
            write_json(directory / "adapter" / "adapter_config.json", {})
        elif len(commands) == 2:
            raise RuntimeError("killed during evaluation")
        return 3.0

    monkeypatch.setattr(grid_module, "run_logged", fake_stage)
    with pytest.raises(RuntimeError, match="killed"):
        grid_module.run_one(grid, run, 7)
    assert commands == ["fit", "evaluate"] and not (directory / "done.json").exists()
    calls = []
    monkeypatch.setattr(grid_module, "run_logged", lambda command, log: calls.append(command) or 5.0)
    meta = grid_module.run_one(grid, run, 7)
    assert [c[2] for c in calls] == ["evaluate"]  # not trained again
    assert calls[0][calls[0].index("--domains") + 1] == '["medical"]'  # on its own domain
    assert meta["timings"] == {"fit_s": 3.0, "eval_s": 5.0}
    said = capsys.readouterr().out
    assert "not trained again" in said and "with an earlier job's stages: 8s" in said


def test_report_sets_single_domain_runs_beside_the_multi_domain_ones(tmp_path):
    runs = tmp_path / "runs"
    both = {"medical": {"pubmedqa": 0.5}, "legal": {"overruling": 0.6}}
    fake_run(runs, "ft", "ft", {"central": domain_rule(both)}, 0.5)
    fake_run(runs, "ft_medical", "ft", {"central": domain_rule({"medical": {"pubmedqa": 0.9}})}, 0.6,
             only_domains=["medical"])  # fmt: skip
    for r in (0.1, 0.3):
        fake_run(runs, f"rega_r{r}", "rega", {"central": domain_rule(both)}, 0.6, mix_ratio=r)
    report = write_report(runs, tmp_path / "out")
    rows = {row["label"]: row for row in report["rows"]}
    assert rows["FT"]["domain mean"] == pytest.approx(0.55)
    single = rows["FT (medical only)"]  # not a second "FT" row
    assert single["pubmedqa (acc)"] == pytest.approx(0.9) and single["medical mean"] == pytest.approx(0.9)
    assert (
        single["domain mean"] is None and single.get("legal mean") is None
    )  # one domain's mean is not comparable
    assert "| FT (medical only) | – | – | 90.0 | 90.0 | – |" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.parametrize(
    "grid",
    [
        "cpu_en",
        "cpu_zh",
        "cpu_en_evidence",
        "cpu_en_forgetting",
        "cpu_en_forgetting_strategies",
        "cpu_en_heldout",
        "cpu_zh_heldout",
    ],
)
def test_committed_cpu_results_regenerate_from_their_runs(grid, tmp_path, shared_data):
    """docs/results/<grid> holds a CPU-scale grid's run records; the report command rebuilds its table from them
    (cpu_en's trivial baselines from the shared data: those records predate ``baselines`` in eval.json). A grid
    still being run (cpu_en_evidence) has no plot until it has the runs a plot needs."""
    committed = Path(__file__).resolve().parents[1] / "docs" / "results" / grid
    report = write_report(committed / "runs", tmp_path)
    for name in ("results.md", "results.csv", "report.json"):
        assert (tmp_path / name).read_text() == (committed / name).read_text(), name
    from PIL import Image

    for name, made in report["plots"].items():
        assert made == (committed / f"{name}.png").exists(), name
        if not made:
            continue
        with Image.open(tmp_path / f"{name}.png") as new, Image.open(committed / f"{name}.png") as old:
            assert new.size == old.size, name  # pixels may differ with the fonts of another machine


def test_report_formats_by_column_not_by_magnitude():
    from rega.experiments.report_format import difference, fmt, with_interval

    assert fmt(0.425, "mc:arc_easy") == "42.5"
    assert fmt(-1.207, "logprob:self_distilled_heldout") == "-1.207"  # not -120.7 %
    assert fmt(-2.5, "logprob:general_en_reference") == "-2.500"
    assert fmt(1.25, "judge:mt_bench") == "1.25" and fmt(None, "x") == "–"
    assert fmt(0.81, "gen_len_ratio:general_en") == "0.81"
    stats = {"sd": 0.02, "lo": 0.4, "hi": 0.45}
    assert with_interval(0.425, stats, "mc:arc_easy") == "42.5 ±2.0 [40.0, 45.0]"
    assert with_interval(None, stats, "mc:arc_easy") == "–"
    paired = {"diff": -0.054, "lo": -0.087, "hi": -0.02, "p": 0.0015}
    assert difference(paired, "gen_f1:general_en") == "-5.4 [-8.7, -2.0] p=0.0015"
    assert difference(None, "x") == "–"
