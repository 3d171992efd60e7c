"""What the training code needs to know of its data, handed over once.

:class:`REGADataModule` describes its data as a :class:`TrainingData`; ``REGAModule.setup`` and
``EvaluationCallback.setup`` take it with :func:`training_data` (Lightning sets the data module up before
either), so nothing else reaches into ``trainer.datamodule``. A fit on plain data loaders gets an empty one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rega.data.prompts import RolePrompts


@dataclass(frozen=True)
class TrainingData:
    """A fit's data, as the module, the loss terms and the evaluation callback need it.

    Args:
        domains: the domain names; a token's ``token_domain`` id indexes them (validation loss per domain,
            loss terms restricted to domains).
        strategy: the corpus strategy (its inference prompt rules decide how evaluation prompts).
        prompts: the role prompts p_c and p_i.
        batch_size: rows per optimizer step.
        corpus_counts: the corpus' examples by kind (domain, general, integrated), from its manifest.
        tokenized: the tokenized corpus' counts (examples, tokens, truncated, dropped), from its manifest.
        mix_ratio: r as the corpus manifest records it, for a strategy that integrates (D'_i); else None.
        corpus_seed: the seed of the corpus draw, from its manifest.
    """

    domains: tuple[str, ...] = ()
    strategy: str | None = None
    prompts: RolePrompts | None = None
    batch_size: int | None = None
    corpus_counts: dict | None = None
    tokenized: dict | None = field(default=None)
    mix_ratio: float | None = None
    corpus_seed: int | None = None


def training_data(trainer) -> TrainingData:
    """The trainer's data module's :class:`TrainingData`; an empty one without a data module that has one."""
    describe = getattr(getattr(trainer, "datamodule", None), "training_data", None)
    return describe() if describe is not None else TrainingData()
