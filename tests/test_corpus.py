"""The corpus command end to end: config checks before any data is read, every strategy on the shared English
data (counts of the method's corpus: |D_g| + Σ|D_i| + Σ round(r·|D_i| per task)), determinism, the manifest and the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest
import yaml

from rega.cli import main
from rega.config import DataSource
from rega.data.corpus import (
    CorpusConfig,
    build_corpus,
    check_config,
    corpus_counts,
    summary_table,
    write_corpus,
)
from rega.data.prompts import BUILTIN_DIR, CENTRAL, PromptConfig
from rega.data.records import GENERAL, RecordError
from rega.data.strategies import (
    DOMAIN,
    INTEGRATED,
    ROLE,
    STRATEGIES,
    as_examples,
    register_strategy,
)
from rega.errors import ConfigError
from rega.io import file_sha256, read_jsonl
from rega.paths import REPO_ROOT

PC = "You are a helpful assistant (central prompt)."
EN_ROLES = yaml.safe_load((BUILTIN_DIR / "en.yaml").read_text(encoding="utf-8"))["roles"]
SHARED_EN = REPO_ROOT / "configs" / "data" / "shared_en.yaml"


def half_up(r: float, n: int) -> int:
    """round(r·n), half-up, exact for the r written in the config."""
    return math.floor(Fraction(str(r)) * n + Fraction(1, 2))


# ------------------------------------------------------------------------------------- toy data


def _row(i: int, domain: str | None, task: str, **extra) -> dict:
    out = {
        "id": f"{task}-{i}",
        "instruction": f"{task} question {i}",
        "output": f"{task} answer {i}",
        "task": task,
    }
    if domain:
        out["domain"] = domain
    return {**out, **extra}


# (domain, task) -> size; 25·0.1 = 2.5 rounds up, 13·0.1 = 1.3 down
TOY_SIZES = {("medical", "mcq"): 25, ("medical", "qa"): 13, ("legal", "yesno"): 10, ("finance", "fin_qa"): 7}
TOY_GENERAL = 12


@pytest.fixture
def toy(tmp_path) -> dict[str, Path]:
    """Small data in several formats: medical JSONL (two tasks, interleaved), legal JSONL, finance CSV, D_g."""
    data = tmp_path / "data"
    data.mkdir()
    paths = {
        "medical": data / "medical.jsonl",
        "legal": data / "legal.jsonl",
        "finance": data / "finance.csv",
    }
    medical = [_row(i, "medical", t) for i in range(25) for t in ("mcq", "qa") if t == "mcq" or i < 13]
    paths["medical"].write_text("".join(json.dumps(r) + "\n" for r in medical))
    legal = [_row(i, None, "yesno", choices=["Yes", "No"], answer="No") for i in range(10)]
    paths["legal"].write_text("".join(json.dumps(r) + "\n" for r in legal))
    lines = ["id,instruction,output,task"] + [f"fin-{i},What is {i}?,It is {i}.,fin_qa" for i in range(7)]
    paths["finance"].write_text("\n".join(lines) + "\n")
    paths["general"] = data / "general.jsonl"
    paths["general"].write_text(
        "".join(json.dumps(_row(i, "general", "pool")) + "\n" for i in range(TOY_GENERAL))
    )
    return paths


def toy_config(toy: dict[str, Path], **overrides) -> CorpusConfig:
    config = CorpusConfig(
        strategy="rega",
        domains=[
            DataSource(str(toy["medical"]), domain="medical"),
            DataSource(str(toy["legal"]), domain="legal"),
            DataSource(str(toy["finance"]), domain="finance"),
        ],
        general=[DataSource(str(toy["general"]), domain="general")],
        prompts=PromptConfig(lang="en", central=PC),
        mix_ratio=0.1,
        seed=1234,
    )
    return dataclasses.replace(config, **overrides)


def expected_total(strategy: str, sizes: dict, n_general: int, r: float) -> int:
    n_domain = sum(sizes.values())
    return {
        "zero_shot": 0,
        "ft": n_domain,
        "ftsd": n_general + n_domain,
        "ftrp": n_domain,
        "rega": n_general + n_domain + sum(half_up(r, n) for n in sizes.values()),
    }[strategy]


def check_corpus_file(out: Path, strategy: str, sizes: dict, n_general: int, r: float) -> dict:
    """Re-count corpus.jsonl independently and check it against the manifest and the strategy table."""
    manifest = json.loads((out / "manifest.json").read_text())
    rows = read_jsonl(out / "corpus.jsonl")
    prompts = manifest["prompts"]
    assert manifest["strategy"] == strategy
    assert manifest["num_examples"] == len(rows) == expected_total(strategy, sizes, n_general, r)
    assert manifest["file"] == "corpus.jsonl" and manifest["sha256"] == file_sha256(out / "corpus.jsonl")
    assert manifest["inference"] == list(STRATEGIES[strategy].inference)
    role_prompting = strategy in ("ftrp", "rega")
    for row in rows:
        if row["kind"] == DOMAIN and role_prompting:
            assert row["prompt"] == row["domain"]
            assert row["system"] == prompts["roles"][row["domain"]]
        else:  # D_g, D'_i and, without role prompting, D_i: all under p_c
            assert row["prompt"] == CENTRAL
            assert row["system"] == prompts["central"]
        if row["kind"] == INTEGRATED:
            assert row["id"] == row["source_id"] + "#integrated"
    kinds = Counter(row["kind"] for row in rows)
    n_domain = sum(sizes.values())
    expected_kinds = {
        "zero_shot": {},
        "ft": {DOMAIN: n_domain},
        "ftsd": {GENERAL: n_general, DOMAIN: n_domain},
        "ftrp": {DOMAIN: n_domain},
        "rega": {
            GENERAL: n_general,
            DOMAIN: n_domain,
            INTEGRATED: sum(half_up(r, n) for n in sizes.values()),
        },
    }[strategy]
    assert kinds == {k: v for k, v in expected_kinds.items() if v}
    assert manifest["counts"]["by_kind"] == dict(kinds)
    per_task = Counter((row["kind"], row["domain"], row["task"]) for row in rows)
    for (domain, task), n in sizes.items():
        if DOMAIN in expected_kinds:
            assert per_task[(DOMAIN, domain, task)] == n
        if strategy == "rega":
            assert per_task[(INTEGRATED, domain, task)] == half_up(r, n), (domain, task)
    assert manifest["counts"] == corpus_counts_from_rows(rows)
    return manifest


def corpus_counts_from_rows(rows: list[dict]) -> dict:
    by = Counter((r["kind"], r["prompt"], r["domain"], r["task"]) for r in rows)
    return {
        "by_kind": dict(Counter(r["kind"] for r in rows)),
        "by_prompt": dict(Counter(r["prompt"] for r in rows)),
        "by_domain": dict(Counter(r["domain"] for r in rows)),
        "rows": [
            {"kind": k, "prompt": p, "domain": d, "task": t, "count": n}
            for (k, p, d, t), n in sorted(by.items())
        ],
    }


# ------------------------------------------------------------------------ checks before any data


MISSING = "/nonexistent/rega-test/never-read.jsonl"  # reading it would raise FileNotFoundError


def unread_config(**overrides) -> CorpusConfig:
    config = CorpusConfig(
        strategy="rega",
        domains=[DataSource(MISSING, domain="medical")],
        general=[DataSource(MISSING, domain="general")],
        prompts=PromptConfig(central=PC),
    )
    return dataclasses.replace(config, **overrides)


@pytest.mark.parametrize("ratio", [-0.01, 1.5, float("inf"), float("nan")])
def test_mix_ratio_outside_unit_interval_fails_before_reading(ratio):
    """Checked once, where the config is read (the strategies trust CorpusInputs.mix_ratio)."""
    for call in (check_config, build_corpus):
        with pytest.raises(ConfigError, match=r"mix_ratio must be within \[0, 1\]"):
            call(unread_config(mix_ratio=ratio))


@pytest.mark.parametrize("strategy", ["rega", "ftsd"])
def test_strategy_needing_general_without_it_fails_before_reading(strategy):
    with pytest.raises(ConfigError, match=rf"strategy '{strategy}' needs self-distilled general data D_g"):
        build_corpus(unread_config(strategy=strategy, general=[]))


def test_strategies_not_needing_general_pass_the_check():
    for strategy in ("ft", "ftrp", "zero_shot"):
        check_config(unread_config(strategy=strategy, general=[]))


def test_training_strategy_without_domains_is_a_config_error():
    with pytest.raises(ConfigError, match="needs at least one domain source"):
        check_config(unread_config(strategy="ft", domains=[]))
    check_config(unread_config(strategy="zero_shot", domains=[], general=[]))


def test_unknown_strategy_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown strategy 'rega2'"):
        build_corpus(unread_config(strategy="rega2"))


def test_domain_without_role_prompt_fails_before_any_data_is_read():
    config = unread_config(
        domains=[DataSource(MISSING, domain="medical"), DataSource(MISSING, domain="chemistry")]
    )
    with pytest.raises(ConfigError, match=r"no role prompt for domain\(s\) chemistry"):
        check_config(config)
    with pytest.raises(ConfigError, match="chemistry"):
        build_corpus(config)  # a ConfigError, not FileNotFoundError: nothing was read
    with pytest.raises(ConfigError, match="chemistry"):
        check_config(unread_config(only_domains=["chemistry"]))
    # an empty prompt is no prompt
    with pytest.raises(ConfigError, match="medical"):
        check_config(unread_config(prompts=PromptConfig(central=PC, roles={"medical": "  "})))
    # an inline role prompt fixes it: the check passes and reading starts (and finds no file)
    fixed = dataclasses.replace(
        config, prompts=PromptConfig(central=PC, roles={"chemistry": "You are a chemist."})
    )
    check_config(fixed)
    with pytest.raises(FileNotFoundError, match="never-read"):
        build_corpus(fixed)


def test_undeclared_domain_in_rows_without_a_prompt_is_a_record_error(toy):
    path = toy["medical"].parent / "mixed.jsonl"
    path.write_text(
        json.dumps(_row(0, "medical", "qa")) + "\n" + json.dumps(_row(1, "chemistry", "qa")) + "\n"
    )
    config = toy_config(toy, domains=[DataSource(str(path))])
    with pytest.raises(RecordError, match=rf"{path}:2: field 'domain': unknown domain 'chemistry'"):
        build_corpus(config)


def test_general_source_rows_must_be_general(toy):
    path = toy["general"].parent / "bad_general.jsonl"
    path.write_text(json.dumps(_row(0, "medical", "pool")) + "\n")
    with pytest.raises(RecordError, match=rf"{path}:1: field 'domain'"):
        build_corpus(toy_config(toy, general=[DataSource(str(path))]))


def test_overlapping_general_and_domain_ids_are_refused(toy):
    path = toy["general"].parent / "clash.jsonl"
    path.write_text(json.dumps(_row(3, "general", "qa")) + "\n")  # id qa-3 also in medical.jsonl
    with pytest.raises(ConfigError, match="'qa-3' occurs 2 times"):
        build_corpus(toy_config(toy, general=[DataSource(str(path), domain="general")]))


# -------------------------------------------------------------------------------------- toy data


@pytest.mark.parametrize("strategy", ["zero_shot", "ft", "ftsd", "ftrp", "rega"])
def test_every_strategy_on_toy_data(toy, tmp_path, strategy):
    corpus = build_corpus(toy_config(toy, strategy=strategy))
    write_corpus(corpus, tmp_path / "out")
    manifest = check_corpus_file(tmp_path / "out", strategy, TOY_SIZES, TOY_GENERAL, 0.1)
    assert manifest["prompts"] == {
        "central": PC,
        "roles": {d: EN_ROLES[d] for d in ("finance", "legal", "medical")},
    }
    assert manifest["source_sizes"]["domain"] == {f"{d}/{t}": n for (d, t), n in TOY_SIZES.items()}
    assert manifest["source_sizes"]["general"] == TOY_GENERAL
    assert manifest["skipped_rows"] == []
    assert [s["sha256"] for s in manifest["inputs"]["domains"]] == [
        file_sha256(toy[d]) for d in ("medical", "legal", "finance")
    ]


@pytest.mark.parametrize("ratio", [0.0, 1.0, 0.25, 0.5])
def test_mix_ratio_edges_on_toy_data(toy, tmp_path, ratio):
    corpus = build_corpus(toy_config(toy, mix_ratio=ratio))
    write_corpus(corpus, tmp_path / "out")
    manifest = check_corpus_file(tmp_path / "out", "rega", TOY_SIZES, TOY_GENERAL, ratio)
    integrated = [e for e in corpus.examples if e.kind == INTEGRATED]
    if ratio == 0.0:
        assert integrated == [] and INTEGRATED not in manifest["counts"]["by_kind"]
    if ratio == 1.0:
        domain = [e.source_id for e in corpus.examples if e.kind == DOMAIN]
        assert [e.source_id for e in integrated] == domain


def test_only_domains_builds_a_single_domain_variant(toy, tmp_path):
    corpus = build_corpus(toy_config(toy, only_domains=["medical"]))
    write_corpus(corpus, tmp_path / "out")
    medical = {k: n for k, n in TOY_SIZES.items() if k[0] == "medical"}
    manifest = check_corpus_file(tmp_path / "out", "rega", medical, TOY_GENERAL, 0.1)
    assert {e.domain for e in corpus.examples} == {"medical", "general"}
    assert manifest["prompts"]["roles"] == {"medical": EN_ROLES["medical"]}


def test_skip_invalid_rows_are_listed_in_the_manifest_and_summary(toy, tmp_path):
    with open(toy["legal"], "a") as handle:
        handle.write('{"id": "bad-1", "instruction": "Q", "output": 3}\n{broken\n')
    with pytest.raises(RecordError, match=rf"{toy['legal']}:11: field 'output'"):
        build_corpus(toy_config(toy))
    corpus = build_corpus(toy_config(toy, skip_invalid=True))
    skipped = corpus.manifest["skipped_rows"]
    assert [s.split(": ", 1)[0] for s in skipped] == [f"{toy['legal']}:11", f"{toy['legal']}:12"]
    assert corpus.manifest["num_examples"] == expected_total("rega", TOY_SIZES, TOY_GENERAL, 0.1)
    assert "skipped invalid rows: 2 (listed in manifest.json)" in summary_table(corpus.manifest)


def test_prompt_file_and_inline_overrides(toy, tmp_path):
    prompt_file = tmp_path / "prompts.yaml"
    prompt_file.write_text(yaml.safe_dump({"central": "FILE CENTRAL", "roles": {"legal": "FILE LEGAL"}}))
    corpus = build_corpus(toy_config(toy, prompts=PromptConfig(file=str(prompt_file))))
    assert corpus.prompts.central == "FILE CENTRAL"
    assert corpus.prompts.roles["legal"] == "FILE LEGAL"
    assert corpus.prompts.roles["medical"] == EN_ROLES["medical"]
    inline = PromptConfig(file=str(prompt_file), central="INLINE", roles={"legal": "INLINE LEGAL"})
    corpus = build_corpus(toy_config(toy, prompts=inline))
    assert (corpus.prompts.central, corpus.prompts.roles["legal"]) == ("INLINE", "INLINE LEGAL")
    assert {e.system for e in corpus.examples if e.prompt == "legal"} == {"INLINE LEGAL"}


def test_model_default_prompt_is_pc_when_central_unset(toy):
    corpus = build_corpus(toy_config(toy, prompts=PromptConfig()), model_default_prompt="MODEL SYSTEM PROMPT")
    assert corpus.prompts.central == "MODEL SYSTEM PROMPT"
    assert {e.system for e in corpus.examples if e.prompt == CENTRAL} == {"MODEL SYSTEM PROMPT"}


def test_same_seed_gives_byte_identical_corpus(toy, tmp_path):
    config = toy_config(toy)
    write_corpus(build_corpus(config), tmp_path / "a")
    write_corpus(build_corpus(config), tmp_path / "b")
    assert (tmp_path / "a" / "corpus.jsonl").read_bytes() == (tmp_path / "b" / "corpus.jsonl").read_bytes()
    first, second = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in "ab")
    first.pop("build_seconds", None), second.pop("build_seconds", None)
    assert first == second


def test_manifest_bytes_do_not_depend_on_wall_clock(toy, tmp_path, monkeypatch):
    """Two runs with one seed must write byte-identical files, the manifest included, even when the second run
    is slower (simulated with a fake clock): a timing belongs in the log, not in a reproducible artefact."""
    import rega.data.corpus as corpus_module

    config = toy_config(toy)
    for name, seconds in (("a", 0.25), ("b", 3.5)):
        ticks = iter([100.0, 100.0 + seconds])

        class FakeTime:
            @staticmethod
            def perf_counter(ticks=ticks):
                return next(ticks, 200.0)

        monkeypatch.setattr(corpus_module, "time", FakeTime)
        write_corpus(build_corpus(config), tmp_path / name)
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()


def test_another_seed_changes_only_the_integrated_part(toy):
    base = build_corpus(toy_config(toy, seed=1234)).examples
    other = build_corpus(toy_config(toy, seed=4321)).examples
    assert [e for e in base if e.kind != INTEGRATED] == [e for e in other if e.kind != INTEGRATED]
    base_int = [e for e in base if e.kind == INTEGRATED]
    other_int = [e for e in other if e.kind == INTEGRATED]
    assert {e.id for e in base_int} != {e.id for e in other_int}
    assert Counter(e.task for e in base_int) == Counter(e.task for e in other_int)


def test_write_corpus_arrow_matches_jsonl(toy, tmp_path):
    import pyarrow as pa

    corpus = build_corpus(toy_config(toy))
    jsonl = write_corpus(corpus, tmp_path / "j")
    arrow = write_corpus(corpus, tmp_path / "a", fmt="arrow")
    assert arrow.name == "corpus.arrow"
    with pa.ipc.open_file(arrow) as reader:
        assert reader.read_all().to_pylist() == read_jsonl(jsonl)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["file"] == "corpus.arrow" and manifest["sha256"] == file_sha256(arrow)
    with pytest.raises(ConfigError, match="unknown corpus format 'csv'"):
        write_corpus(corpus, tmp_path / "c", fmt="csv")


def test_write_corpus_leaves_no_temporary_files(toy, tmp_path):
    write_corpus(build_corpus(toy_config(toy)), tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["corpus.jsonl", "manifest.json"]


KILL_DURING_WRITE = """
import json, os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
import rega.data.corpus as corpus
from test_corpus import toy_config

