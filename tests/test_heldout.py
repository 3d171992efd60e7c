"""Unseen-domain evaluation: grid runs that hold domains out of training (``heldout_domains``), their stages'
command lines and checks, and the report's held-out section built from hand-made run records with known values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from rega.errors import ConfigError
from rega.experiments import grid as grid_module
from rega.experiments.grid import Grid, GridRun, check_grid, grid_command
from rega.experiments.report import write_report
from rega.experiments.stages import fit_command
from rega.experiments.stats import mcnemar_p
from rega.io import write_json

REPO = Path(__file__).resolve().parent.parent
DEMO_TASKS = [{"path": f"demo:{d}.jsonl"} for d in ("medical", "legal", "finance")]


def arg(command: list[str], option: str) -> str:
    return command[command.index(option) + 1]


@pytest.fixture
def grid_files(tmp_path) -> tuple[Path, Path]:
    """(an evaluate config over the demo data's three domains, an automatic prompts file with a finance role)."""
    eval_config = tmp_path / "eval.yaml"
    eval_config.write_text(json.dumps({"tasks": DEMO_TASKS, "general_mc": [], "drift": []}))
    auto = tmp_path / "auto.yaml"
    auto.write_text(yaml.safe_dump({"roles": {"finance": "You answer finance questions."}, "provenance": {}}))
    return eval_config, auto


def heldout_grid(tmp_path, grid_files, *runs: GridRun, auto: bool = True) -> Grid:
    eval_config, auto_file = grid_files
    return Grid(
        output=str(tmp_path / "grid"),
        fit_configs=["fit.yaml"],
        eval_config=str(eval_config),
        auto_prompts=str(auto_file) if auto else None,
        runs=list(runs),
    )


def staged(monkeypatch, grid: Grid, run: GridRun) -> tuple[list[list[str]], dict]:
    """The command lines a job runs (nothing runs) and its done.json."""
    commands: list[list[str]] = []
    monkeypatch.setattr(grid_module, "run_logged", lambda command, log: commands.append(command) or 2.0)
    return commands, grid_module.run_one(grid, run)


def test_a_heldout_run_trains_on_the_other_domains_and_is_evaluated_on_its_own(
    tmp_path, grid_files, monkeypatch
):
    run = GridRun("ft_no_finance", "ft", heldout_domains=["finance"], eval_args=["--limit_per_task", "3"])
    grid = heldout_grid(tmp_path, grid_files, run)
    check_grid(grid)
    commands, done = staged(monkeypatch, grid, run)
    assert [c[2] for c in commands] == ["fit", "evaluate", "evaluate"]
    fit, main, auto = commands
    assert arg(fit, "--data.corpus.only_domains") == '["legal", "medical"]'  # the grid's domains but finance
    directory = tmp_path / "grid" / "ft_no_finance"
    assert arg(main, "--output") == str(directory / "eval") and arg(main, "--adapter") == str(
        directory / "adapter"
    )
    # p_c and the hand-written p_i on the unseen domain's tasks alone, general measures off (eval_args still last)
    assert arg(main, "--rules") == '["central", "role"]' and arg(main, "--domains") == '["finance"]'
    assert all(arg(main, o) == "[]" for o in ("--general_mc", "--drift", "--general_gen"))
    assert main[-2:] == ["--limit_per_task", "3"]
    # the automatic p_i: the same tasks under the prompts file of `rega prompts`
    assert arg(auto, "--output") == str(directory / "eval_auto") and arg(auto, "--rules") == '["role"]'
    assert arg(auto, "--prompts.file") == grid.auto_prompts and arg(auto, "--domains") == '["finance"]'
    assert all(arg(auto, o) == "[]" for o in ("--general_mc", "--drift", "--general_gen"))
    assert done["heldout_domains"] == ["finance"] and done["auto_prompts"] == grid.auto_prompts
    assert done["inference"] == ["central", "role"] and set(done["timings"]) == {"fit_s", "eval_s", "auto_s"}


@pytest.mark.parametrize("strategy", ["ftrp", "rega", "zero_shot"])
def test_every_heldout_run_answers_under_p_c_and_p_i_without_a_prompt_matrix(
    strategy, tmp_path, grid_files, monkeypatch
):
    run = GridRun(
        f"{strategy}_no_legal", strategy, mix_ratio=0.1, heldout_domains=["legal"], prompt_matrix=True
    )
    commands, done = staged(monkeypatch, heldout_grid(tmp_path, grid_files, run, auto=False), run)
    stages = [c[2] for c in commands]
    assert stages == (["evaluate"] if strategy == "zero_shot" else ["fit", "evaluate"])  # no auto, no matrix
    assert arg(commands[-1], "--rules") == '["central", "role"]'
    assert ("--adapter" in commands[-1]) == (strategy != "zero_shot")
    assert "auto_prompts" not in done and "auto_s" not in done["timings"]


def test_a_plain_run_is_unchanged(tmp_path, grid_files, monkeypatch):
    run = GridRun("ft", "ft")
    grid = heldout_grid(tmp_path, grid_files, run)
    commands, done = staged(monkeypatch, grid, run)
    assert [c[2] for c in commands] == ["fit", "evaluate"]
    assert "--data.corpus.only_domains" not in commands[0] and "--domains" not in commands[1]
    assert done["heldout_domains"] == [] and "auto_prompts" not in done


@pytest.mark.parametrize(
    ("run", "message"),
    [
        (
            GridRun("ft_no_sports", "ft", heldout_domains=["sports"]),
            "'ft_no_sports' holds out sports: not a domain",
        ),
        (
            GridRun("ft_none", "ft", heldout_domains=["finance", "legal", "medical"]),
            "'ft_none' holds out every domain of the grid",
        ),
        (
            GridRun("ft_mixed", "ft", heldout_domains=["finance"], only_domains=["medical"]),
            "'ft_mixed' sets both heldout_domains and only_domains",
        ),
    ],
)
def test_a_heldout_split_that_makes_no_sense_stops_the_grid_before_it_runs(
    run, message, tmp_path, grid_files, monkeypatch
):
    monkeypatch.setattr(grid_module, "run_logged", lambda *a: pytest.fail("nothing may run"))
    with pytest.raises(ConfigError, match=message):
        grid_command(heldout_grid(tmp_path, grid_files, GridRun("zero_shot", "zero_shot"), run))


def test_the_automatic_prompts_must_exist_and_hold_the_heldout_domains(tmp_path, grid_files):
    everything = GridRun("zero_shot_all", "zero_shot", heldout_domains=["finance", "legal", "medical"])
    check_grid(heldout_grid(tmp_path, grid_files, everything, auto=False))  # the base model may hold out all
    grid = heldout_grid(tmp_path, grid_files, GridRun("ft_no_legal", "ft", heldout_domains=["legal"]))
    with pytest.raises(ConfigError, match=r"has no role for legal: write it with `python cli.py prompts`"):
        check_grid(
            grid
        )  # it would fall back to the hand-written prompt: the "automatic" row would measure that
    grid.auto_prompts = str(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        check_grid(grid)


@pytest.mark.parametrize(("name", "domain", "kept"), [("cpu_en", "finance", ["legal", "medical"]),
                                                     ("cpu_zh", "medical", ["finance", "legal"])])  # fmt: skip
def test_the_shipped_heldout_grids(name, domain, kept, shared_data):
    raw = yaml.safe_load((REPO / f"configs/grid/{name}_heldout.yaml").read_text(encoding="utf-8"))["grid"]
    grid = Grid(**{**raw, "runs": [GridRun(**run) for run in raw["runs"]]})
    plain = yaml.safe_load((REPO / f"configs/grid/{name}.yaml").read_text(encoding="utf-8"))["grid"]
    assert grid.fit_configs == plain["fit_configs"] and grid.eval_config == plain["eval_config"]
    assert grid.auto_prompts == f"runs/role_prompts/{name}.yaml"
    runs = {run.name: run for run in grid.runs}
    for strategy in ("ft", "rega"):
        run = runs[f"{strategy}_no_{domain}"]
        assert run.heldout_domains == [domain]
        command = fit_command(grid, run, Path(grid.output) / run.name)
        assert json.loads(arg(command, "--data.corpus.only_domains")) == kept
    assert runs[f"rega_no_{domain}"].mix_ratio == 0.1 and runs["zero_shot"].heldout_domains == [domain]


# ------------------------------------------------------------------------------------------- the report


def evaluation(
    rules: dict[str, dict[str, dict[str, list[float]]]], roles: dict[str, str] | None = None
) -> dict:
    """An eval.json with per-item results: ``{rule: {domain: {task: [0/1 per item]}}}`` (accuracy)."""
    out = {"rules": {}, "items": {"domain": {}}, "meta": {"prompts": {"central": "C", "roles": roles or {}}}}
    for rule, domains in rules.items():
        summary = {}
        for domain, tasks in domains.items():
            scores = {t: sum(v) / len(v) for t, v in tasks.items()}
            summary[domain] = {"score": sum(scores.values()) / len(scores),
                               "tasks": {t: {"metric": "acc", "score": s, "n": len(tasks[t])} for t, s in scores.items()}}  # fmt: skip
            out["items"]["domain"].setdefault(rule, {}).update(
                {
                    f"{domain}/{t}": {"ids": [f"{t}-{k}" for k in range(len(v))], "score": v}
                    for t, v in tasks.items()
                }
            )
        overall = sum(d["score"] for d in summary.values()) / len(summary)
        out["rules"][rule] = {"overall": overall, "task_mean": overall, "domains": summary}
    return out


def put(root: Path, name: str, strategy: str, evals: list[dict], seeds=(None,), auto=(), **meta) -> None:
    for k, (seed, result) in enumerate(zip(seeds, evals)):
        folder = root / name if seed is None else root / name / f"seed_{seed}"
        write_json(
            folder / "done.json",
            {"name": name, "strategy": strategy, "mix_ratio": None, "seed": seed, **meta},
        )
        write_json(folder / "eval" / "eval.json", result)
        if auto:
            write_json(folder / "eval_auto" / "eval.json", auto[k])


HAND, AUTO = "You are a finance expert.", "Answer as a careful financial analyst: give the label only."
ZERO_FINANCE = [0.0, 0.0, 0.0, 1.0]  # zero-shot under p_c: 25 %


def heldout_runs(root: Path) -> None:
    """Two plain runs (done.json of before ``heldout_domains``), and FT and REGA trained without finance."""
    every = {"medical": {"pq": [1.0, 0.0, 1.0, 0.0]}, "legal": {"ov": [0.0, 0.0, 1.0, 1.0]}}
    put(root, "zero_shot", "zero_shot", [evaluation({"central": {**every, "finance": {"fq": ZERO_FINANCE}}})])
    ft_all = {
        "medical": {"pq": [1.0, 1.0, 1.0, 0.0]},
        "legal": {"ov": [1.0] * 4},
        "finance": {"fq": [1.0, 1.0, 0.0, 1.0]},
    }
    put(root, "ft", "ft", [evaluation({"central": ft_all})])

    def held(central, role, auto):
        result = evaluation(
            {"central": {"finance": {"fq": central}}, "role": {"finance": {"fq": role}}}, {"finance": HAND}
        )
        return result, evaluation({"role": {"finance": {"fq": auto}}}, {"finance": AUTO})

    ft = [
        held([1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0], [1.0] * 4),
        held([1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]),
    ]
    put(
        root,
        "ft_no_finance",
        "ft",
        [e for e, _ in ft],
        seeds=(1, 2),
        auto=[a for _, a in ft],
        heldout_domains=["finance"],
    )
    rega, auto = held([1.0] * 4, [0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0])
    put(root, "rega_no_finance", "rega", [rega], auto=[auto], heldout_domains=["finance"], mix_ratio=0.1)  # fmt: skip


def test_the_heldout_section_compares_each_prompt_with_zero_shot_and_ft_without_the_domain(tmp_path):
    heldout_runs(tmp_path / "runs")
    report = write_report(tmp_path / "runs", tmp_path / "out")
    # The main table holds the plain runs only, its means over the three domains untouched by the held-out runs.
    assert [row["label"] for row in report["rows"]] == ["zero-shot", "FT"]
    assert report["rows"][1]["domain mean"] == pytest.approx((0.75 + 1.0 + 0.75) / 3)
    (section,) = report["heldout"]
    assert section["domain"] == "finance"
    assert section["references"] == {"zero-shot": "zero_shot", "FT": "ft_no_finance"}
    assert section["prompts"] == {"hand-written p_i": HAND, "automatic p_i": AUTO}
    rows = {(r["run"], r["prompt"]): r for r in section["rows"]}
    assert list(rows) == [("zero_shot", "p_c")] + [
        (run, p)
        for run in ("ft_no_finance", "rega_no_finance")
        for p in ("p_c", "hand-written p_i", "automatic p_i")
    ]
    mean = "finance mean"
    ft_c = rows["ft_no_finance", "p_c"]
    assert ft_c["seeds"] == "1 2" and ft_c["scores"] == {"fq (acc)": 0.625, mean: 0.625}  # (2/4 + 3/4) / 2
    assert rows["ft_no_finance", "automatic p_i"]["scores"][mean] == pytest.approx(0.875)
    assert set(ft_c["vs"]) == {"zero-shot"} and ft_c["vs"]["zero-shot"][mean]["diff"] == pytest.approx(0.375)
    assert ft_c["ci"][mean]["sd"] == pytest.approx(0.1767767)  # two seeds: 0.5 and 0.75
    # REGA's automatic prompt against zero-shot (one seed each: exact McNemar on the same four items) and
    # against FT without finance under p_c (two seeds on FT's side: the bootstrap's p-value).
    rega_auto = rows["rega_no_finance", "automatic p_i"]
    vs_zero, vs_ft = rega_auto["vs"]["zero-shot"][mean], rega_auto["vs"]["FT"][mean]
    assert vs_zero["diff"] == pytest.approx(0.5 - 0.25) and vs_zero["test"] == "mcnemar" and vs_zero["n"] == 4
    assert vs_zero["p"] == pytest.approx(mcnemar_p(np.array([0, 0, 1, 1]), np.array(ZERO_FINANCE)))
    assert vs_ft["diff"] == pytest.approx(0.5 - 0.625) and vs_ft["test"] == "bootstrap"
    zero = rows["zero_shot", "p_c"]
    assert set(zero["vs"]) == {"FT"} and zero["vs"]["FT"]["fq (acc)"]["diff"] == pytest.approx(0.25 - 0.625)
    md = (tmp_path / "out" / "results.md").read_text(encoding="utf-8")
    assert "## Held-out domains" in md and f"* automatic p_i: “{AUTO}”" in md
    assert "| rega_no_finance | automatic p_i | 50.0 [" in md and "| +25.0 [" in md
    saved = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert saved["runs"] == ["zero_shot", "ft"] and saved["heldout"][0]["rows"][0].keys() == {
        "run", "strategy", "prompt", "seeds", "scores", "ci", "vs"
    }  # fmt: skip


def test_the_ft_reference_holds_out_that_domain_alone_and_each_domain_gets_a_section(tmp_path):
    runs = tmp_path / "runs"
    heldout_runs(runs)
    both = evaluation({"central": {"finance": {"fq": [1.0] * 4}, "legal": {"ov": [1.0, 0.0, 0.0, 0.0]}}})
    put(
        runs, "ft_a_no_two", "ft", [both], heldout_domains=["finance", "legal"]
    )  # sorted before ft_no_finance
    report = write_report(runs, tmp_path / "out")
    finance, legal = report["heldout"]
    assert finance["references"]["FT"] == "ft_no_finance" and legal["references"]["FT"] == "ft_a_no_two"
    (row,) = [r for r in legal["rows"] if r["run"] == "ft_a_no_two"]
    assert row["scores"] == {
        "ov (acc)": 0.25,
        "legal mean": 0.25,
    }  # its legal tasks only, not its finance ones
    assert row["vs"]["zero-shot"]["legal mean"]["diff"] == pytest.approx(0.25 - 0.5)


def test_a_grid_of_heldout_runs_only_still_reports(tmp_path):
    runs = tmp_path / "runs"
    result = evaluation({"central": {"finance": {"fq": [1.0, 0.0]}}, "role": {"finance": {"fq": [1.0, 1.0]}}})
    put(runs, "zero_shot_prompts", "zero_shot", [result], heldout_domains=["finance"])
    report = write_report(runs, tmp_path / "out")
    assert report["rows"] == []  # no main table: results.md is the section alone
    assert (tmp_path / "out" / "results.md").read_text(encoding="utf-8").startswith("\n## Held-out domains")
    (section,) = report["heldout"]
    assert section["references"] == {"zero-shot": "zero_shot_prompts"}
    hand = section["rows"][1]
    assert hand["prompt"] == "hand-written p_i" and hand["vs"]["zero-shot"]["finance mean"]["diff"] == 0.5


def test_the_report_command_writes_the_heldout_section(tmp_path, capsys):
    from rega.cli import main

    heldout_runs(tmp_path / "runs")
    main(["report", "--runs", str(tmp_path / "runs"), "--output", str(tmp_path / "out")])
    md = (tmp_path / "out" / "results.md").read_text(encoding="utf-8")
    assert (
        "## Held-out domains" in md
        and "**finance** (references under p_c: zero-shot: zero_shot, FT: ft_no_finance)" in md
    )
    assert (
        json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))["heldout"][0]["domain"]
        == "finance"
    )
    assert "wrote" in capsys.readouterr().out


