"""Corpus strategies as pure functions: counts, kinds, prompt keys and prompt texts per the table in
``rega/data/strategies.py``; the D'_i draw (per task, seeded, r edge cases); registration of a new strategy."""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction

import pytest

from rega.data.prompts import CENTRAL, RolePrompts
from rega.data.records import GENERAL, Record
from rega.data.strategies import (
    DOMAIN,
    INTEGRATED,
    ROLE,
    STRATEGIES,
    CorpusInputs,
    Example,
    as_examples,
    build_examples,
    get_strategy,
    integration_size,
    register_strategy,
    sample_integration,
)
from rega.errors import ConfigError

PROMPTS = RolePrompts(
    central="You are a helpful assistant.",
    roles={"medical": "You are a doctor.", "legal": "You are a lawyer.", "finance": "You are a banker."},
)
# (domain, task) -> size; odd sizes so that r·n has fractional parts, 25·0.1 = 2.5 exercises half-up
SIZES = {("medical", "mcq"): 25, ("medical", "qa"): 13, ("legal", "yesno"): 10, ("finance", "qa"): 7}
MIX = 0.1


def rec(i: int, domain: str, task: str) -> Record:
    return Record(
        id=f"{domain}-{task}-{i}",
        instruction=f"{task} question {i}",
        input=f"context {i}" if i % 2 else "",
        output=f"answer {i}",
        domain=domain,
        task=task,
    )


def domain_records(sizes: dict[tuple[str, str], int] = SIZES) -> list[Record]:
    # tasks interleaved, so "input order kept" is a real property
    out, longest = [], max(sizes.values())
    for i in range(longest):
        for (domain, task), n in sizes.items():
            if i < n:
                out.append(rec(i, domain, task))
    return out


def general_records(n: int = 12) -> list[Record]:
    return [rec(i, GENERAL, "pool") for i in range(n)]


def inputs(**overrides) -> CorpusInputs:
    kwargs = {
        "domain_records": domain_records(),
        "general_records": general_records(),
        "prompts": PROMPTS,
        "mix_ratio": MIX,
        "seed": 1234,
    }
    kwargs.update(overrides)
    return CorpusInputs(**kwargs)


def half_up(r: float, n: int) -> int:
    """round(r·n), half-up, computed exactly for the r written in the config (no float error)."""
    return math.floor(Fraction(str(r)) * n + Fraction(1, 2))


def expected_integrated(sizes=SIZES, r=MIX) -> int:
    return sum(half_up(r, n) for n in sizes.values())


N_DOMAIN = sum(SIZES.values())
N_GENERAL = 12


def check_example(ex: Example, source: Record, *, kind: str, prompt: str) -> None:
    assert ex.kind == kind
    assert ex.prompt == prompt
    assert ex.system == PROMPTS.text(prompt)
    assert ex.source_id == source.id
    assert ex.id == (f"{source.id}#integrated" if kind == INTEGRATED else source.id)
    assert (ex.instruction, ex.input, ex.output, ex.domain, ex.task, ex.lang) == (
        source.instruction,
        source.input,
        source.output,
        source.domain,
        source.task,
        source.lang,
    )
    assert ex.user_text == source.user_text


# ------------------------------------------------------------------------------------ the table


def test_registered_strategies_and_inference_rules():
    assert {"zero_shot", "ft", "ftsd", "ftrp", "rega"} <= set(STRATEGIES)
    rules = {name: (STRATEGIES[name].inference, STRATEGIES[name].needs_general) for name in STRATEGIES}
    assert rules["zero_shot"] == ((CENTRAL,), False)
    assert rules["ft"] == ((CENTRAL,), False)
    assert rules["ftsd"] == ((CENTRAL,), True)
    assert rules["ftrp"] == ((ROLE,), False)
    assert rules["rega"] == ((CENTRAL, ROLE), True)
    assert all(STRATEGIES[name].description for name in STRATEGIES)


def test_zero_shot_has_no_training_corpus():
    assert build_examples("zero_shot", inputs()) == []
    assert build_examples("zero_shot", inputs(general_records=None, domain_records=[])) == []