def killed(path, obj):  # the new corpus file is written, its manifest is next: the process dies here
    os._exit(9)

corpus.write_json = killed
toy = {name: Path(path) for name, path in json.loads(sys.argv[1]).items()}
corpus.write_corpus(corpus.build_corpus(toy_config(toy, seed=7)), sys.argv[2])
"""


def test_killed_write_keeps_the_old_corpus_and_manifest_and_the_next_run_cleans_up(toy, tmp_path):
    """A kill between the corpus and its manifest used to leave the new corpus beside the old manifest."""
    out = tmp_path / "out"
    write_corpus(build_corpus(toy_config(toy)), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    paths = json.dumps({name: str(path) for name, path in toy.items()})
    args = [sys.executable, "-c", KILL_DURING_WRITE, paths, str(out), str(Path(__file__).parent)]
    assert subprocess.run(args, cwd=REPO_ROOT, timeout=120).returncode == 9
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old pair, untouched
    (stale,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert (stale / "corpus.jsonl").exists()  # what the killed run left behind

    write_corpus(build_corpus(toy_config(toy, seed=7)), out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # removed by the next run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 7 and manifest["sha256"] == file_sha256(out / "corpus.jsonl")


def test_output_folder_with_other_files_is_refused_before_writing(toy, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds files that are not a corpus \(notes\.txt\)"):
        write_corpus(build_corpus(toy_config(toy)), out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_zero_shot_writes_an_empty_corpus(toy, tmp_path):
    corpus = build_corpus(toy_config(toy, strategy="zero_shot", general=[]))
    path = write_corpus(corpus, tmp_path / "out")
    assert path.read_bytes() == b""
    assert corpus.manifest["counts"] == corpus_counts([]) and corpus.manifest["num_examples"] == 0


def test_summary_table_lists_every_group_and_the_total(toy):
    manifest = build_corpus(toy_config(toy)).manifest
    table = summary_table(manifest)
    lines = table.splitlines()
    assert lines[0] == "strategy=rega  r=0.1  seed=1234"
    assert lines[1].split() == ["kind", "prompt", "domain", "task", "count"]
    for row in manifest["counts"]["rows"]:
        assert any(
            line.split() == [row["kind"], row["prompt"], row["domain"], row["task"], str(row["count"])]
            for line in lines
        )
    assert ["total", str(manifest["num_examples"])] in [line.split() for line in lines]


def test_summary_shows_every_tasks_d_i_and_integrated_d_i_with_zeros(toy, caplog):
    """|D'_i| = round(r·|D_i|), halves up: at r = 0.04 medical/qa (13 -> 0.52) gets 1, finance (7 -> 0.28) none."""
    manifest = build_corpus(toy_config(toy, mix_ratio=0.04)).manifest
    lines = [line.split() for line in summary_table(manifest).splitlines()]
    assert ["domain", "task", "|D_i|", "|D'_i|"] in lines
    for (domain, task), n in TOY_SIZES.items():
        assert [domain, task, str(n), str(half_up(0.04, n))] in lines
    assert manifest["tasks"][0] == {"domain": "finance", "task": "fin_qa", "size": 7, "integrated": 0}
    assert "finance/fin_qa gets no D'_i sample" in caplog.text and "legal/yesno" in caplog.text
    assert "medical/qa" not in caplog.text
    ft_lines = summary_table(build_corpus(toy_config(toy, strategy="ft")).manifest).splitlines()
    assert ["domain", "task", "|D_i|"] in [line.split() for line in ft_lines]  # no D'_i without integration


