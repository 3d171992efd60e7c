"""Every YAML under configs/ parses with the command it belongs to (no model is loaded, nothing runs); configs are
composed, not repeated; evaluation during training is one config key; docs/extending.md's examples work."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rega.cli import main
from rega.config import DataSource

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
BASE = [str(CONFIGS / "model/embedded.yaml"), str(CONFIGS / "trainer/cpu.yaml")]


def print_config(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code in (0, None), out.getvalue()
    return out.getvalue()


def layers(*paths: str) -> list[str]:
    return [arg for path in paths for arg in ("--config", path)]


def is_source_list(path: Path) -> bool:
    return isinstance(yaml.safe_load(path.read_text(encoding="utf-8")), list)


def command_for(path: Path) -> list[str]:
    """The command line that parses ``path``; fit configs are layered on the embedded model and CPU trainer."""
    parts = path.relative_to(CONFIGS).parts
    if parts[:2] == (
        "eval",
        "callback",
    ):  # EvaluationCallback settings, named by an experiment's `evaluation:`
        return ["fit", *layers(*BASE), "--evaluation", str(path), "--print_config"]
    if parts[0] in ("model", "trainer", "experiment"):
        return ["fit", *layers(*dict.fromkeys([*BASE, str(path)])), "--print_config"]
    if (
        parts[0] == "distill"
    ):  # a distill file is the DistillConfig itself, so a fit's data.distill can name it
        return ["distill", "--distill", str(path), "--print_config"]
    command = {"data": "corpus", "eval": "evaluate", "grid": "grid"}[parts[0]]
    return [command, "--config", str(path), "--print_config"]


ALL = sorted(p for p in CONFIGS.rglob("*.yaml") if not p.name.startswith("judge_") and not is_source_list(p))
SOURCE_LISTS = sorted(p for p in CONFIGS.rglob("*.yaml") if is_source_list(p))


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_parses(path):
    printed = print_config(command_for(path))
    assert printed.strip()


def test_a_fit_config_resolves_in_process_as_fit_prints_it():
    """SDFT's rewrite and the merge read the base model and domain data through resolve_fit_config, in process:
    the same values as `fit --print_config`, without a subprocess, a seed set or anything instantiated."""
    from rega.lightning_cli import resolve_fit_config

    files = [*BASE, str(CONFIGS / "experiment/cpu_en.yaml")]
    printed = yaml.safe_load(print_config(["fit", *layers(*files), "--print_config"]))
    state = torch.random.get_rng_state()
    resolved = resolve_fit_config(files)
    assert torch.equal(torch.random.get_rng_state(), state)
    for section in ("model", "data", "trainer", "evaluation", "seed_everything"):
        assert resolved[section] == printed[section], section
    assert resolved["data"]["corpus"]["domains"] and resolved["model"]["model"]["name_or_path"] == "embedded"


def test_one_seed_seeds_the_whole_fit(capsys):
    """seed_everything is the fit's one seed: linked to the module's and the data's, which the corpus draw takes
    unless data.corpus.seed pins it; the linked keys cannot be set apart, and a boolean is refused."""
    from rega.data.corpus import CorpusConfig
    from rega.datamodules import REGADataModule
    from rega.lightning_cli import CLI_SETTINGS, _ParseOnly
    from rega.modules.lit_module import REGAModule

    args = [*layers(*BASE, str(CONFIGS / "experiment/cpu_en.yaml")), "--seed_everything", "7"]
    config = _ParseOnly(REGAModule, REGADataModule, run=False, args=args, **CLI_SETTINGS).config
    assert config.model.seed == config.data.seed == 7 and config.data.corpus.seed is None
    corpus = CorpusConfig(strategy="ft", domains=[DataSource(path="demo:medical.jsonl", domain="medical")])
    assert REGADataModule(corpus=corpus, seed=7).corpus_config.seed == 7
    assert REGADataModule(corpus=CorpusConfig(**{**vars(corpus), "seed": 3}), seed=7).corpus_config.seed == 3
    for extra, message in ((["--model.seed", "3"], 'must be given via "seed_everything"'),
                           (["--seed_everything", "true"], "seed_everything must be an integer")):  # fmt: skip
        with pytest.raises(SystemExit):
            _ParseOnly(REGAModule, REGADataModule, run=False, args=[*args, *extra], **CLI_SETTINGS)
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("path", SOURCE_LISTS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_source_list_files_hold_sources_and_are_used(path):
    sources = [DataSource(**item) for item in yaml.safe_load(path.read_text(encoding="utf-8"))]
    assert sources and path.parent.name == "data"
    users = [p for p in CONFIGS.rglob("*.yaml") if path.name in p.read_text(encoding="utf-8")]
    assert users, f"{path.name} is named by no config"


def source_lists(node, where: str):
    """(where, list) for every list of two or more data sources anywhere in a parsed YAML document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from source_lists(value, f"{where}:{key}")
    elif isinstance(node, list):
        if len(node) > 1 and all(isinstance(item, dict) and "path" in item for item in node):
            yield where, node
        for item in node:
            yield from source_lists(item, where)


