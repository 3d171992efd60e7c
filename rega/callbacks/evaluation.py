"""Evaluate during training: domain tasks, general multiple choice and drift after chosen epochs and at the end, and
optionally LLM-judged benchmarks (MT-Bench, the judged general sets).

The callback only schedules and logs; the work is :func:`rega.eval.pipeline.evaluate_model`, which ``rega evaluate``
also calls, and :func:`rega.eval.judged.benchmarks.run_judge_benchmarks`. It reads the model from the
LightningModule (``.model``: the peft-wrapped causal LM, ``.tokenizer``, ``.chat``) and the prompts from the
DataModule (``.prompts``: RolePrompts, ``.strategy``: strategy name whose inference rules apply).

Files (rank 0), under ``output_dir`` (default ``<trainer.log_dir>/eval``):

* ``eval_epoch{N}.json`` per evaluation after epoch N (1-based), ``eval_step{S}.json`` for an end-of-training
  evaluation that does not fall on an evaluated epoch boundary, and ``eval.json`` = the latest of them;
  each carries ``epoch`` (epochs completed), ``global_step`` and ``tag``;
* ``<tag>/predictions.jsonl`` and ``<tag>/general_mc.jsonl``: per-example answers and option log-likelihoods;
* ``<tag>/<benchmark>/``: a judged benchmark's answers, judgments and ``scores.json`` (with ``judge``);
* ``base.json``: general MC, drift and general_gen answers of the base model (adapters disabled), measured once
  when ``compare_base``; every evaluation then reports ``base`` and ``delta`` next to them and scores its general
  answers against the base model's (``f1_base``, ``rougeL_base``, ``length_ratio``).

Logging: every scalar of :func:`rega.eval.summary.scalars` (``eval/<rule>/overall``,
``eval/<rule>/<domain>/<task>/acc``, ``eval/general_mc/<name>``, ``eval/drift/<name>/logprob_per_token``,
``eval/general_gen/<name>/{f1_ref,rougeL_ref,f1_base,rougeL_base,length,length_ratio,degenerate}``, a judged
benchmark's mean ``eval/mt_bench/score`` ...) goes to every logger through ``logger.log_metrics(...,
step=global_step)`` — the same path at epoch end and at the end of training, where ``LightningModule.log`` is not
allowed — and a markdown table of sample answers goes to TensorBoard as text (``eval/samples``). The scalars also go
into ``trainer.callback_metrics`` on every rank, so ``ModelCheckpoint(monitor="eval/central/overall", mode="max")``
can keep the best evaluated epoch.

Judged benchmarks (``judge`` with ``judge_config``) run on rank 0 only, after the judge-free scores; the other ranks
wait for their results outside any collective (:mod:`rega.distributed`), so no process group timeout limits how
long a judge may take. The judge's API key is read from the environment variable the judge config names, and
nowhere else: when it is not set, one log line says the judged benchmarks are skipped and why, and training goes on.

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

from rega.data.prompts import CENTRAL
from rega.datamodules import TrainingData, training_data
from rega.distributed import broadcast_from_zero
from rega.errors import ConfigError
from rega.eval.judged.benchmarks import JudgeRequest, judge_problems, run_judge_benchmarks
from rega.eval.judged.client import missing_key
from rega.eval.pipeline import base_reference, evaluate_model
from rega.eval.settings import EvalSettings
from rega.eval.summary import samples_markdown, scalars
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
        after_epochs: list[int] | None = None,
        at_fit_end: bool = True,
        rules: list[str] | None = None,
        compare_base: bool = True,
        output_dir: str | None = None,
        judge: list[str] | None = None,
        judge_config: str | None = None,
        judge_limit: int | None = None,
        judge_max_new_tokens: int | None = None,
        limit_per_task: int | None = 50,
        **settings,
    ):
        """What to evaluate (tasks, general_mc, drift ...): the fields of EvalSettings, listed with these.

        Args:
            after_epochs: 1-based epochs after which to evaluate; ``None`` means ``[2]`` (the paper evaluates the
                checkpoint after epoch 2); ``[]`` evaluates only at the end of training.
            at_fit_end: also evaluate when training ends, unless that step was just evaluated.
            rules: prompt rules (``central``, ``role``); ``None`` uses the strategy's inference rules
                (the data module's strategy), or ``central`` without one.
            compare_base: measure general MC, drift and the general_gen answers of the base model (adapters
                disabled) once, and report each evaluation's difference to it.
            output_dir: where eval files go; ``None`` uses ``<trainer.log_dir>/eval``.
            judge: LLM-judged benchmarks to run too (mt_bench, general_en, general_zh), on rank 0; needs
                ``judge_config``. Their mean scores are logged as ``eval/<benchmark>/score``.
            judge_config: the judge's YAML (``configs/eval/judge_*.yaml``); its API key comes from the
                environment variable it names; when that is not set, the judged benchmarks are skipped.
            judge_limit: first N questions of each judged benchmark.
            judge_max_new_tokens: answer length cap of the judged benchmarks; ``None`` keeps theirs (MT-Bench 1024).
            limit_per_task: first N records of each (domain, task); ``None`` keeps all.
        """
        super().__init__()
        self.settings = EvalSettings(limit_per_task=limit_per_task, **settings)
        if bool(judge) != bool(judge_config):
            raise ConfigError("evaluation: judge (the benchmarks) and judge_config (the judge) go together")
        self.judge = JudgeRequest(judge or [], judge_config, judge_limit, max_new_tokens=judge_max_new_tokens)
        self.after_epochs = [2] if after_epochs is None else list(after_epochs)
        self.at_fit_end = at_fit_end
        self.rules = list(rules) if rules else None
        self.compare_base = compare_base
        self.output_dir = output_dir
        self._dir: Path | None = None
        self._data = None
        self._training = TrainingData()  # the fit's data, taken in setup
        self._base: dict | None = None
        self._judge_client = None
        self._evaluated_steps: set[int] = set()
        self.results: list[dict] = []  # every evaluation of this run, in order

    # ------------------------------------------------------------------------------------------ hooks

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._training = training_data(trainer)  # the data module is set up before the callbacks
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
        if self.judge.benchmarks and trainer.is_global_zero:
            self._judge_client = self._connect_judge()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch in self.after_epochs and not trainer.sanity_checking:
            self.evaluate(trainer, pl_module, tag=f"epoch{epoch}", epoch=epoch)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_fit_end and trainer.global_step not in self._evaluated_steps:
            self.evaluate(trainer, pl_module, tag=f"step{trainer.global_step}", epoch=trainer.current_epoch)

    # ------------------------------------------------------------------------------------------ work

    def _connect_judge(self):
        """The judge's client, or None (one log line) when its API key is not in the environment."""
        from rega.eval.judged.client import JudgeClient, load_judge_config

        judge = load_judge_config(self.judge.config)
        why = missing_key(judge)
        if why:
            log.warning("evaluation: judged benchmarks %s skipped: %s", ", ".join(self.judge.benchmarks), why)
            return None
        return JudgeClient(judge)

    def _rules(self, trainer: L.Trainer) -> list[str]:
        if self.rules:
            return self.rules
        strategy = self._training.strategy
        if not strategy:
            return [CENTRAL]
        from rega.data.strategies import get_strategy

        return list(get_strategy(strategy).inference)

    def _prompts(self, trainer: L.Trainer):
        prompts = self._training.prompts
        if prompts is None:
            raise RuntimeError("EvaluationCallback needs a data module with role prompts (REGADataModule)")
        return prompts

    def _base_reference(self, trainer: L.Trainer, lm, prompts, out_dir: Path) -> dict | None:
        """The base model's general MC and drift, measured once (adapters disabled) when ``compare_base``."""
        if self.compare_base and self._base is None and hasattr(lm[0], "disable_adapter"):
            self._base = base_reference(*lm, prompts, self.settings, self._data.records)
            if trainer.is_global_zero:
                write_json(out_dir / "base.json", self._base)
        return self._base

    def _judged(self, trainer: L.Trainer, lm, system: str, out: Path) -> dict | None:
        """The judged benchmarks' results (rank 0 runs them, every rank receives them); None when skipped."""
        results = None
        if trainer.is_global_zero and self._judge_client is not None:
            client = self._judge_client
            results = run_judge_benchmarks(lm, system, self.judge, client.config, client, out)
            for problem in judge_problems(results, client.config):
                log.warning("evaluation: %s", problem)
        # However long the judge took, the other ranks waited outside the collective's timeout.
        return broadcast_from_zero(results)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str, epoch: int) -> dict:
        """Run one evaluation now (all ranks), write its files and log it (rank 0); returns the result."""
        from rega.eval.domain.scoring import settings_tasks

        lm = (pl_module.model, pl_module.tokenizer, pl_module.chat)
        prompts = self._prompts(trainer)
        out_dir = self._dir or Path(self.output_dir or "eval")
        if self._data is None:
            self._data = settings_tasks(self.settings)
        base = self._base_reference(trainer, lm, prompts, out_dir)
        result = evaluate_model(
            *lm, prompts, self._rules(trainer), self.settings, data=self._data, output_dir=out_dir / tag,
            base_reference=base,
        )  # fmt: skip
        result = {"tag": tag, "epoch": epoch, "global_step": trainer.global_step, **result}
        judged = self._judged(trainer, lm, prompts.central, out_dir / tag) if self.judge.benchmarks else None
        if judged is not None:
            result["judge"] = judged
        self._record(trainer, result, out_dir)
        return result

    def _record(self, trainer: L.Trainer, result: dict, out_dir: Path) -> None:
        self._evaluated_steps.add(trainer.global_step)
        self.results.append(result)
        # On every rank, so that ModelCheckpoint(monitor="eval/central/overall") and summary.json see them.
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in scalars(result).items()})
        if trainer.is_global_zero:
            write_json(out_dir / f"eval_{result['tag']}.json", result)
            write_json(out_dir / "eval.json", result)
            self._log(trainer, result)
        trainer.strategy.barrier("rega-eval")

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