@pytest.fixture
def registered():
    names: list[str] = []

    def register(name, **kwargs):
        def decorate(build):
            out = register_strategy(name, **kwargs)(build)
            names.append(name)
            return out

        return decorate

    yield register
    for name in names:
        STRATEGIES.pop(name, None)


def test_custom_strategy_through_build_corpus(toy, tmp_path, registered):
    @registered("test_general_only_roles", inference=(ROLE,))
    def roles_only_medical(inputs):
        """Role prompting for medical records only (an ablation)."""
        medical = [r for r in inputs.domain_records if r.domain == "medical"]
        return as_examples(medical, ROLE, inputs.prompts, DOMAIN)

    corpus = build_corpus(toy_config(toy, strategy="test_general_only_roles", general=[]))
    assert corpus.manifest["strategy"] == "test_general_only_roles"
    assert corpus.manifest["inference"] == [ROLE]
    assert corpus.manifest["num_examples"] == 25 + 13
    assert {e.prompt for e in corpus.examples} == {"medical"}


# ------------------------------------------------------------------------------ shared English data


def _shared_config(**overrides) -> CorpusConfig:
    raw = yaml.safe_load(SHARED_EN.read_text())["corpus"]
    config = CorpusConfig(
        strategy=raw["strategy"],
        mix_ratio=raw["mix_ratio"],
        seed=raw.get("seed"),
        skip_invalid=raw["skip_invalid"],
        prompts=PromptConfig(**raw["prompts"], central=PC),
        domains=[DataSource(**d) for d in raw["domains"]],
        general=[DataSource(**d) for d in raw["general"]],
    )
    return dataclasses.replace(config, **overrides)


