"""``rega prompts``: role prompts written by a model from k sampled training items, with provenance, restartable,
scored candidates, a length limit, and the file used as ``prompts.file`` of a corpus (inline roles still win); as
``prompts.write`` of a fit, written by the fit itself before its corpus, once."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from rega.config import DataSource, ModelConfig
from rega.data.corpus import CorpusConfig, build_corpus
from rega.data.prompts import PromptConfig, RolePromptWriting
from rega.distill import role_prompts
from rega.distill.role_prompts import limit_length, write_role_prompts
from rega.errors import ConfigError

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


@pytest.fixture(scope="module")
def writer_model(tiny_model_dir, tmp_path_factory) -> ModelConfig:
    """The tiny random model, perturbed: unperturbed it ends its turn at once and writes nothing."""
    from rega.model_source import load_tokenizer
    from rega.modules.model import load_model

    config = ModelConfig(name_or_path=str(tiny_model_dir))
    model = load_model(config)
    torch.manual_seed(2)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    path = tmp_path_factory.mktemp("perturbed")
    model.save_pretrained(path, safe_serialization=True)
    load_tokenizer(config).save_pretrained(path)
    return ModelConfig(name_or_path=str(path))


@pytest.fixture
def sources(tmp_path) -> list[DataSource]:
    out = []
    for domain in ("medical", "tax"):
        path = tmp_path / f"{domain}.jsonl"
        rows = [
            {
                "id": f"{domain}-{n}",
                "instruction": f"{domain} question {WORDS[n]}?",
                "output": f"answer {WORDS[n]}",
            }
            for n in range(10)
        ]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        out.append(DataSource(str(path), domain=domain))
    return out


def writing(output, model, **kwargs) -> RolePromptWriting:
    return RolePromptWriting(**{"output": str(output), "model": model, "k": 2, "max_words": 12, **kwargs})


def run(sources, output, model, **kwargs):
    return write_role_prompts(CorpusConfig(strategy="ft", domains=sources), writing(output, model, **kwargs))


def test_writes_one_prompt_per_domain_with_its_seeded_provenance(sources, writer_model, tmp_path, caplog):
    with caplog.at_level("INFO", logger="rega"):
        data = run(sources, tmp_path / "p.yaml", writer_model)
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("role prompts: ")]
    assert [m.split(": ")[1].split(" ")[0] for m in progress] == ["1/2", "2/2"]  # a line per domain
    assert "left" in progress[0] and "left" not in progress[1]
    written = yaml.safe_load((tmp_path / "p.yaml").read_text(encoding="utf-8"))
    assert written == data and set(written["roles"]) == {"medical", "tax"}
    assert all(p.strip() and len(p.split()) <= 12 for p in written["roles"].values())
    prov = written["provenance"]["medical"]
    assert prov["model"] == writer_model.name_or_path and prov["k"] == 2 and prov["lang"] == "en"
    assert prov["seed"] == 1234 and prov["candidates"] == 1 and prov["scores"] == []
    assert len(prov["items"]) == 2 and all(i.startswith("medical-") for i in prov["items"])
    again = run(sources, tmp_path / "same.yaml", writer_model)
    assert again["provenance"]["medical"]["items"] == prov["items"]
    assert again["roles"] == data["roles"]  # greedy: the same prompts
    other = run(sources, tmp_path / "other.yaml", writer_model, seed=7)
    assert other["provenance"]["medical"]["items"] != prov["items"]


def test_a_rerun_skips_finished_domains(sources, writer_model, tmp_path, monkeypatch):
    loads, calls = [], []
    real_load, real_domain = role_prompts.load_model, role_prompts.write_domain
    monkeypatch.setattr(role_prompts, "load_model", lambda config: loads.append(1) or real_load(config))
    monkeypatch.setattr(
        role_prompts, "write_domain", lambda w, d, *a: calls.append(d) or real_domain(w, d, *a)
    )
    output = tmp_path / "p.yaml"
    run(sources[:1], output, writer_model)  # a run that finished medical only
    assert calls == ["medical"] and len(loads) == 1
    first = yaml.safe_load(output.read_text(encoding="utf-8"))
    run(sources, output, writer_model)
    assert calls == ["medical", "tax"] and len(loads) == 2
    second = yaml.safe_load(output.read_text(encoding="utf-8"))
    assert second["roles"]["medical"] == first["roles"]["medical"]
    run(sources, output, writer_model)  # nothing left: the model is not even loaded
    assert calls == ["medical", "tax"] and len(loads) == 2
    run(sources, output, writer_model, max_words=8)  # other settings: written again
    assert calls == ["medical", "tax", "medical", "tax"]


def test_candidates_are_scored_and_the_best_is_kept(sources, writer_model, tmp_path):
    data = run(sources[:1], tmp_path / "p.yaml", writer_model, candidates=2)
    prov = data["provenance"]["medical"]
    assert len(prov["scores"]) == 2 and all(isinstance(s, float) for s in prov["scores"])
    assert len(prov["held_out"]) == 2 and not set(prov["held_out"]) & set(prov["items"])
    best = max(range(2), key=lambda i: prov["scores"][i])
    assert prov["chosen"] == best and data["roles"]["medical"] == prov["drafts"][best]


def test_length_limit_cuts_at_a_sentence_end():
    text = "You are a doctor. Answer yes or no. Then explain why in two sentences."
    assert limit_length(text, 8) == "You are a doctor. Answer yes or no."
    assert limit_length(text, 3) == "You are a"  # a first sentence longer than the limit is cut at it
    assert limit_length("你是医生。请回答是或否。", 6, "zh") == "你是医生。"
    assert limit_length("  short\n\nparagraph ", 5) == "short paragraph"


def test_the_file_feeds_the_corpus_and_its_manifest_and_inline_roles_win(sources, writer_model, tmp_path):
    output = tmp_path / "p.yaml"
    data = run(sources, output, writer_model)
    config = CorpusConfig(
        strategy="ft",
        domains=sources,
        prompts=PromptConfig(file=str(output), roles={"tax": "Inline tax role."}),
    )
    corpus = build_corpus(config, model_default_prompt="central")
    assert corpus.prompts.roles == {"medical": data["roles"]["medical"], "tax": "Inline tax role."}
    assert corpus.manifest["prompts_provenance"] == {"medical": data["provenance"]["medical"]}
    plain = build_corpus(CorpusConfig(strategy="ft", domains=sources[:1]), model_default_prompt="central")
    assert "prompts_provenance" not in plain.manifest  # hand-written prompts: the manifest is as before


def test_inline_roles_are_not_written(sources, writer_model, tmp_path):
    config = CorpusConfig(strategy="ft", domains=sources, prompts=PromptConfig(roles={"tax": "Mine."}))
    data = write_role_prompts(config, writing(tmp_path / "p.yaml", writer_model))
    assert set(data["roles"]) == {"medical"}


def test_the_command_reads_a_data_config(sources, writer_model, tmp_path, capsys):
    from rega.cli import main

    config = tmp_path / "data.yaml"
    domains = [{"path": s.path, "domain": s.domain} for s in sources]
    config.write_text(yaml.safe_dump({"corpus": {"strategy": "ft", "domains": domains}}), encoding="utf-8")
    output = tmp_path / "p.yaml"
    args = ["prompts", "--config", str(config), "--output", str(output), "--k", "2", "--max_words", "12"]
    main([*args, "--model.name_or_path", writer_model.name_or_path])
    assert set(yaml.safe_load(output.read_text(encoding="utf-8"))["roles"]) == {"medical", "tax"}
    assert f"wrote {output}" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ prompts.write: inside a fit

REPO = Path(__file__).resolve().parent.parent


def fit_args(sources, tmp_path, model: ModelConfig, **prompts) -> list[str]:
    """A one-step fit of the tiny model on the two domains (tax has no built-in prompt), prompts written by it."""
    data = {
        "max_length": 128,
        "batch_size": 2,
        "val": None,
        "cache": str(tmp_path / "cache"),
        "corpus": {
            "strategy": "ft",
            "domains": [{"path": s.path, "domain": s.domain} for s in sources],
            "prompts": {"write": {"output": str(tmp_path / "p.yaml"), "k": 2, "max_words": 12}, **prompts},
        },
    }
    config = tmp_path / "fit.yaml"
    config.write_text(yaml.safe_dump({"data": data}), encoding="utf-8")
    return [
        *("--config", str(REPO / "configs/trainer/cpu.yaml"), "--config", str(config)),
        *("--model.model.name_or_path", model.name_or_path, "--seed_everything", "7"),
        *("--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)),
        *("--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false"),
    ]  # fmt: skip


def counted(monkeypatch) -> list[str]:
    calls = []
    real = role_prompts.write_domain
    monkeypatch.setattr(role_prompts, "write_domain", lambda w, d, *a: calls.append(d) or real(w, d, *a))
    return calls


def test_a_fit_writes_its_role_prompts_before_its_corpus_and_only_once(
    sources, writer_model, tmp_path, monkeypatch
):
    from rega.lightning_cli import REGACLI, REGADataModule, REGAModule, run_lightning_cli

    calls = counted(monkeypatch)
    # LightningCLI notes args besides pytest's own argv; the filters the fit installs stay in here
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = run_lightning_cli(["fit", *fit_args(sources, tmp_path, writer_model)])
    output = tmp_path / "p.yaml"
    written = yaml.safe_load(output.read_text(encoding="utf-8"))
    assert calls == ["medical", "tax"] and set(written["roles"]) == {"medical", "tax"}  # tax: none built in
    prov = written["provenance"]["tax"]
    # the trained model writes, with the writing's own seed (not the fit's 7, which draws the corpus)
    assert prov["model"] == writer_model.name_or_path and prov["seed"] == 1234 and prov["lang"] == "en"
    assert cli.trainer.global_step == 1 and cli.datamodule.manifest["seed"] == 7
    assert cli.datamodule.prompts.roles == written["roles"]
    assert cli.datamodule.manifest["prompts_provenance"] == written["provenance"]

    # The same fit again (another job of a grid, a resume): nothing is written, the file is left alone. An inline
    # role wins over the written one.
    stamp = output.stat().st_mtime_ns
    args = fit_args(sources, tmp_path, writer_model, roles={"tax": "Inline tax role."})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        again = REGACLI(
            REGAModule, REGADataModule, args=args, run=False, parser_kwargs={"default_env": False}
        )
    again.before_fit()
    again.datamodule.prepare_data()
    assert calls == ["medical", "tax"] and output.stat().st_mtime_ns == stamp
    assert again.datamodule.prompts.roles == {
        "medical": written["roles"]["medical"],
        "tax": "Inline tax role.",
    }
    assert again.datamodule.manifest["prompts_provenance"] == {"medical": written["provenance"]["medical"]}


def test_validate_writes_the_role_prompts_its_corpus_reads(sources, writer_model, tmp_path, monkeypatch):
    """``rega validate`` builds the fit's corpus, so it writes the prompts file first as a fit does (it used to stop
    on the corpus' missing role prompts)."""
    from rega.lightning_cli import REGACLI, REGADataModule, REGAModule

    calls = counted(monkeypatch)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = REGACLI(
            REGAModule,
            REGADataModule,
            args=fit_args(sources, tmp_path, writer_model),
            run=False,
            parser_kwargs={"default_env": False},
        )
    cli.before_validate()
    cli.datamodule.prepare_data()
    assert calls == ["medical", "tax"]
    assert set(cli.datamodule.prompts.roles) >= {"medical", "tax"}