# Read as raw YAML by tests/test_corpus.py (_shared_config), so its lists stay inline until that test follows
# nested-file references as `cli.py corpus` does.
RAW_READ = {"data/shared_en.yaml"}


def test_no_source_list_is_written_twice():
    """No list of sources is written twice; domain, validation and task lists of shared data live in configs/data/
    (the demo's own data and each eval file's drift sources are written where they are used, once)."""
    seen: dict[str, str] = {}
    for path in sorted(CONFIGS.rglob("*.yaml")):
        name = str(path.relative_to(CONFIGS))
        if name in RAW_READ:
            continue
        for where, items in source_lists(yaml.safe_load(path.read_text(encoding="utf-8")), name):
            key = json.dumps(items, sort_keys=True)
            assert key not in seen, f"{where} repeats {seen.get(key)}"
            seen[key] = where
            shared = any(str(item["path"]).startswith("shared:") for item in items)
            if shared and where.rsplit(":", 1)[-1] in ("domains", "val", "tasks"):
                assert path.parent.name == "data", f"{where}: name a configs/data/ file instead"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("experiment/*.yaml")), ids=lambda p: p.name)
def test_experiments_state_only_differences(path):
    """At most 10 setting lines (comments and list items aside) beyond the model and trainer layers."""
    settings = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.lstrip().startswith(("#", "- "))]  # fmt: skip
    assert len(settings) <= 10, settings


def test_experiment_files_start_with_their_command():
    for path in CONFIGS.rglob("*.yaml"):
        if path.parts[-2] in ("experiment", "distill") or path.parent.name == "grid":
            first = path.read_text().splitlines()[0]
            assert first.startswith("# python cli.py ") or first.startswith("# rega "), path


def test_judge_configs_load():
    from rega.eval.judged.client import load_judge_config

    for path in CONFIGS.glob("eval/judge_*.yaml"):
        config = load_judge_config(path)
        assert config.model and config.base_url


def test_overriding_a_layer_wins():
    printed = print_config(["fit", *layers(*BASE), "--trainer.max_epochs", "5", "--print_config"])
    assert "max_epochs: 5" in printed


# --------------------------------------------------------------------------------------- grids


def grid_of(name: str):
    from rega.experiments.grid import Grid, GridRun

    raw = yaml.safe_load((CONFIGS / f"grid/{name}.yaml").read_text(encoding="utf-8"))["grid"]
    return Grid(**{**raw, "runs": [GridRun(**run) for run in raw["runs"]]})


def resolved_fit(grid, run) -> dict:
    from rega.experiments.grid import fit_command

    command = fit_command(grid, run, Path(grid.output) / run.name)
    return yaml.safe_load(print_config([*command[2:], "--print_config"]))


def test_cpu_en_grid_trains_what_the_committed_results_trained():
    """configs/grid/cpu_en.yaml still gives each run the corpus, D_g, seeds and sizes recorded in
    docs/results/cpu_en/runs/<run>/fit/config.yaml (validation: the same first 4 dev items of each task)."""
    grid = grid_of("cpu_en")
    committed = REPO / "docs/results/cpu_en/runs"
    for run in grid.runs:
        if run.strategy == "zero_shot":
            continue
        now = resolved_fit(grid, run)
        then = yaml.safe_load((committed / run.name / "fit/config.yaml").read_text(encoding="utf-8"))
        assert now["evaluation"] is None  # the grid evaluates afterwards, as then
        assert now["seed_everything"] == then["seed_everything"]
        assert now["trainer"]["max_epochs"] == then["trainer"]["max_epochs"]
        # One seed now, linked to the module's and the data's (which the corpus draw takes): those of then.
        assert now["seed_everything"] == then["model"]["seed"] == then["data"]["seed"]
        assert then["data"]["corpus"]["seed"] == now["seed_everything"]
        assert now["data"]["corpus"]["seed"] is None
        assert now["model"]["learning_rate"] == then["model"]["learning_rate"]
        lora = ("r", "alpha", "dropout")  # target_modules: written out then, the same default now
        assert {k: now["model"]["lora"][k] for k in lora} == {k: then["model"]["lora"][k] for k in lora}
        # prompts.write (role prompts the fit writes) came later: unset, the corpus is the one of then
        assert now["data"]["corpus"]["prompts"].pop("write") is None
        assert {**now["data"]["corpus"], "seed": None} == {**then["data"]["corpus"], "seed": None}, run.name
        for key in ("distill", "max_length", "batch_size", "batching"):
            assert now["data"][key] == then["data"][key], (run.name, key)
        assert [s["path"] for s in now["data"]["val"]] == [s["path"] for s in then["data"]["val"]]
        assert now["data"]["val_limit_per_task"] == 4 == then["data"]["val"][0]["limit"]


