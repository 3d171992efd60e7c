"""Evaluate during training: domain tasks, general multiple choice and drift after chosen epochs and at the end.

The callback only schedules and logs; the work is :func:`rega.eval.runner.evaluate_model`, which ``rega evaluate``
also calls. It reads the model from the LightningModule (``.model``: the peft-wrapped causal LM, ``.tokenizer``,
``.chat``) and the prompts from the DataModule (``.prompts``: RolePrompts, ``.strategy``: strategy name whose
inference rules apply).

Files (rank 0), under ``output_dir`` (default ``<trainer.log_dir>/eval``):

* ``eval_epoch{N}.json`` per evaluation after epoch N (1-based), ``eval_step{S}.json`` for an end-of-training
  evaluation that does not fall on an evaluated epoch boundary, and ``eval.json`` = the latest of them;
  each carries ``epoch`` (epochs completed), ``global_step`` and ``tag``;
* ``<tag>/predictions.jsonl`` and ``<tag>/general_mc.jsonl``: per-example answers and option log-likelihoods;
* ``base.json``: general MC and drift of the base model (adapters disabled), measured once when
  ``compare_base``; every evaluation then reports ``base`` and ``delta`` next to them.

Logging: every scalar of :func:`rega.eval.runner.scalars` (``eval/<rule>/overall``,
``eval/<rule>/<domain>/<task>/acc``, ``eval/general_mc/<name>``, ``eval/drift/<name>/logprob_per_token`` ...) goes
to every logger through ``logger.log_metrics(..., step=global_step)`` — the same path at epoch end and at the end of
training, where ``LightningModule.log`` is not allowed — and a markdown table of sample answers goes to
TensorBoard as text (``eval/samples``). The scalars also go into ``trainer.callback_metrics`` on every rank, so
``ModelCheckpoint(monitor="eval/central/overall", mode="max")`` can keep the best evaluated epoch.

Distributed training (DDP): every rank runs the evaluation; generation, option scoring and drift are sharded
across ranks and their torchmetrics sums are synced, per-example rows are gathered, lm-eval (single-process
only) is replaced by the native scorer (``general_mc_backend: auto``). Only rank 0 writes files and logs; a
barrier ends the evaluation. The module's forward is called directly (not through the DDP wrapper), so no
gradient sync is involved. Sharded strategies (FSDP/DeepSpeed ZeRO-3) need every rank in every forward pass and
are refused in ``setup``, before training starts: evaluate the saved adapter with ``rega evaluate`` instead.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from rega.config import DataSource
from rega.data.prompts import CENTRAL
from rega.errors import ConfigError
from rega.eval.runner import EvalSettings, base_reference, evaluate_model, samples_markdown, scalars
from rega.io import write_json

log = logging.getLogger(__name__)


def is_sharding(strategy) -> bool:
    """Whether a strategy (an instance or a class) shards the weights (FSDP1/2, DeepSpeed), so no rank can
    generate alone."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    sharded = (FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy)
    return issubclass(strategy, sharded) if isinstance(strategy, type) else isinstance(strategy, sharded)