@pytest.fixture(scope="module")
def shared_sizes(shared_data):
    """Sizes counted independently of the loaders: rows per (domain, task) and valid rows of general_en."""
    sizes: Counter = Counter()
    for name in ("pubmedqa", "medmcqa", "overruling", "fiqa"):
        for row in read_jsonl(shared_data / name / "train.jsonl"):
            sizes[(row["domain"], row["task"])] += 1
    general = read_jsonl(shared_data / "general_en" / "train.jsonl")
    n_general = sum(1 for row in general if str(row.get("output") or "").strip())
    return dict(sizes), n_general, len(general) - n_general


@pytest.mark.parametrize("strategy", ["zero_shot", "ft", "ftsd", "ftrp", "rega"])
def test_every_strategy_on_shared_english_data(shared_sizes, tmp_path, strategy):
    sizes, n_general, n_bad = shared_sizes
    assert set(sizes) == {
        ("medical", "pubmedqa"),
        ("medical", "medmcqa"),
        ("legal", "overruling"),
        ("finance", "fiqa"),
    }
    corpus = build_corpus(_shared_config(strategy=strategy))
    write_corpus(corpus, tmp_path / "out")
    manifest = check_corpus_file(tmp_path / "out", strategy, sizes, n_general, 0.1)
    assert manifest["source_sizes"]["general"] == n_general
    assert len(manifest["skipped_rows"]) == n_bad
    assert all("general_en/train.jsonl:" in s and "field 'output'" in s for s in manifest["skipped_rows"])
    assert manifest["prompts"]["roles"] == {d: EN_ROLES[d] for d in ("finance", "legal", "medical")}