def test_prompts_file_and_write_naming_different_files_is_a_config_error(sources, tmp_path):
    from rega.datamodules import REGADataModule

    def datamodule(file: str) -> REGADataModule:
        prompts = PromptConfig(file=file, write=RolePromptWriting(output=str(tmp_path / "p.yaml")))
        return REGADataModule(corpus=CorpusConfig(strategy="ft", domains=sources, prompts=prompts))

    with pytest.raises(ConfigError, match="prompts.file .* and prompts.write.output .* name different files"):
        datamodule(str(tmp_path / "other.yaml"))
    # the same file: fine; the written domains (tax has no built-in prompt) need no prompt before the fit writes
    writing_model = datamodule(str(tmp_path / "p.yaml")).pending_role_prompts.model
    assert writing_model.name_or_path == "embedded"  # the trained model (the data module's default)


def test_processes_that_do_not_start_the_fit_only_read_the_file(sources, writer_model, tmp_path, monkeypatch):
    """A rank that a launcher started beside the others (torchrun, SLURM) writes nothing: the file must be complete;
    the process that writes leaves the random generators as they were, so the fit trains as if the file existed."""
    import random

    import numpy as np

    from rega.distill.role_prompts import ensure_role_prompts

    corpus = CorpusConfig(strategy="ft", domains=sources)
    settings = writing(tmp_path / "p.yaml", writer_model)
    with pytest.raises(ConfigError, match=r"lacks the role prompts of medical, tax .*`python cli.py prompts"):
        ensure_role_prompts(corpus, settings, here=False)

    def draws():
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    expected = draws()
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    assert ensure_role_prompts(corpus, settings, here=True) == tmp_path / "p.yaml"
    assert draws() == expected
    calls = counted(monkeypatch)
    ensure_role_prompts(corpus, settings, here=False)
    assert calls == []


