"""``rega prompts``: role prompts written by a model from k sampled training items, with provenance, restartable,
scored candidates, a length limit, and the file used as ``prompts.file`` of a corpus (inline roles still win)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from rega.config import DataSource, ModelConfig
from rega.data.corpus import CorpusConfig, build_corpus
from rega.data.prompts import PromptConfig
from rega.distill import role_prompts
from rega.distill.role_prompts import limit_length, write_role_prompts

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


def run(sources, output, model, **kwargs):
    options = {"k": 2, "max_words": 12, **kwargs}
    return write_role_prompts(CorpusConfig(strategy="ft", domains=sources), output, model, **options)


def test_writes_one_prompt_per_domain_with_its_seeded_provenance(sources, writer_model, tmp_path):
    data = run(sources, tmp_path / "p.yaml", writer_model)
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
    data = write_role_prompts(config, tmp_path / "p.yaml", writer_model, k=2, max_words=12)
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