def test_shared_rega_count_formula(shared_sizes):
    sizes, n_general, _ = shared_sizes
    manifest = build_corpus(_shared_config()).manifest
    integrated = sum(half_up(0.1, n) for n in sizes.values())
    assert manifest["num_examples"] == n_general + sum(sizes.values()) + integrated
    assert manifest["counts"]["by_prompt"][CENTRAL] == n_general + integrated


def test_shared_determinism_and_seed(shared_data, tmp_path):
    write_corpus(build_corpus(_shared_config()), tmp_path / "a")
    write_corpus(build_corpus(_shared_config()), tmp_path / "b")
    assert (tmp_path / "a" / "corpus.jsonl").read_bytes() == (tmp_path / "b" / "corpus.jsonl").read_bytes()
    write_corpus(build_corpus(_shared_config(seed=7)), tmp_path / "c")
    a, c = read_jsonl(tmp_path / "a" / "corpus.jsonl"), read_jsonl(tmp_path / "c" / "corpus.jsonl")
    assert [r for r in a if r["kind"] != INTEGRATED] == [r for r in c if r["kind"] != INTEGRATED]
    a_int = {r["id"] for r in a if r["kind"] == INTEGRATED}
    c_int = {r["id"] for r in c if r["kind"] == INTEGRATED}
    assert a_int != c_int and len(a_int) == len(c_int)


