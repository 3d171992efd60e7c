"""LightningCLI for fit / validate / test / predict with the REGA model and data module."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from rega.data.prompts import ConfigError
from rega.datamodules import REGADataModule
from rega.distill.runner import ensure_distilled
from rega.modules.checkpoint_io import AtomicCheckpointIO
from rega.modules.lit_module import REGAModule


class REGACLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # One model config drives both the network and the chat rendering of the data.
        parser.link_arguments("model.model", "data.model")

    def before_instantiate_classes(self) -> None:
        # REGAModule steps its optimizer itself (micro-batches): Lightning's own options for this would fail later
        # with advice that does not apply here.
        trainer = self.config[self.subcommand].trainer if self.subcommand else self.config.trainer
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
        distill = self.datamodule.pending_distillation
        if distill is not None:
            ensure_distilled(distill, processes=self.trainer.num_devices * self.trainer.num_nodes)

    def after_fit(self) -> None:
        path = Path(self.trainer.log_dir or ".") / "summary.json"  # log_dir is a collective: every rank asks
        if not self.trainer.is_global_zero:
            return
        if not path.exists():
            return
        summary = json.loads(path.read_text())
        metrics = summary.get("metrics", {})
        lines = [
            "",
            f"REGA run finished: strategy={summary['strategy']} model={summary['model']}",
            f"  corpus: {summary.get('corpus')}",
            f"  tokens: {summary.get('tokenized')}",
            f"  {summary['optimizer_steps']} optimizer steps in {summary['seconds']} s;"
            f" train/loss={metrics.get('train/loss', float('nan')):.4f}"
            f" val/loss={metrics.get('val/loss', float('nan')):.4f}",
            f"  adapter: {summary['adapter']}",
            f"  TensorBoard: tensorboard --logdir {Path(summary['log_dir']).parent}",
        ]
        print("\n".join(lines))


def run_lightning_cli(argv: list[str] | None) -> REGACLI:
    # REGAModule steps its optimizer in training_step, so a checkpoint after step k holds the weights after k
    # updates and global_step k: the consistent state to resume from, not the "pre-optimization state" Lightning
    # warns about.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    # REGADataModule resumes a mid-epoch checkpoint at the next unseen batch itself (state_dict/load_state_dict).
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    return REGACLI(
        REGAModule,
        REGADataModule,
        args=argv,
        seed_everything_default=1234,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"plugins": [AtomicCheckpointIO()]},
        parser_kwargs={"default_env": False},
    )
