"""LightningCLI for fit / validate with the REGA model and data module.

Evaluation during training has its own config key, ``evaluation`` (fields of
:class:`rega.callbacks.EvaluationCallback`, inline or as a file: ``evaluation: ../eval/callback/cpu_en.yaml``;
``null`` switches it off), appended to whatever ``trainer.callbacks`` lists: a config that adds it never re-lists
the checkpoint callbacks.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI

from rega.callbacks import EvaluationCallback
from rega.callbacks.evaluation import is_sharding
from rega.callbacks.preemption import PreemptionCallback, resume_requeued, without_slurm_requeue
from rega.config import DEFAULT_SEED
from rega.datamodules import REGADataModule
from rega.distill.role_prompts import ensure_role_prompts
from rega.distill.runner import ensure_distilled
from rega.errors import ConfigError
from rega.modules.checkpoint_io import AtomicCheckpointIO
from rega.modules.lit_module import REGAModule
from rega.modules.precision import frozen_half_precision
from rega.modules.resume import CHOICES, RecordDataSettings, asked_settings, data_settings, settings_to_take


def shards_weights(strategy) -> bool:
    """Whether a trainer.strategy config value (a registered name or a class_path spec) shards the weights."""
    from lightning.pytorch.strategies import StrategyRegistry

    if isinstance(strategy, str):
        return strategy in StrategyRegistry and is_sharding(StrategyRegistry.get(strategy))
    class_path = strategy.get("class_path") if hasattr(strategy, "get") else None
    if not class_path:
        return is_sharding(strategy)
    module, _, name = class_path.rpartition(".")
    return is_sharding(getattr(importlib.import_module(module), name))


# Checkpoints written beside their target (rega.modules.checkpoint_io); a class path, so saved configs hold it.
# Lightning's model summary is one row (the peft model) and a FLOPs column of zeros: REGAModule logs the
# trainable and total parameters instead.
TRAINER_DEFAULTS = {
    "plugins": [{"class_path": f"{AtomicCheckpointIO.__module__}.{AtomicCheckpointIO.__name__}"}],
    "enable_model_summary": False,
}
# What every parse of a fit's configuration shares (run_lightning_cli, resolve_fit_config).
CLI_SETTINGS = dict(
    save_config_kwargs={"overwrite": True},
    trainer_defaults=TRAINER_DEFAULTS,
    parser_kwargs={"default_env": False},
)


class REGACLI(LightningCLI):
    def __init__(self, *args, seed_everything_default: int = DEFAULT_SEED, **kwargs) -> None:
        # Lightning's default (True: draw a seed) would leave the run's masks and order unrecorded (fit_seed).
        super().__init__(*args, seed_everything_default=seed_everything_default, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        # One model config drives both the network and the chat rendering of the data.
        parser.link_arguments("model.model", "data.model")
        # One seed per fit: the LoRA init (Lightning seeds with it), the dropout masks, the batch order and, unless
        # data.corpus.seed pins it, the corpus draw. Saved configs keep seed_everything only.
        for target in ("model.seed", "data.seed"):
            parser.link_arguments("seed_everything", target, compute_fn=fit_seed)
        # Subclass mode makes the key optional (None: no callback); a plain dict of its fields is accepted too.
        parser.add_lightning_class_args(EvaluationCallback, "evaluation", subclass_mode=True, required=False)
        parser.add_argument(
            "--resume_settings", choices=CHOICES, default="check",
            help="with --ckpt_path: 'check' stops when the model, LoRA or data settings differ from the "
            "checkpoint's (one line per field); 'checkpoint' takes the checkpoint's settings",
        )  # fmt: skip

    def _parse_ckpt_path(self) -> None:
        # Lightning would load the checkpoint's model settings over the parsed ones, silently (rega.modules.resume).
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else None
        if config is None or not config.get("ckpt_path"):
            return
        taken = settings_to_take(str(config.ckpt_path), asked_settings(config), config.resume_settings)
        if taken:
            self.config = self.parser.parse_object({subcommand: through_seed_link(taken)}, self.config)

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # A requeued SLURM job resumes from its own preemption checkpoint (rega.callbacks.preemption).
        if self.config.get("subcommand") == "fit":
            resume_requeued(self.config.fit)

    def _instantiate_trainer(self, config: dict, callbacks: list) -> Trainer:
        # LightningCLI passes every callback key's value, an unset `evaluation` (None) included.
        callbacks = [c for c in callbacks if c is not None]
        if self.subcommand == "fit":
            # So that a resume can compare the data settings too.
            callbacks.append(RecordDataSettings(data_settings(self.config.fit.data.as_dict())))
            # Signals save at the next step boundary (rega.callbacks.preemption); first, to leave before other hooks.
            listed = config.get("callbacks") or []
            config["callbacks"] = [PreemptionCallback(), *(listed if isinstance(listed, list) else [listed])]
        config["plugins"] = without_slurm_requeue(config.get("plugins"))  # Lightning's handler saves mid-step
        config = frozen_half_precision(config)  # bf16-true keeps the LoRA weights and their states in fp32
        return super()._instantiate_trainer(config, callbacks)

    def before_instantiate_classes(self) -> None:
        # REGAModule steps its optimizer itself (micro-batches): Lightning's own options for this would fail later
        # with advice that does not apply here.
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        if (
            config.get("evaluation") is not None
            and self.subcommand == "fit"
            and shards_weights(trainer.strategy)
        ):
            # The callback would refuse in setup, after the model loaded; say it here, with the way out.
            raise ConfigError(
                "evaluation during training does not run under a sharded strategy (FSDP, DeepSpeed): add "
                "`--evaluation null` (or --config configs/trainer/no_evaluation.yaml after the experiment) and "
                "evaluate the saved adapter with `python cli.py evaluate --adapter DIR`"
            )
        if (trainer.accumulate_grad_batches or 1) != 1:
            raise ConfigError(
                f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches}: not used by REGAModule; set "
                "data.batch_size to the batch per optimizer step and model.micro_batch_size to the rows per "
                "forward/backward pass"
            )
        if trainer.gradient_clip_val:
            raise ConfigError(
                f"trainer.gradient_clip_val={trainer.gradient_clip_val}: not used by REGAModule; set "
                f"model.max_grad_norm instead"
            )

    def before_fit(self) -> None:
        writing = self.datamodule.pending_role_prompts
        if writing is not None:  # the prompts file the corpus reads, before prepare_data builds it
            corpus = self.datamodule.corpus_config
            ensure_role_prompts(corpus, writing, here=starts_the_fit(self.trainer))
        distill = self.datamodule.pending_distillation
        if distill is not None:
            ensure_distilled(distill, processes=self.trainer.num_devices * self.trainer.num_nodes)

    def before_validate(self) -> None:
        self.before_fit()  # the same corpus: its written role prompts and its D_g first, as a fit does

    def after_fit(self) -> None:
        summary = getattr(self.model, "summary", None)  # set by the fit on rank 0
        if self.trainer.is_global_zero and summary is not None:
            print("\n".join(summary_lines(summary)))


def starts_the_fit(trainer: Trainer) -> bool:
    """Whether this process runs before every other process of the fit exists: it is the only one, or the one node's
    process that starts the others in ``trainer.fit`` (by running the script again, or spawning: a fork must not
    find CUDA in use). Processes that a launcher started (torchrun, SLURM) run side by side."""
    if trainer.num_devices * trainer.num_nodes == 1:
        return True
    environment = getattr(trainer.strategy, "cluster_environment", None)
    launcher = getattr(trainer.strategy, "launcher", None)
    if trainer.num_nodes > 1 or environment is None or launcher is None:
        return False
    return not environment.creates_processes_externally and not launcher.is_interactive_compatible


def fit_seed(value) -> int:
    """``seed_everything`` as the seed of the module and the data: an integer (true/false, Lightning's "draw one at
    random" and "do not seed", would leave the run's masks and order unrecorded)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"seed_everything must be an integer (it seeds the whole fit), got {value!r}")
    return value


def through_seed_link(settings: dict) -> dict:
    """A checkpoint's settings to parse over a config: its seeds through ``seed_everything``, which they are linked
    from (a checkpoint of an older release may record two; the module's wins)."""
    settings = {key: dict(value) for key, value in settings.items()}
    seeds = [section.pop("seed", None) for section in (settings.get("model", {}), settings.get("data", {}))]
    seed = next((s for s in seeds if s is not None), None)
    return {**settings, "seed_everything": seed} if seed is not None else settings


def summary_lines(summary: dict) -> list[str]:
    """What a finished fit prints: its strategy, data, steps, losses and where its outputs are."""
    metrics = summary.get("metrics", {})
    return [
        "",
        f"REGA run finished: strategy={summary['strategy']} model={summary['model']}",
        f"  corpus: {summary.get('corpus')}",
        f"  tokens: {summary.get('tokenized')}",
        f"  {summary['optimizer_steps']} optimizer steps in {summary['seconds']} s"
        # A metric the run did not log (no validation set) is left out, not shown as nan.
        + "".join(
            f"; {k}={metrics[k]:.4f}" for k in ("train/loss", "val/loss") if metrics.get(k) is not None
        ),
        f"  adapter: {summary['adapter']}",
        f"  TensorBoard: tensorboard --logdir {Path(summary['log_dir']).parent}",
    ]


class _ParseOnly(REGACLI):
    """Parses a fit's configuration as ``fit`` does and stops there: nothing is instantiated, nothing seeded."""

    def _set_seed(self) -> None:  # Lightning's: it would seed this process's generators
        pass

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass

    def after_instantiate_classes(self) -> None:
        pass


def resolve_fit_config(config_files: list[str], overrides: list[str] = ()) -> dict:
    """The fit configuration that ``fit --config F ... OVERRIDES`` would run, every default and file reference
    filled in, as plain values (``model``, ``data``, ``trainer``, ...): what SDFT's rewrite, the merge and the plan
    read, in this process."""
    args = [*(arg for path in config_files for arg in ("--config", str(path))), *overrides]
    with warnings.catch_warnings():  # LightningCLI's note that args were given besides this process's argv
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = _ParseOnly(REGAModule, REGADataModule, run=False, args=args, **CLI_SETTINGS)
    return yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))


def run_lightning_cli(argv: list[str] | None) -> REGACLI:
    # REGAModule steps its optimizer in training_step, so a checkpoint after step k holds the weights after k
    # updates and global_step k: the consistent state to resume from, not the "pre-optimization state" Lightning
    # warns about.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    # REGADataModule resumes a mid-epoch checkpoint at the next unseen batch itself (state_dict/load_state_dict).
    warnings.filterwarnings(
        "ignore", message="You're resuming from a checkpoint that ended before the epoch ended"
    )
    return REGACLI(REGAModule, REGADataModule, args=argv, **CLI_SETTINGS)