def test_shared_single_domain_variant(shared_sizes, tmp_path):
    sizes, n_general, _ = shared_sizes
    corpus = build_corpus(_shared_config(only_domains=["legal"]))
    write_corpus(corpus, tmp_path / "out")
    legal = {k: n for k, n in sizes.items() if k[0] == "legal"}
    check_corpus_file(tmp_path / "out", "rega", legal, n_general, 0.1)


# ---------------------------------------------------------------------------------------------- CLI


def write_toy_yaml(toy: dict[str, Path], path: Path, **corpus_overrides) -> Path:
    corpus = {
        "strategy": "rega",
        "mix_ratio": 0.1,
        "seed": 1234,
        "prompts": {"lang": "en", "central": PC},
        "domains": [
            {"path": str(toy["medical"]), "domain": "medical"},
            {"path": str(toy["legal"]), "domain": "legal"},
            {"path": str(toy["finance"]), "domain": "finance"},
        ],
        "general": [{"path": str(toy["general"]), "domain": "general"}],
    }
    corpus.update(corpus_overrides)
    path.write_text(yaml.safe_dump({"corpus": corpus}))
    return path


def test_cli_corpus_writes_manifest_and_prints_summary(toy, tmp_path, capsys):
    config = write_toy_yaml(toy, tmp_path / "corpus.yaml")
    out = tmp_path / "out"
    main(["corpus", "--config", str(config), "--output", str(out)])
    printed = capsys.readouterr().out
    manifest = check_corpus_file(out, "rega", TOY_SIZES, TOY_GENERAL, 0.1)
    assert printed.splitlines()[0] == "strategy=rega  r=0.1  seed=1234"
    assert summary_table(manifest) in printed
    assert f"wrote {out / 'corpus.jsonl'} and {out / 'manifest.json'}" in printed