def test_ft_is_all_domain_records_under_central():
    data = inputs()
    examples = build_examples("ft", data)
    assert len(examples) == N_DOMAIN
    for ex, source in zip(examples, data.domain_records, strict=True):
        check_example(ex, source, kind=DOMAIN, prompt=CENTRAL)


def test_ftsd_is_general_then_domain_all_under_central():
    data = inputs()
    examples = build_examples("ftsd", data)
    assert len(examples) == N_GENERAL + N_DOMAIN
    sources = data.general_records + data.domain_records
    kinds = [GENERAL] * N_GENERAL + [DOMAIN] * N_DOMAIN
    for ex, source, kind in zip(examples, sources, kinds, strict=True):
        check_example(ex, source, kind=kind, prompt=CENTRAL)


def test_ftrp_puts_each_record_under_its_own_role_prompt():
    data = inputs()
    examples = build_examples("ftrp", data)
    assert len(examples) == N_DOMAIN
    for ex, source in zip(examples, data.domain_records, strict=True):
        check_example(ex, source, kind=DOMAIN, prompt=source.domain)
    assert {ex.system for ex in examples} == set(PROMPTS.roles.values())
    # ftrp does not need D_g and ignores it when present
    assert build_examples("ftrp", inputs(general_records=None)) == examples


def test_rega_corpus_has_general_integrated_and_role_parts():
    data = inputs()
    examples = build_examples("rega", data)
    n_int = expected_integrated()
    assert n_int == 3 + 1 + 1 + 1  # 2.5 -> 3 (half-up), 1.3 -> 1, 1.0 -> 1, 0.7 -> 1
    assert len(examples) == N_GENERAL + n_int + N_DOMAIN
    assert Counter(e.kind for e in examples) == {GENERAL: N_GENERAL, INTEGRATED: n_int, DOMAIN: N_DOMAIN}
    by_id = {r.id: r for r in data.domain_records + data.general_records}
    for ex in examples:
        expected_prompt = ex.domain if ex.kind == DOMAIN else CENTRAL
        check_example(ex, by_id[ex.source_id], kind=ex.kind, prompt=expected_prompt)
    # D_i appears exactly once under its role prompt, D'_i once more under p_c, D_g once under p_c
    assert [e.source_id for e in examples if e.kind == DOMAIN] == [r.id for r in data.domain_records]
    assert [e.source_id for e in examples if e.kind == GENERAL] == [r.id for r in data.general_records]
    integrated = [e for e in examples if e.kind == INTEGRATED]
    assert len({e.source_id for e in integrated}) == n_int
    per_task = Counter((e.domain, e.task) for e in integrated)
    assert per_task == {key: half_up(MIX, n) for key, n in SIZES.items()}
    # parts come in table order: p_c ⊕ D_g, then p_c ⊕ D'_i, then p_i ⊕ D_i
    assert [e.kind for e in examples] == [GENERAL] * N_GENERAL + [INTEGRATED] * n_int + [DOMAIN] * N_DOMAIN
    assert len({e.id for e in examples}) == len(examples)


@pytest.mark.parametrize("strategy", ["ftsd", "rega"])
@pytest.mark.parametrize("general", [None, []])
def test_strategies_needing_general_data_refuse_to_build_without_it(strategy, general):
    with pytest.raises(ConfigError, match=rf"strategy '{strategy}' needs self-distilled general data D_g"):
        build_examples(strategy, inputs(general_records=general))


def test_unknown_strategy_lists_the_registered_ones():
    with pytest.raises(
        ConfigError, match=r"unknown strategy 'regaa'; registered: .*ft, ft_replay, ftrp, ftsd, rega, sdft"
    ):
        get_strategy("regaa")
    with pytest.raises(ConfigError):
        build_examples("regaa", inputs())


# ---------------------------------------------------------------------------- D'_i: the integration draw