def test_a_heldout_grid_trains_evaluates_and_reports_on_the_tiny_model(tiny_model_dir, tmp_path):
    """The real stages: FT without legal (only_domains: medical), legal's demo tasks under p_c, the hand-written
    and an automatic p_i (``--prompts.file``), then the report's section."""
    eval_config = tmp_path / "eval.yaml"
    eval_config.write_text(json.dumps({
        "model": {"name_or_path": str(tiny_model_dir)}, "tasks": DEMO_TASKS[:2], "limit_per_task": 2,
        "max_new_tokens": 4, "closed_max_new_tokens": 4, "general_mc": [], "drift": [], "device": "cpu",
    }))  # fmt: skip
    auto = tmp_path / "auto.yaml"
    auto.write_text(yaml.safe_dump({"roles": {"legal": "Answer as a judge would, with the label only."}}))
    fit_args = ["--model.model.name_or_path", str(tiny_model_dir), "--trainer.max_steps", "2",
                "--data.cache", str(tmp_path / "cache")]  # fmt: skip
    grid = Grid(
        output=str(tmp_path / "grid"),
        fit_configs=[str(REPO / "configs/trainer/cpu.yaml"), str(REPO / "tests/configs/tiny_fit.yaml")],
        eval_config=str(eval_config),
        auto_prompts=str(auto),
        runs=[GridRun("ft_no_legal", "ft", heldout_domains=["legal"], fit_args=fit_args)],
    )
    grid_command(grid)
    run = tmp_path / "grid" / "ft_no_legal"
    summary = json.loads(next(run.glob("fit/version_*/summary.json")).read_text())
    assert summary["corpus"]["domain"] == 12  # tiny_fit's 12 medical items, not its 12 legal ones
    main = json.loads((run / "eval" / "eval.json").read_text())
    assert set(main["rules"]) == {"central", "role"} and set(main["rules"]["central"]["domains"]) == {"legal"}
    written = json.loads((run / "eval_auto" / "eval.json").read_text())
    assert written["meta"]["prompts"]["roles"]["legal"] == "Answer as a judge would, with the label only."
    assert main["meta"]["prompts"]["roles"]["legal"] != written["meta"]["prompts"]["roles"]["legal"]
    (section,) = write_report(tmp_path / "grid", tmp_path / "report")["heldout"]
    assert [r["prompt"] for r in section["rows"]] == ["p_c", "hand-written p_i", "automatic p_i"]
    assert section["references"] == {"FT": "ft_no_legal"}


def test_an_automatic_prompt_equal_to_the_hand_written_one_is_pointed_out(tmp_path):
    """An automatic file without the domain's role falls back to the built-in one: the two rows then measure one
    prompt (the grid refuses such a file; a report of runs from elsewhere says so)."""
    runs = tmp_path / "runs"
    result = evaluation(
        {"central": {"finance": {"fq": [1.0]}}, "role": {"finance": {"fq": [0.0]}}}, {"finance": HAND}
    )
    auto = evaluation({"role": {"finance": {"fq": [0.0]}}}, {"finance": HAND})
    put(runs, "ft_no_finance", "ft", [result], auto=[auto], heldout_domains=["finance"])
    write_report(runs, tmp_path / "out")
    assert "the automatic p_i is the hand-written one" in (tmp_path / "out" / "results.md").read_text(
        encoding="utf-8"
    )