def test_cli_overrides_after_config(toy, tmp_path, capsys):
    config = write_toy_yaml(toy, tmp_path / "corpus.yaml")
    out = tmp_path / "out"
    main(
        [
            "corpus",
            "--config",
            str(config),
            "--corpus.strategy",
            "ftrp",
            "--output",
            str(out),
            "--format",
            "arrow",
        ]
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["strategy"] == "ftrp" and manifest["file"] == "corpus.arrow"
    assert "strategy=ftrp" in capsys.readouterr().out


def test_cli_on_shared_english_config(shared_sizes, tmp_path, capsys):
    sizes, n_general, _ = shared_sizes
    out = tmp_path / "out"
    main(["corpus", "--config", str(SHARED_EN), "--corpus.prompts.central", PC, "--output", str(out)])
    check_corpus_file(out, "rega", sizes, n_general, 0.1)
    assert "skipped invalid rows: " in capsys.readouterr().out


def test_cli_uses_the_models_default_prompt_when_central_unset(toy, tmp_path, monkeypatch):
    """Without prompts.central, p_c is the model's default system prompt (tokenizer stubbed: no model here)."""
    import rega.data.corpus

    class StubFormat:
        def __init__(self, tokenizer):
            assert tokenizer == "stub-tokenizer"
            self.default_system = "STUB MODEL DEFAULT"

    monkeypatch.setattr(rega.data.corpus, "load_tokenizer", lambda config: "stub-tokenizer")
    monkeypatch.setattr(rega.data.corpus, "ChatFormat", StubFormat)
    config = write_toy_yaml(toy, tmp_path / "corpus.yaml", prompts={"lang": "en"})
    main(["corpus", "--config", str(config), "--output", str(tmp_path / "out")])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["prompts"]["central"] == "STUB MODEL DEFAULT"


def _bad_record(toy, tmp_path):
    with open(toy["legal"], "a") as handle:
        handle.write('{"id": "x", "instruction": "Q", "output": 42}\n')
    return {}, rf"error: {toy['legal']}:11: field 'output': expected a string, got int"


def _bad_ratio(toy, tmp_path):
    return {"mix_ratio": 2.0}, r"error: mix_ratio must be within \[0, 1\], got 2.0"


def _missing_role(toy, tmp_path):
    return {
        "domains": [{"path": str(toy["medical"]), "domain": "chemistry"}]
    }, r"error: no role prompt .*chemistry"


def _missing_file(toy, tmp_path):
    return {
        "domains": [{"path": str(tmp_path / "gone.jsonl"), "domain": "medical"}]
    }, r"error: data source .* not found"


def _needs_general(toy, tmp_path):
    return {"general": []}, r"error: strategy 'rega' needs self-distilled general data D_g"


def _unsupported_extension(toy, tmp_path):
    (tmp_path / "data.txt").write_text("x\n")
    domains = [{"path": str(tmp_path / "data.txt"), "domain": "medical"}]
    return {"domains": domains}, r"error: .*data\.txt: unsupported file type '\.txt'"


def _unknown_field_mapping(toy, tmp_path):
    domains = [{"path": str(toy["medical"]), "domain": "medical", "fields": {"question": "instruction"}}]
    return {"domains": domains}, r"error: .*unknown schema field 'question'"


BAD_CLI = {
    "bad_record": _bad_record,
    "mix_ratio_out_of_range": _bad_ratio,
    "domain_without_role_prompt": _missing_role,
    "missing_file": _missing_file,
    "rega_without_general": _needs_general,
    "unsupported_extension": _unsupported_extension,
    "unknown_field_mapping": _unknown_field_mapping,
}


@pytest.mark.parametrize("case", sorted(BAD_CLI))
def test_cli_bad_input_exits_2_with_one_line(toy, tmp_path, capsys, case):
    overrides, pattern = BAD_CLI[case](toy, tmp_path)
    config = write_toy_yaml(toy, tmp_path / "corpus.yaml", **overrides)
    with pytest.raises(SystemExit) as info:
        main(["corpus", "--config", str(config), "--output", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert __import__("re").match(pattern, err), err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_cli_config_error_is_reported_before_the_tokenizer_is_loaded(toy, tmp_path, monkeypatch, capsys):
    import rega.data.corpus

    def no_tokenizer(config):
        raise AssertionError("the tokenizer must not be loaded for a config that cannot work")

    monkeypatch.setattr(rega.data.corpus, "load_tokenizer", no_tokenizer)
    config = write_toy_yaml(toy, tmp_path / "corpus.yaml", prompts={"lang": "en"}, mix_ratio=-1)
    with pytest.raises(SystemExit) as info:
        main(["corpus", "--config", str(config), "--output", str(tmp_path / "out")])
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("error: mix_ratio must be within")


def test_cli_subprocess_bad_record_exit_code_and_no_traceback(toy, tmp_path):
    overrides, _ = _bad_record(toy, tmp_path)
    config = write_toy_yaml(toy, tmp_path / "corpus.yaml", **overrides)
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "cli.py"),
            "corpus",
            "--config",
            str(config),
            "--output",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {toy['legal']}:11: field 'output': expected a string, got int 42"
    )