@pytest.mark.parametrize(
    ("ratio", "n", "expected"),
    [
        (0.0, 10, 0),
        (0.049, 10, 0),
        (0.05, 10, 1),
        (0.15, 10, 2),
        (0.25, 10, 3),
        (0.249, 10, 2),
        (0.3, 10, 3),
        (0.77, 10, 8),
    ],
)
def test_integration_size_rounds_half_up(ratio, n, expected):
    assert integration_size(ratio, n) == expected


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.25, 0.3, 0.5, 0.9])
def test_integration_keeps_each_tasks_share_and_input_order(ratio):
    records = domain_records()
    drawn = sample_integration(records, ratio, seed=7)
    assert Counter((r.domain, r.task) for r in drawn) == {
        key: half_up(ratio, n) for key, n in SIZES.items() if half_up(ratio, n)
    }
    positions = [records.index(r) for r in drawn]
    assert positions == sorted(positions)
    assert len({r.id for r in drawn}) == len(drawn)


def test_integration_edge_ratios():
    records = domain_records()
    assert sample_integration(records, 0.0, seed=1) == []
    assert sample_integration(records, 1.0, seed=1) == records
    assert sample_integration([], 0.5, seed=1) == []
    rega0 = build_examples("rega", inputs(mix_ratio=0.0))
    assert Counter(e.kind for e in rega0) == {GENERAL: N_GENERAL, DOMAIN: N_DOMAIN}
    rega1 = build_examples("rega", inputs(mix_ratio=1.0))
    integrated = [e.source_id for e in rega1 if e.kind == INTEGRATED]
    assert integrated == [r.id for r in domain_records()]


def test_integration_is_seeded_and_seed_sensitive():
    records = domain_records()
    first = sample_integration(records, 0.3, seed=1234)
    assert sample_integration(list(records), 0.3, seed=1234) == first
    others = [sample_integration(records, 0.3, seed=s) for s in (1, 2, 3)]
    assert any(o != first for o in others)
    assert all(len(o) == len(first) for o in others)


def test_adding_a_task_does_not_change_what_the_others_draw():
    base = sample_integration(domain_records(), 0.3, seed=5)
    bigger = sample_integration(domain_records({**SIZES, ("legal", "summary"): 40}), 0.3, seed=5)
    assert [r for r in bigger if r.task != "summary" or r.domain != "legal"] == base


def test_integration_size_rounds_exact_halves_up_despite_float_error():
    """r·|D_i| = 0.29·50 = 14.5 exactly, so D'_i must hold 15 records; in binary floating point 0.29*50 is
    14.499999999999998 and a plain floor(x + 0.5) gives 14. The config says r = 0.29, not its float neighbour."""
    records = [rec(i, "medical", "qa") for i in range(50)]
    assert len(sample_integration(records, 0.29, seed=0)) == 15
    records = [rec(i, "legal", "qa") for i in range(45)]
    assert len(sample_integration(records, 0.7, seed=0)) == 32  # 31.5 -> 32, float says 31.499999999999996


# --------------------------------------------------------------------------------------- helpers


def test_as_examples_role_and_central():
    records = domain_records()[:4]
    role = as_examples(records, ROLE, PROMPTS, DOMAIN)
    central = as_examples(records, CENTRAL, PROMPTS, INTEGRATED)
    assert [e.prompt for e in role] == [r.domain for r in records]
    assert [e.system for e in role] == [PROMPTS.roles[r.domain] for r in records]
    assert {e.prompt for e in central} == {CENTRAL} and {e.system for e in central} == {PROMPTS.central}
    assert [e.id for e in central] == [f"{r.id}#integrated" for r in records]


def test_example_to_dict_is_flat_and_complete():
    (ex,) = as_examples([rec(1, "legal", "yesno")], ROLE, PROMPTS, DOMAIN)
    assert ex.to_dict() == {
        "id": "legal-yesno-1",
        "prompt": "legal",
        "system": "You are a lawyer.",
        "instruction": "yesno question 1",
        "input": "context 1",
        "output": "answer 1",
        "domain": "legal",
        "task": "yesno",
        "lang": "en",
        "kind": DOMAIN,
        "source_id": "legal-yesno-1",
    }


