"""What one evaluation measures and how: :class:`EvalSettings`, shared by the training callback
(:class:`rega.callbacks.EvaluationCallback`) and ``rega evaluate`` (:func:`rega.eval.runner.evaluate_command`).

Both take its fields as their own keyword arguments (``**settings``), so YAML configs keep them at the top level and
``--help`` lists each with its description from here; each builds one :class:`EvalSettings` and passes it whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rega.config import DataSource
from rega.errors import ConfigError

LOGLIK_NORMS = ("mean", "sum")
CLOSED_SCORING = ("generate", "loglik")


@dataclass
class EvalSettings:
    """What to evaluate and how.

    Args:
        tasks: domain evaluation sources (test or dev sets), e.g. ``{path: "shared:pubmedqa/dev.jsonl"}``; each
            names its domain or its rows do.
        domains: evaluate only the tasks of these domains (a single-domain adapter on its own domain); ``None``:
            every task.
        limit_per_task: keep the first N records of each (domain, task); ``None`` keeps all.
        max_new_tokens: generation cap for free-form answers (greedy decoding).
        closed_max_new_tokens: generation cap for closed tasks (labels, letters); ``None`` uses ``max_new_tokens``.
        batch_size: sequences per generation / scoring batch.
        loglik_choices: also score closed tasks by the log-likelihood of each option (``ll_acc``).
        loglik_norm: ``mean`` or ``sum`` of the option's token log-probabilities for ``ll_acc``.
        closed_scoring: ``generate`` (closed tasks scored by the greedy answer, the paper's metric) or ``loglik``
            (by the options' log-likelihood only, ``ll_acc``; nothing generated, about one prefill per question).
        max_batch_tokens: cap on a batch's padded tokens (rows times longest prompt): short prompts then go in
            batches of up to ``batch_size`` rows, long ones in fewer; ``None``: ``batch_size`` rows always.
        general_mc: general multiple-choice sets: built-in names (arc_easy, arc_challenge, piqa, boolq, hellaswag,
            winogrande, truthfulqa_mc1, commonsense_qa, openbookqa, ceval, cmmlu), JSONL paths (``name=PATH``,
            ``name:letters=PATH``) or ``lm_eval:<task>``; ``None`` picks two by the tasks' language (English:
            arc_easy, piqa; Chinese: ceval, cmmlu); ``[]`` skips them.
        general_mc_limit: first N items of each general multiple-choice set; ``None`` for all.
        general_mc_backend: ``auto``, ``lm_eval`` (lm-evaluation-harness) or ``native``
            (see rega.eval.general.retention).
        drift: sources of reference responses whose log-likelihood under the model measures drift from the base
            model: held-out self-distilled base-model answers and general reference answers (records with output).
        drift_limit: first N records of each drift source; ``None`` for all.
        drift_max_length: token cap per drift example (responses are cut at their end).
        general_gen: held-out general instructions with human reference answers (e.g.
            ``{path: "shared:general_eval_en_dev/dev.jsonl", require_output: false}``) whose greedy answers under
            p_c are scored against the reference and the base model's own answer: unigram F1, ROUGE-L, length
            ratio and degenerate answers (see rega.eval.general.generative); ``[]`` skips it.
        general_gen_limit: first N records of each general_gen source; ``None`` for all.
        general_gen_max_new_tokens: generation cap of the general_gen answers (greedy decoding).
        share_prefix: a batch's prompts share their first tokens (the system prompt and the chat template's
            opening): prefill them once and repeat their KV cache for every row (greedy answers and closed
            questions, native general multiple choice; see rega.modules.generation.prefill_rows). Off: every row
            prefills whole.
        sample_rows: answers per (rule, task) kept in ``samples`` (and the TensorBoard table).
        skip_invalid: skip invalid task, drift and general_gen rows, counted in eval.json
            (``meta.skipped_invalid``) and the summary; off: the first one stops the evaluation, naming its file,
            line and field (as training does).
    """

    tasks: list[DataSource] = field(default_factory=list)
    domains: list[str] | None = None
    limit_per_task: int | None = None
    max_new_tokens: int = 128
    closed_max_new_tokens: int | None = 32
    batch_size: int = 8
    loglik_choices: bool = False
    loglik_norm: str = "mean"
    closed_scoring: str = "generate"
    max_batch_tokens: int | None = None
    general_mc: list[str] | None = None
    general_mc_limit: int | None = 100
    general_mc_backend: str = "auto"
    drift: list[DataSource] = field(default_factory=list)
    drift_limit: int | None = 100
    drift_max_length: int = 1024
    general_gen: list[DataSource] = field(default_factory=list)
    general_gen_limit: int | None = 40
    general_gen_max_new_tokens: int = 160
    share_prefix: bool = True
    sample_rows: int = 3
    skip_invalid: bool = False

    def __post_init__(self) -> None:
        self.tasks, self.drift = list(self.tasks or []), list(self.drift or [])
        self.general_gen = list(self.general_gen or [])
        if self.domains is not None:
            self.domains = list(self.domains)
        if self.general_mc is not None:
            self.general_mc = list(self.general_mc)
        if self.closed_scoring not in CLOSED_SCORING:  # before any model loads
            raise ConfigError(
                f"closed_scoring must be {' or '.join(CLOSED_SCORING)}, got {self.closed_scoring!r}"
            )
        if self.loglik_norm not in LOGLIK_NORMS:
            raise ConfigError(f"loglik_norm must be mean or sum, got {self.loglik_norm!r}")

    @property
    def scores_options(self) -> bool:
        """Whether closed tasks get ``ll_acc`` (the options' log-likelihood)."""
        return self.loglik_choices or self.closed_scoring == "loglik"

    @property
    def generates_closed(self) -> bool:
        """Whether closed tasks get a greedy answer (``acc``)."""
        return self.closed_scoring == "generate"

    def answer_cap(self, closed: bool) -> int:
        """The generation cap of a closed or a free-form answer."""
        return self.closed_max_new_tokens if closed and self.closed_max_new_tokens else self.max_new_tokens