class EvaluationCallback(Callback):
    """Evaluate the model after chosen epochs and at the end of training (see the module docstring)."""

    def __init__(
        self,
        tasks: list[DataSource] | None = None,
        limit_per_task: int | None = 50,
        max_new_tokens: int = 128,
        closed_max_new_tokens: int | None = 32,
        batch_size: int = 8,
        loglik_choices: bool = False,
        loglik_norm: str = "mean",
        after_epochs: list[int] | None = None,
        at_fit_end: bool = True,
        rules: list[str] | None = None,
        general_mc: list[str] | None = None,
        general_mc_limit: int | None = 100,
        general_mc_backend: str = "auto",
        drift: list[DataSource] | None = None,
        drift_limit: int | None = 100,
        drift_max_length: int = 1024,
        compare_base: bool = True,
        output_dir: str | None = None,
        sample_rows: int = 3,
    ):
        """
        Args:
            tasks: domain evaluation sources (test or dev sets), e.g. ``{path: "shared:pubmedqa/dev.jsonl"}``;
                each names its domain or its rows do.
            limit_per_task: first N records of each (domain, task); ``None`` keeps all.
            max_new_tokens: greedy generation cap for free-form answers.
            closed_max_new_tokens: generation cap for closed tasks (labels, letters); ``None`` uses max_new_tokens.
            batch_size: sequences per generation / scoring batch.
            loglik_choices: also score closed tasks by option log-likelihood (``ll_acc``).
            loglik_norm: ``mean`` or ``sum`` of the option's token log-probabilities for ``ll_acc``.
            after_epochs: 1-based epochs after which to evaluate; ``None`` means ``[2]`` (the paper evaluates the
                checkpoint after epoch 2); ``[]`` evaluates only at the end of training.
            at_fit_end: also evaluate when training ends, unless that step was just evaluated.
            rules: prompt rules (``central``, ``role``); ``None`` uses the strategy's inference rules
                (``trainer.datamodule.strategy``), or ``central`` without one.
            general_mc: general multiple-choice sets (built-in names such as arc_easy, piqa, boolq, hellaswag,
                winogrande, truthfulqa_mc1, ceval, cmmlu; JSONL paths; ``lm_eval:<task>``); ``None`` picks
                arc_easy and piqa (English tasks) or ceval and cmmlu (Chinese); ``[]`` skips them.
            general_mc_limit: first N items of each general multiple-choice set.
            general_mc_backend: ``auto``, ``lm_eval`` or ``native``.
            drift: reference-response sources for drift from the base model (held-out self-distilled answers,
                general reference answers); ``None`` or ``[]`` skips drift.
            drift_limit: first N records of each drift source.
            drift_max_length: token cap per drift example.
            compare_base: measure general MC and drift of the base model (adapters disabled) once, and report
                each evaluation's difference to it.
            output_dir: where eval files go; ``None`` uses ``<trainer.log_dir>/eval``.
            sample_rows: sample answers per (rule, task) in eval.json and the TensorBoard table.
        """
        super().__init__()
        self.settings = EvalSettings.from_arguments(locals())
        self.after_epochs = [2] if after_epochs is None else list(after_epochs)
        self.at_fit_end = at_fit_end
        self.rules = list(rules) if rules else None
        self.compare_base = compare_base
        self.output_dir = output_dir
        self._dir: Path | None = None
        self._data = None
        self._base: dict | None = None
        self._evaluated_steps: set[int] = set()
        self.results: list[dict] = []  # every evaluation of this run, in order

    # ------------------------------------------------------------------------------------------ hooks

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if is_sharding(trainer.strategy):
            # Refused before the first step: generating on sharded weights would fail at the end, run lost.
            raise ConfigError(
                f"EvaluationCallback does not run under {type(trainer.strategy).__name__} (sharded weights): "
                "remove it and evaluate the saved adapter with `python cli.py evaluate --adapter DIR`"
            )
        # trainer.log_dir broadcasts from rank 0, so every rank resolves it here, together.
        root = self.output_dir or str(Path(trainer.log_dir or trainer.default_root_dir) / "eval")
        self._dir = Path(root)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch in self.after_epochs and not trainer.sanity_checking:
            self.evaluate(trainer, pl_module, tag=f"epoch{epoch}", epoch=epoch)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_fit_end and trainer.global_step not in self._evaluated_steps:
            self.evaluate(trainer, pl_module, tag=f"step{trainer.global_step}", epoch=trainer.current_epoch)

    # ------------------------------------------------------------------------------------------ work

    def _rules(self, trainer: L.Trainer) -> list[str]:
        if self.rules:
            return self.rules
        strategy = getattr(trainer.datamodule, "strategy", None) if trainer.datamodule is not None else None
        if not strategy:
            return [CENTRAL]
        from rega.data.strategies import get_strategy

        return list(get_strategy(strategy).inference)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str, epoch: int) -> dict:
        """Run one evaluation now (all ranks), write its files and log it (rank 0); returns the result."""
        from rega.eval.domain import load_task_records

        model, tokenizer, chat = pl_module.model, pl_module.tokenizer, pl_module.chat
        prompts = getattr(trainer.datamodule, "prompts", None)
        if prompts is None:
            raise RuntimeError(
                "EvaluationCallback needs trainer.datamodule.prompts (RolePrompts, set in setup)"
            )
        out_dir = self._dir or Path(self.output_dir or "eval")
        if self._data is None:
            self._data = load_task_records(self.settings.tasks, self.settings.limit_per_task)
        if self.compare_base and self._base is None and hasattr(model, "disable_adapter"):
            self._base = base_reference(model, tokenizer, chat, prompts, self.settings, self._data.records)
            if trainer.is_global_zero:
                write_json(out_dir / "base.json", self._base)
        result = evaluate_model(
            model,
            tokenizer,
            chat,
            prompts,
            self._rules(trainer),
            self.settings,
            data=self._data,
            output_dir=out_dir / tag,
            base_reference=self._base,
        )
        result = {"tag": tag, "epoch": epoch, "global_step": trainer.global_step, **result}
        self._evaluated_steps.add(trainer.global_step)
        self.results.append(result)
        # On every rank, so that ModelCheckpoint(monitor="eval/central/overall") and summary.json see them.
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in scalars(result).items()})
        if trainer.is_global_zero:
            write_json(out_dir / f"eval_{tag}.json", result)
            write_json(out_dir / "eval.json", result)
            self._log(trainer, result)
        trainer.strategy.barrier("rega-eval")
        return result

    def _log(self, trainer: L.Trainer, result: dict) -> None:
        values = scalars(result)
        table = samples_markdown(result)
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                experiment.add_text("eval/samples", table, global_step=trainer.global_step)
            logger.save()
        overall = {k: v for k, v in values.items() if k.endswith("/overall")}
        log.info("evaluation %s (step %d): %s", result["tag"], trainer.global_step, overall)