def test_which_process_of_a_fit_writes(monkeypatch):
    import lightning as L

    from rega.lightning_cli import starts_the_fit

    monkeypatch.delenv("LOCAL_RANK", raising=False)

    def trainer(**options):
        return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, **options)

    assert starts_the_fit(trainer(devices=1))
    assert starts_the_fit(trainer(devices=2, strategy="ddp"))  # runs the script again for rank 1, after this
    assert starts_the_fit(trainer(devices=2, strategy="ddp_spawn"))
    assert not starts_the_fit(trainer(devices=2, strategy="ddp_fork"))  # CUDA must stay unused before a fork
    assert not starts_the_fit(trainer(devices=2, strategy="ddp", num_nodes=2))
    monkeypatch.setenv("LOCAL_RANK", "1")  # the script run again, or torchrun's ranks
    assert not starts_the_fit(trainer(devices=2, strategy="ddp"))


def test_a_two_process_fit_writes_in_the_process_that_starts_the_other(sources, writer_model, tmp_path):
    """DDP runs the script again for rank 1 after rank 0's before_fit: rank 0 writes, rank 1 finds every domain
    written (it would stop otherwise), and both train on the same prompts."""
    import subprocess
    import sys

    from cluster_helpers import run_env

    args = [sys.executable, str(REPO / "cli.py"), "fit", *fit_args(sources, tmp_path, writer_model)]
    ddp = ["--config", str(REPO / "configs/trainer/ddp_cpu.yaml"), "--trainer.max_steps", "2"]
    done = subprocess.run([*args, *ddp], env=run_env(), capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    written = yaml.safe_load((tmp_path / "p.yaml").read_text(encoding="utf-8"))
    assert set(written["provenance"]) == {"medical", "tax"}