def test_role_prompts_text_and_to_dict():
    assert PROMPTS.text(CENTRAL) == "You are a helpful assistant."
    assert PROMPTS.text("legal") == "You are a lawyer."
    with pytest.raises(KeyError):
        PROMPTS.text("chemistry")
    assert PROMPTS.to_dict() == {"central": PROMPTS.central, "roles": PROMPTS.roles}


# ------------------------------------------------------------------------------- a new strategy


@pytest.fixture
def registered():
    """Register test strategies and remove them from STRATEGIES afterwards, whatever happens."""
    names: list[str] = []

    def register(name: str, **kwargs):
        def decorate(build):
            registered_build = register_strategy(name, **kwargs)(build)
            names.append(name)  # only after success: never remove a strategy this test did not add
            return registered_build

        return decorate

    yield register
    for name in names:
        STRATEGIES.pop(name, None)


def test_custom_strategy_registers_builds_and_is_cleaned_up(registered):
    @registered("test_role_plus_general", needs_general=True, inference=(ROLE,))
    def role_plus_general(inputs: CorpusInputs) -> list[Example]:
        """Role prompting plus D_g under p_c, without integration."""
        return as_examples(inputs.general_records, CENTRAL, inputs.prompts, GENERAL) + as_examples(
            inputs.domain_records, ROLE, inputs.prompts, DOMAIN
        )

    spec = get_strategy("test_role_plus_general")
    assert spec.build is role_plus_general
    assert spec.description == "Role prompting plus D_g under p_c, without integration."
    assert spec.inference == (ROLE,) and spec.needs_general
    examples = build_examples("test_role_plus_general", inputs())
    assert Counter(e.kind for e in examples) == {GENERAL: N_GENERAL, DOMAIN: N_DOMAIN}
    with pytest.raises(ConfigError, match="needs self-distilled general data"):
        build_examples("test_role_plus_general", inputs(general_records=None))


def test_registering_a_taken_name_is_refused(registered):
    with pytest.raises(ValueError, match="'rega' is already registered"):
        register_strategy("rega")(lambda inputs: [])
    assert STRATEGIES["rega"].build.__name__ == "rega"


def test_custom_strategies_do_not_leak_between_tests():
    assert not any(name.startswith("test_") for name in STRATEGIES)


# --------------------------------------------------------------------------------------------- related work


def test_ft_replay_replays_human_written_general_data_under_pc():
    general = general_records(4)
    domain = domain_records({("medical", "qa"): 3})
    examples = build_examples("ft_replay", CorpusInputs(domain, general, PROMPTS))
    assert Counter(e.kind for e in examples) == {GENERAL: 4, DOMAIN: 3}
    assert {e.prompt for e in examples} == {CENTRAL}
    assert [e.output for e in examples[:4]] == [g.output for g in general]
    distilled = [Record(**{**g.to_dict(), "meta": {"distill": {"model": "m"}}}) for g in general]
    with pytest.raises(ConfigError, match="self-distilled"):
        build_examples("ft_replay", CorpusInputs(domain, distilled, PROMPTS))
    with pytest.raises(ConfigError, match="D_g"):
        build_examples("ft_replay", CorpusInputs(domain, None, PROMPTS))


def test_sdft_trains_on_rewritten_domain_data_only():
    domain = domain_records({("medical", "qa"): 3, ("legal", "yesno"): 2})
    with pytest.raises(ConfigError, match="rewrite"):
        build_examples("sdft", CorpusInputs(domain, None, PROMPTS))
    rewritten = [Record(**{**r.to_dict(), "output": f"In my words: {r.output}", "meta": {"rewrite": {"kept": "rewrite"}}})
                 for r in domain]  # fmt: skip
    examples = build_examples("sdft", CorpusInputs(rewritten, None, PROMPTS))
    assert (
        len(examples) == 5
        and {e.prompt for e in examples} == {CENTRAL}
        and {e.kind for e in examples} == {DOMAIN}
    )
    assert examples[0].output.startswith("In my words") and get_strategy("sdft").inference == (CENTRAL,)