def test_grid_prompt_matrix_domains_follow_the_eval_configs_task_lists(shared_data):
    """The grid's prompt-by-domain matrix reads the eval config's `tasks: ../data/..._dev.yaml` as evaluate does
    (it loads the shared dev sets: skipped where they are absent outside CI, like every shared-data test)."""
    from rega.experiments.grid import domains_of

    for name in ("cpu_en", "cpu_zh", "paper_en", "paper_zh"):
        assert domains_of(grid_of(name)) == ["finance", "legal", "medical"], name


# --------------------------------------------------------------------------------------- evaluation during training


def test_evaluation_is_one_config_key_beside_the_checkpoints(tiny_model_dir, tmp_path):
    """`evaluation:` adds EvaluationCallback without re-listing trainer.callbacks; `null` switches it off."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from rega.callbacks import EvaluationCallback
    from rega.datamodules import REGADataModule
    from rega.lightning_cli import REGACLI
    from rega.modules.lit_module import REGAModule

    def trainer_callbacks(*extra: str) -> list:
        args = [*layers(str(CONFIGS / "trainer/cpu.yaml"), str(REPO / "tests/configs/tiny_fit.yaml")),
                "--model.model.name_or_path", str(tiny_model_dir), "--trainer.default_root_dir", str(tmp_path),
                "--trainer.logger.init_args.save_dir", str(tmp_path), *extra]  # fmt: skip
        cli = REGACLI(REGAModule, REGADataModule, args=args, run=False, parser_kwargs={"default_env": False})
        return [type(c) for c in cli.trainer.callbacks]

    with_eval = trainer_callbacks("--evaluation", str(CONFIGS / "eval/callback/cpu_en.yaml"))
    assert ModelCheckpoint in with_eval and EvaluationCallback in with_eval
    without = trainer_callbacks()
    assert ModelCheckpoint in without and EvaluationCallback not in without


def test_cpu_and_paper_experiments_evaluate_after_epoch_2_and_the_grids_do_not():
    for name in ("cpu_en", "cpu_zh", "paper_en", "paper_zh"):
        printed = yaml.safe_load(print_config(command_for(CONFIGS / f"experiment/{name}.yaml")))
        evaluation = printed["evaluation"]
        assert evaluation["class_path"] == "rega.callbacks.EvaluationCallback", name
        assert evaluation["init_args"]["after_epochs"] is None and evaluation["init_args"]["at_fit_end"]
        assert evaluation["init_args"]["tasks"], name  # None means [2]: after epoch 2, as in the paper
    assert yaml.safe_load(print_config(command_for(CONFIGS / "experiment/demo.yaml")))["evaluation"] is None
    for name in ("cpu_en", "cpu_zh", "paper_en", "paper_zh"):
        assert grid_of(name).fit_configs[-1] == "configs/trainer/no_evaluation.yaml"


def test_evaluation_under_fsdp_is_refused_before_anything_loads(capsys):
    argv = ["fit", *layers(str(CONFIGS / "model/vicuna_7b.yaml"), str(CONFIGS / "trainer/gpu.yaml"),
                           str(CONFIGS / "trainer/fsdp.yaml"), str(CONFIGS / "experiment/paper_en.yaml"))]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1  # (Lightning may warn on stderr before it)
    assert errors[0].startswith("error: evaluation during training does not run under")
    assert "--evaluation null" in errors[0]


def test_fsdp_after_the_experiment_switches_evaluation_off():
    """docs/cluster.md's FSDP recipe: fsdp.yaml after the experiment overrides its evaluation with null."""
    argv = ["fit", *layers(str(CONFIGS / "model/vicuna_7b.yaml"), str(CONFIGS / "trainer/gpu.yaml"),
                           str(CONFIGS / "experiment/paper_en.yaml"), str(CONFIGS / "trainer/fsdp.yaml")),
            "--print_config"]  # fmt: skip
    printed = yaml.safe_load(print_config(argv))
    assert printed["evaluation"] is None
    assert printed["trainer"]["strategy"]["class_path"] == "rega.modules.fsdp.FSDP2Strategy"


# --------------------------------------------------------------------------------------- docs/extending.md

