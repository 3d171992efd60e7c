"""Baselines from the related work: SDFT's rewrite of the domain data, LwF's loss term from its YAML line, one LoRA
per domain merged with peft, and the grid that runs them once per seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from rega.config import DataSource, SamplingConfig
from rega.data.loaders import load_many
from rega.data.prompts import RolePrompts
from rega.data.records import Record
from rega.data.strategies import CorpusInputs, build_examples
from rega.distill.rewrite import RewriteConfig, join_rewrites, run_rewrite
from rega.errors import ConfigError
from rega.experiments.grid import Grid, GridRun, MergeSpec, check_grid, jobs, run_dir, run_one
from rega.experiments.stages import fit_command, merge_command, rewrite_command

REPO = Path(__file__).resolve().parent.parent


def closed(rec_id: str, answer: str) -> Record:
    return Record(id=rec_id, instruction="Is it?", input="", output=answer, domain="medical", task="pq",
                  choices=("yes", "no", "maybe"), answer=answer)  # fmt: skip


def test_rewrites_replace_the_reference_only_when_usable():
    records = [closed("a", "yes"), closed("b", "no"), closed("c", "yes"),
               Record(id="d", instruction="Why?", input="", output="Because.", domain="finance", task="fq")]  # fmt: skip
    rewrites = {"a": "Yes: the trial shows it.", "b": "Yes, clearly.", "d": "Since rates rose."}
    out, per_task = join_rewrites(records, rewrites, {"method": "sdft"})
    by_id = {r.id: r for r in out}
    assert by_id["a"].output == "Yes: the trial shows it." and by_id["a"].meta["rewrite"]["kept"] == "rewrite"
    assert (
        by_id["b"].output == "no" and "gold 'no'" in by_id["b"].meta["rewrite"]["why"]
    )  # wrong answer: reference
    assert by_id["c"].output == "yes" and by_id["c"].meta["rewrite"]["kept"] == "reference"  # not rewritten
    assert by_id["d"].output == "Since rates rose."  # free-form: the rewrite
    assert per_task == {"fq": {"rewrite": 1, "reference": 0}, "pq": {"rewrite": 1, "reference": 2}}


def test_rewrite_end_to_end_feeds_the_sdft_strategy(tiny_model_config, tmp_path):
    cfg = RewriteConfig(
        source=[DataSource("demo:medical.jsonl", limit=3), DataSource("demo:finance.jsonl", limit=2)],
        output_dir=str(tmp_path / "rewrite"),
        model=tiny_model_config,
        sampling=SamplingConfig(max_new_tokens=6, seed=7),
        batch_size=8,
    )
    path = run_rewrite(cfg)
    records = load_many([DataSource(str(path))]).records
    assert [r.id for r in records] == [r.id for r in load_many(cfg.source).records]
    assert all(r.meta["rewrite"]["kept"] in ("rewrite", "reference") for r in records)
    prompts = json.loads((tmp_path / "rewrite" / "prompts.jsonl").read_text().splitlines()[0])
    assert "### Reference Answer:" in prompts["instruction"]
    roles = RolePrompts(central="pc", roles={"medical": "pm", "finance": "pf"})
    assert len(build_examples("sdft", CorpusInputs(records, None, roles))) == 5
    summary = json.loads((tmp_path / "rewrite" / "summary.json").read_text())
    assert summary["records"] == 5 and run_rewrite(cfg) == path  # a rerun generates nothing new


def test_lwf_yaml_line_builds_the_kl_to_base_term():
    from rega.modules.losses import build_loss_terms

    config = yaml.safe_load((REPO / "configs/experiment/baseline_lwf.yaml").read_text())
    assert config["data"]["corpus"]["strategy"] == "ft"
    terms = build_loss_terms(config["model"]["loss_terms"])
    assert list(terms) == ["kl_to_base"]


def lora_adapter(model_config, path: Path, seed: int) -> str:
    from rega.modules.model import LoraSettings, add_lora, load_model

    torch.manual_seed(seed)
    model = add_lora(load_model(model_config), LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
    model.save_pretrained(path)
    return str(path)


def test_merged_lora_is_the_sum_of_the_domain_updates(tiny_model_config, tmp_path):
    """``cat`` stacks the adapters: the merged adapter's output equals both adapters active at once; TIES writes
    a loadable adapter too."""
    from peft import PeftModel

    from rega.experiments.merge import merge_adapters
    from rega.modules.export import load_adapter
    from rega.modules.model import load_model

    adapters = {"medical": lora_adapter(tiny_model_config, tmp_path / "a", 1),
                "legal": lora_adapter(tiny_model_config, tmp_path / "b", 2)}  # fmt: skip
    merged = merge_adapters(tiny_model_config, adapters, str(tmp_path / "cat"), combination_type="cat")
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        got = load_adapter(load_model(tiny_model_config), merged).eval()(ids).logits
        both = PeftModel.from_pretrained(
            load_model(tiny_model_config), adapters["medical"], adapter_name="medical"
        )
        both.load_adapter(adapters["legal"], adapter_name="legal")
        both.base_model.set_adapter(["medical", "legal"])
        want = both.eval()(ids).logits
    assert torch.allclose(got, want, atol=1e-4)
    ties = merge_adapters(
        tiny_model_config, adapters, str(tmp_path / "ties"), combination_type="ties", density=0.5
    )
    assert json.loads((ties / "merge.json").read_text())["density"] == 0.5
    load_adapter(load_model(tiny_model_config), ties)
    with pytest.raises(ConfigError, match="combination_type"):
        merge_adapters(tiny_model_config, adapters, str(tmp_path / "x"), combination_type="average")


def evidence_grid() -> Grid:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(Grid, "grid")
    raw = yaml.safe_load((REPO / "configs/grid/cpu_en_evidence.yaml").read_text())
    return parser.instantiate(parser.parse_object(raw)).grid


def test_grid_runs_every_run_once_per_seed_with_one_seed_for_everything(tmp_path):
    grid = Grid(output=str(tmp_path), fit_configs=["base.yaml"], seeds=[11, 12], runs=[
        GridRun("zero_shot", "zero_shot", seeds=[]), GridRun("ftsd", "ftsd"), GridRun("r", "rega", mix_ratio=0.5, seeds=[11]),
    ])  # fmt: skip
    assert [(r.name, s) for r, s in jobs(grid)] == [
        ("zero_shot", None),
        ("ftsd", 11),
        ("ftsd", 12),
        ("r", 11),
    ]
    assert run_dir(grid, grid.runs[1], 12) == tmp_path / "ftsd" / "seed_12"
    command = " ".join(fit_command(grid, grid.runs[1], run_dir(grid, grid.runs[1], 12), 12))
    for flag in (
        "--seed_everything 12",  # linked to the module's, the data's and the corpus draw's seeds
        "--data.distill.sampling.seed 12",
        f"--data.distill.output_dir {tmp_path / 'distill' / 'seed_12'}",
    ):
        assert flag in command  # fmt: skip
    assert "--seed_everything" not in fit_command(grid, grid.runs[0], tmp_path / "z")


def test_grid_stage_commands_for_rewrite_and_merge(tmp_path):
    grid = Grid(output=str(tmp_path), fit_configs=["base.yaml"], seeds=[3])
    sdft = GridRun("sdft", "sdft", configs=["extra.yaml"], rewrite={"sampling": {"max_new_tokens": 9}})
    command = rewrite_command(grid, sdft, 3, tmp_path / "rw")
    assert command[1:3] == [str(REPO / "cli.py"), "rewrite"] and command[-2:] == ["--seed", "3"]
    settings = json.loads(command[command.index("--rewrite") + 1])
    assert settings["sampling"]["max_new_tokens"] == 9 and settings["source"] == []
    assert json.loads(command[command.index("--fit_configs") + 1]) == ["base.yaml", "extra.yaml"]
    spec = MergeSpec(runs=["a", "b"], combination_type="dare_ties", weights=[1.0, 0.5])
    command = merge_command(grid, spec, {"a": "A", "b": "B"}, tmp_path / "adapter")
    assert "--combination_type" in command and json.loads(command[command.index("--weights") + 1]) == [
        1.0,
        0.5,
    ]
    with pytest.raises(ConfigError, match="merges run 'c'"):
        check_grid(Grid(runs=[GridRun("m", "ft", merge={"runs": ["c"]})]))


def test_evidence_grid_config_has_the_baselines_seeds_and_sweep():
    grid = evidence_grid()
    names = {r.name: r for r in grid.runs}
    assert len(grid.seeds) == 3 and names["zero_shot"].seeds == []
    for baseline in ("ft_replay", "ft_lwf", "sdft", "lora_merge_ties"):
        assert baseline in names and names[baseline].seeds is None  # every seed
    assert isinstance(names["lora_merge_ties"].merge, MergeSpec) and isinstance(
        names["sdft"].rewrite, RewriteConfig
    )
    sweep = sorted(r.mix_ratio for r in grid.runs if r.strategy == "rega")
    assert sweep == [0.01, 0.05, 0.1, 0.2, 0.3, 0.5]
    check_grid(grid)


def test_grid_merge_run_merges_finished_domain_runs_and_evaluates(
    tiny_model_dir, tiny_model_config, tmp_path
):
    """A merge run skips training: the domain runs it names are finished (their adapters exist), the merge stage
    writes its adapter in its own process, and the evaluation reads it."""
    fit = tmp_path / "fit.yaml"
    fit.write_text(yaml.safe_dump({"model": {"model": {"name_or_path": str(tiny_model_dir)}}}))
    evaluation = tmp_path / "eval.yaml"
    evaluation.write_text(json.dumps({
        "model": {"name_or_path": str(tiny_model_dir)}, "tasks": [{"path": "demo:medical.jsonl"}],
        "limit_per_task": 2, "max_new_tokens": 2, "closed_max_new_tokens": 2, "general_mc": [], "drift": [],
    }))  # fmt: skip
    grid = Grid(output=str(tmp_path / "grid"), fit_configs=[str(fit)], eval_config=str(evaluation), seeds=[5], runs=[
        GridRun("ft_medical", "ft", only_domains=["medical"], evaluate=False),
        GridRun("ft_legal", "ft", only_domains=["legal"], evaluate=False),
        GridRun("merged", "ft", merge={"runs": ["ft_medical", "ft_legal"], "combination_type": "linear"}, label="merge"),
    ])  # fmt: skip
    for k, name in enumerate(("ft_medical", "ft_legal")):
        folder = run_dir(grid, grid.runs[k], 5)
        lora_adapter(tiny_model_config, folder / "adapter", k)
        (folder / "done.json").write_text(json.dumps({"name": name}))
    meta = run_one(grid, grid.runs[2], 5)
    folder = run_dir(grid, grid.runs[2], 5)
    assert meta["seed"] == 5 and meta["label"] == "merge" and "merge_s" in meta["timings"]
    assert json.loads((folder / "adapter" / "merge.json").read_text())["combination_type"] == "linear"
    result = json.loads((folder / "eval" / "eval.json").read_text())
    assert result["items"]["domain"]["central"] and result["baselines"]
