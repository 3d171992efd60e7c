"""Corpus strategies: pure functions from records and prompts to the training corpus (the paper's method).

| strategy  | training corpus                                   | prompt at inference |
|-----------|---------------------------------------------------|---------------------|
| zero_shot | none                                              | p_c                 |
| ft        | ∪ D_i under p_c                                   | p_c                 |
| ftsd      | D_g ∪ (∪ D_i), all under p_c                      | p_c                 |
| ftrp      | ∪ (p_i ⊕ D_i)                                     | p_i                 |
| rega      | (p_c ⊕ D_g) ∪ (p_c ⊕ ∪ D'_i) ∪ (p_i ⊕ ∪ D_i)       | p_c (REGA_c), p_i (REGA_r) |

A new strategy is one function registered with :func:`register_strategy` (see the README for a worked example).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction

from rega.config import DEFAULT_MIX_RATIO, DEFAULT_SEED
from rega.data.prompts import CENTRAL, RolePrompts
from rega.data.records import GENERAL, Record
from rega.errors import ConfigError

log = logging.getLogger(__name__)
# Example kinds: where a training example comes from; D_g examples are of kind GENERAL, their records' domain.
DOMAIN, INTEGRATED = "domain", "integrated"
ROLE = "role"  # inference rule: answer each input under its own domain's role prompt


@dataclass(frozen=True, slots=True)
class Example:
    """One training example with its provenance: which prompt it carries and where it came from."""

    id: str
    prompt: str  # "central" or the domain whose role prompt it carries
    system: str  # the prompt text
    instruction: str
    input: str
    output: str
    domain: str
    task: str
    lang: str
    kind: str  # "domain" (D_i), "general" (D_g) or "integrated" (D'_i)
    source_id: str
    # A conversation is one example: its earlier (user, assistant) exchanges, every answer trained on.
    history: tuple[tuple[str, str], ...] = ()
    dropped_system: str = ""  # the conversation's own system message, replaced by ``system``

    @property
    def user_text(self) -> str:
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction

    def to_dict(self) -> dict:
        # A plain mapping of the string fields, without asdict's deep copies (half the corpus write time); the
        # conversation fields only where set, so single-turn corpus files stay as they were.
        row = {name: getattr(self, name) for name in _STRING_FIELDS}
        if self.history:
            row["history"] = [list(pair) for pair in self.history]
        if self.dropped_system:
            row["dropped_system"] = self.dropped_system
        return row

    @classmethod
    def from_dict(cls, row: dict) -> Example:
        """The inverse of :meth:`to_dict` (a corpus file's line)."""
        history = tuple(tuple(pair) for pair in row.get("history") or ())
        return cls(**{**row, "history": history})


_STRING_FIELDS = tuple(name for name in Example.__slots__ if name not in ("history", "dropped_system"))


@dataclass(frozen=True)
class CorpusInputs:
    domain_records: list[Record]  # ∪ D_i
    general_records: list[Record] | None  # D_g (self-distilled), if any
    prompts: RolePrompts
    mix_ratio: float = DEFAULT_MIX_RATIO  # in [0, 1]: checked where the config is read (corpus.check_config)
    seed: int = DEFAULT_SEED


@dataclass(frozen=True)
class Strategy:
    name: str
    build: Callable[[CorpusInputs], list[Example]]
    needs_general: bool
    inference: tuple[str, ...]  # prompt rules at inference, first is the headline: "central" and/or "role"
    description: str
    integrates: bool = False  # adds D'_i (role integration): the corpus summary shows |D'_i| per task


STRATEGIES: dict[str, Strategy] = {}


def register_strategy(
    name: str,
    *,
    needs_general: bool = False,
    inference: tuple[str, ...] = (CENTRAL,),
    description: str = "",
    integrates: bool = False,
) -> Callable[[Callable[[CorpusInputs], list[Example]]], Callable[[CorpusInputs], list[Example]]]:
    """Register ``build(inputs) -> examples`` under ``name``."""

    def decorate(build: Callable[[CorpusInputs], list[Example]]) -> Callable[[CorpusInputs], list[Example]]:
        if name in STRATEGIES:
            raise ValueError(f"strategy {name!r} is already registered")
        text = description or (build.__doc__ or "").strip()
        STRATEGIES[name] = Strategy(name, build, needs_general, inference, text, integrates)
        return build

    return decorate


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ConfigError(f"unknown strategy {name!r}; registered: {', '.join(sorted(STRATEGIES))}") from None


def as_examples(records: Iterable[Record], prompt: str, prompts: RolePrompts, kind: str) -> list[Example]:
    """Tag records with a prompt: ``central`` for p_c, ``role`` for each record's own domain prompt p_i."""
    out = []
    for rec in records:
        key = rec.domain if prompt == ROLE else CENTRAL
        out.append(
            Example(
                id=rec.id if kind != INTEGRATED else f"{rec.id}#integrated",
                prompt=key,
                system=prompts.text(key),
                instruction=rec.instruction,
                input=rec.input,
                output=rec.output,
                domain=rec.domain,
                task=rec.task,
                lang=rec.lang,
                kind=kind,
                source_id=rec.id,
                history=rec.history,
                dropped_system=rec.system or "",
            )
        )
    return out


def integration_size(ratio: float, n: int) -> int:
    """|D'_i| of a task of n records: round(r·n) with halves rounded up, on the decimal r as written
    (0.29·50 = 14.5 -> 15, not float's 14.499…). So a task gets none when r·n < 0.5, e.g. r = 0.1 and n <= 4."""
    return math.floor(Fraction(repr(ratio)) * n + Fraction(1, 2))


def task_groups(records: list[Record]) -> dict[tuple[str, str], list[Record]]:
    """Records per (domain, task), in first-seen order."""
    groups: dict[tuple[str, str], list[Record]] = {}
    for rec in records:
        groups.setdefault((rec.domain, rec.task), []).append(rec)
    return groups


def sample_integration(records: list[Record], ratio: float, seed: int) -> list[Record]:
    """D'_i: round(r·n) records drawn from each (domain, task) so every task keeps its share; input order kept.

    Each task draws from its own generator seeded by (seed, domain, task), so adding a task does not change what
    the others draw. A task that gets no record although r > 0 is warned about by name.
    """
    chosen: set[str] = set()
    for (domain, task), group in task_groups(records).items():
        k = integration_size(ratio, len(group))
        if k == 0 and ratio > 0:
            log.warning(
                "role integration: task %s/%s gets no D'_i sample (r·|D_i| = %g·%d < 0.5 rounds to 0)",
                domain, task, ratio, len(group),
            )  # fmt: skip
        rng = random.Random(f"{seed}/{domain}/{task}")
        chosen.update(group[i].id for i in rng.sample(range(len(group)), k))
    return [rec for rec in records if rec.id in chosen]


def _require_general(inputs: CorpusInputs, name: str) -> list[Record]:
    if inputs.general_records is None:
        raise ConfigError(
            f"strategy {name!r} needs self-distilled general data D_g: set 'general' or 'distill'"
        )
    if not inputs.general_records:
        raise ConfigError(
            f"strategy {name!r} needs self-distilled general data D_g, but the 'general' sources hold no records"
        )
    return inputs.general_records


@register_strategy("zero_shot", description="no training: the base model answered under p_c")
def zero_shot(inputs: CorpusInputs) -> list[Example]:
    return []


@register_strategy("ft", description="standard fine-tuning: ∪ D_i under p_c")
def ft(inputs: CorpusInputs) -> list[Example]:
    return as_examples(inputs.domain_records, CENTRAL, inputs.prompts, DOMAIN)


@register_strategy(
    "ftsd", needs_general=True, description="FT with self-distillation: D_g ∪ (∪ D_i) under p_c"
)
def ftsd(inputs: CorpusInputs) -> list[Example]:
    general = _require_general(inputs, "ftsd")
    return as_examples(general, CENTRAL, inputs.prompts, GENERAL) + as_examples(
        inputs.domain_records, CENTRAL, inputs.prompts, DOMAIN
    )


@register_strategy("ftrp", inference=(ROLE,), description="FT with role prompting: ∪ (p_i ⊕ D_i)")
def ftrp(inputs: CorpusInputs) -> list[Example]:
    return as_examples(inputs.domain_records, ROLE, inputs.prompts, DOMAIN)


@register_strategy(
    "rega",
    needs_general=True,
    inference=(CENTRAL, ROLE),
    description="REGA: (p_c ⊕ D_g) ∪ (p_c ⊕ ∪ D'_i) ∪ (p_i ⊕ ∪ D_i)",
    integrates=True,
)
def rega(inputs: CorpusInputs) -> list[Example]:
    general = _require_general(inputs, "rega")
    integrated = sample_integration(inputs.domain_records, inputs.mix_ratio, inputs.seed)
    return (
        as_examples(general, CENTRAL, inputs.prompts, GENERAL)
        + as_examples(integrated, CENTRAL, inputs.prompts, INTEGRATED)
        + as_examples(inputs.domain_records, ROLE, inputs.prompts, DOMAIN)
    )


def build_examples(strategy: str, inputs: CorpusInputs) -> list[Example]:
    """Validate the configuration against the strategy, then build its corpus."""
    spec = get_strategy(strategy)
    if spec.needs_general:
        _require_general(inputs, strategy)
    return spec.build(inputs)


# --------------------------------------------------------------------------------------------- related work
# Baselines from the families of remedies the paper's related work names (replay, regularisation: the loss
# term ``kl_to_base`` in rega.modules.losses; self-distillation of the domain data; architecture: one LoRA per
# domain merged, rega.experiments.merge). Each has a line in configs/grid/cpu_en_evidence.yaml.


def _meta_key(record: Record, key: str) -> bool:
    return bool((record.meta or {}).get(key))


@register_strategy(
    "ft_replay",
    needs_general=True,
    description="FT with replay of human-written general data (MixReview-style): D_h ∪ (∪ D_i), all under p_c",
)
def ft_replay(inputs: CorpusInputs) -> list[Example]:
    """FTSD with the general pool's own reference answers instead of the base model's: the control that isolates
    what self-distillation adds over replaying general data."""
    general = _require_general(inputs, "ft_replay")
    distilled = [r.id for r in general if _meta_key(r, "distill")]
    if distilled:
        raise ConfigError(
            f"strategy 'ft_replay' replays human-written general answers, but {len(distilled)} of the general "
            f"records are self-distilled (e.g. {distilled[0]!r}): set data.corpus.general to the instruction "
            "pool itself (configs/experiment/cpu_en_baseline_replay.yaml)"
        )
    return as_examples(general, CENTRAL, inputs.prompts, GENERAL) + as_examples(
        inputs.domain_records, CENTRAL, inputs.prompts, DOMAIN
    )


@register_strategy(
    "sdft",
    description="SDFT (Yang et al., 2024): ∪ D_i with each response rewritten by the base model, under p_c",
)
def sdft(inputs: CorpusInputs) -> list[Example]:
    """FT on the domain data as the base model rewrote it given the reference answers
    (:mod:`rega.distill.rewrite`); the records must come from its ``rewritten.jsonl``."""
    plain = [r.id for r in inputs.domain_records if not _meta_key(r, "rewrite")]
    if plain:
        raise ConfigError(
            f"strategy 'sdft' trains on rewritten domain data, but {len(plain)} domain records were not rewritten "
            f"(e.g. {plain[0]!r}): run `python cli.py rewrite` and set data.corpus.domains to its "
            "rewritten.jsonl (a grid run with `rewrite:` does both)"
        )
    return as_examples(inputs.domain_records, CENTRAL, inputs.prompts, DOMAIN)