PLUGIN = """
import torch

from rega.data.prompts import CENTRAL
from rega.data.strategies import DOMAIN, INTEGRATED, ROLE, as_examples, register_strategy, sample_integration
from rega.modules.losses import register_loss_term


@register_strategy("rega_no_dg", inference=(CENTRAL, ROLE), integrates=True,
                   description="REGA without self-distillation: (p_c + D'_i) u (p_i + D_i)")
def rega_no_dg(inputs):
    integrated = sample_integration(inputs.domain_records, inputs.mix_ratio, inputs.seed)
    return (as_examples(integrated, CENTRAL, inputs.prompts, INTEGRATED)
            + as_examples(inputs.domain_records, ROLE, inputs.prompts, DOMAIN))


@register_loss_term("confidence_penalty")
def confidence_penalty(weight: float = 0.1):
    def term(module, batch, logits):
        logp = torch.log_softmax(logits.float(), dim=-1)
        return weight * (logp.exp() * logp).sum()

    return term
"""


@pytest.fixture
def readme_plugin(tmp_path, monkeypatch):
    from rega.data.strategies import STRATEGIES
    from rega.modules.losses import LOSS_TERMS

    (tmp_path / "my_plugins.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("REGA_PLUGINS", "my_plugins")
    yield tmp_path
    STRATEGIES.pop("rega_no_dg", None)
    LOSS_TERMS.pop("confidence_penalty", None)
    sys.modules.pop("my_plugins", None)


def test_readme_strategy_with_role_integration_builds_its_corpus(readme_plugin):
    out = readme_plugin / "corpus"
    main(["corpus", "--corpus.strategy", "rega_no_dg", "--corpus.mix_ratio", "0.25",
          "--corpus.domains", '[{"path": "demo:legal.jsonl"}, {"path": "demo:medical.jsonl"}]',
          "--output", str(out)])  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["strategy"] == "rega_no_dg"
    assert manifest["counts"]["by_kind"] == {"integrated": 20, "domain": 80}  # 0.25 of each 20-item task


def test_readme_strategy_and_loss_term_train_from_yaml_lines(readme_plugin, tiny_model_dir, capsys):
    experiment = readme_plugin / "rega_no_dg.yaml"
    experiment.write_text(
        "data: {corpus: {strategy: rega_no_dg}}\nmodel: {loss_terms: {confidence_penalty: {weight: 0.1}}}\n"
    )
    root = readme_plugin / "fit"
    main(["fit", *layers(str(CONFIGS / "trainer/cpu.yaml"), str(REPO / "tests/configs/tiny_fit.yaml"),
                         str(experiment)),
          "--model.model.name_or_path", str(tiny_model_dir), "--trainer.max_steps", "2", "--seed_everything", "7",
          "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
          "--data.cache", str(root / "cache"), "--model.adapter_dir", str(root / "adapter")])  # fmt: skip
    summary = json.loads(next(root.rglob("summary.json")).read_text())
    assert summary["strategy"] == "rega_no_dg" and set(summary["corpus"]) == {"integrated", "domain"}
    # what the corpus was built with, from its manifest: the fit's one seed, r as the config sets it
    assert summary["corpus_seed"] == 7 and summary["mix_ratio"] == 0.1
    assert summary["metrics"]["train/confidence_penalty"] < 0  # weight * sum p log p: a negative entropy
    assert "REGA run finished: strategy=rega_no_dg" in capsys.readouterr().out  # the fit's summary, printed


def test_a_missing_plugin_fails_in_one_line_even_for_print_config(monkeypatch, capsys):
    monkeypatch.setenv("REGA_PLUGINS", "my_missing_plugins")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *layers(*BASE), "--print_config"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "REGA_PLUGINS names 'my_missing_plugins'" in err and "PYTHONPATH" in err


@pytest.mark.slow
def test_cpu_zh_starts_and_evaluates_at_the_end(tiny_model_dir, tmp_path):
    """configs/experiment/cpu_zh.yaml end to end for 2 steps on the tiny model, D_g distilled by it (4 items),
    evaluation during training at tiny limits (it falls at the end of training)."""
    root = tmp_path / "fit"
    main(["fit", *layers(*BASE, str(CONFIGS / "experiment/cpu_zh.yaml")),
          "--model.model.name_or_path", str(tiny_model_dir), "--trainer.max_steps", "2",
          "--data.distill.model.name_or_path", str(tiny_model_dir), "--data.distill.limit", "4",
          "--data.distill.output_dir", str(tmp_path / "distill"), "--data.distill.sampling.max_new_tokens", "8",
          "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
          "--data.cache", str(root / "cache"), "--model.adapter_dir", str(root / "adapter"),
          "--evaluation.limit_per_task", "1", "--evaluation.general_mc_limit", "2",
          "--evaluation.drift_limit", "2", "--evaluation.max_new_tokens", "4"])  # fmt: skip
    summary = json.loads(next(root.rglob("summary.json")).read_text())
    assert summary["corpus"] == {"general": 4, "integrated": 12, "domain": 120}
    assert "eval/role/legal/legal_sum_zh/f1" in summary["metrics"]
    assert "eval/general_mc/ceval" in summary["metrics"]
