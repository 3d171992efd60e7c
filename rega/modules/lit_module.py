"""REGAModule: a LoRA-adapted causal LM trained with loss over response tokens only.

The LM head runs only at positions that carry a label in some row of the batch (``logits_to_keep``): role prompts
are long and answers short, so this skips much of the vocabulary projection; the loss is exactly the usual
token-mean cross-entropy over response tokens.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import grad_norm

from rega.data.chat import IGNORE_INDEX, ChatFormat
from rega.io import write_json
from rega.modules.model import LoraSettings, ModelConfig, add_lora, load_model, load_tokenizer

log = logging.getLogger(__name__)


class REGAModule(L.LightningModule):
    def __init__(
        self,
        model: ModelConfig | None = None,
        lora: LoraSettings | None = None,
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        min_lr_ratio: float = 0.1,
        adapter_dir: str | None = None,
        seed: int = 1234,
    ):
        """
        Args:
            model: which base model to load and how (dtype, 4-bit, gradient checkpointing, chat template).
            lora: LoRA rank, alpha, dropout and target modules (paper: r=16, alpha=32).
            learning_rate: peak AdamW learning rate.
            weight_decay: AdamW weight decay on the adapter weights.
            warmup_ratio: share of the optimizer steps spent in linear warm-up.
            min_lr_ratio: the cosine decay ends at ``learning_rate * min_lr_ratio``.
            adapter_dir: where the final peft adapter is saved (default ``<log_dir>/adapter``).
            seed: seeds each step's dropout from (seed, step, rank), so a resumed run draws the same masks.
        """
        super().__init__()
        self.model_config = model or ModelConfig()
        self.lora = lora or LoraSettings()
        # Plain values only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {"model": asdict(self.model_config), "lora": asdict(self.lora), "learning_rate": learning_rate,
             "weight_decay": weight_decay, "warmup_ratio": warmup_ratio, "min_lr_ratio": min_lr_ratio, "seed": seed}
        )  # fmt: skip
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.warmup_ratio = warmup_ratio
        self.min_lr_ratio = min_lr_ratio
        self.adapter_dir = adapter_dir
        self.seed = seed
        self.tokenizer = load_tokenizer(self.model_config)
        self.chat = ChatFormat(
            self.tokenizer, self.model_config.chat_template, self.model_config.system_placement
        )
        self.model = None
        # Checkpoints hold only the trainable (LoRA) weights; the frozen base comes from the model config.
        self.strict_loading = False
        self._last_batch_end: float | None = None
        self._fit_start = 0.0

    def configure_model(self) -> None:
        if self.model is not None:
            return
        base = load_model(self.model_config)
        base.config.use_cache = False  # also required for packed sequences to stay isolated under SDPA
        self.model = add_lora(base, self.lora, self.model_config.gradient_checkpointing)
        # from_pretrained returns eval mode and Lightning keeps submodule modes: without this, LoRA dropout is off.
        self.model.train()

    # --- loss ---------------------------------------------------------------------------------------------
    def token_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cross-entropy at every position that predicts a response token.

        Returns (losses [B, P], mask [B, P], positions [P]) where ``positions`` index the input and ``mask`` marks
        real targets (rows of a batch share the union of their label positions).
        """
        targets_all = batch["labels"][:, 1:]
        positions = (targets_all != IGNORE_INDEX).any(0).nonzero().squeeze(-1)
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch["position_ids"],
            use_cache=False,
            logits_to_keep=positions,
        )
        targets = targets_all[:, positions]
        logits = out.logits.float()
        losses = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).view_as(targets)
        return losses, targets != IGNORE_INDEX, positions

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        losses, mask, _ = self.token_losses(batch)
        loss = losses[mask].mean()
        rows = batch["input_ids"].size(0)
        self.log("train/loss", loss, prog_bar=True, batch_size=rows)
        self._batch_tokens = (
            int((batch["token_domain"] >= 0).sum()),
            int(mask.sum()),
            batch["input_ids"].numel(),
        )
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        losses, mask, positions = self.token_losses(batch)
        domains = batch["token_domain"][:, 1:][:, positions]
        names = self.trainer.datamodule.domains if self.trainer.datamodule is not None else []
        total = int(mask.sum())
        self.log("val/loss", losses[mask].mean(), prog_bar=True, batch_size=total, sync_dist=True)
        for index in domains[mask].unique().tolist():
            selected = mask & (domains == index)
            name = names[index] if index < len(names) else str(index)
            self.log(
                f"val/loss_{name}", losses[selected].mean(), batch_size=int(selected.sum()), sync_dist=True
            )

    # --- logging ------------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        self._fit_start = time.perf_counter()
        self._last_batch_end = None

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Randomness as a function of the step alone: resuming from any checkpoint replays the same dropout,
        # whatever else consumed the global generator before (data loader start, validation, restore).
        step = self.trainer.global_step * self.trainer.world_size + self.trainer.global_rank
        torch.manual_seed((self.seed * 1_000_003 + step) % 2**63)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        real, supervised, total = self._batch_tokens
        if self._last_batch_end is not None:  # the first step includes start-up costs
            seconds = now - self._last_batch_end
            self.log("train/tokens_per_s", real / seconds, batch_size=1)
            self.log("train/supervised_tokens_per_s", supervised / seconds, batch_size=1)
        self.log("train/padding_fraction", 1.0 - real / max(1, total), batch_size=1)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0], batch_size=1)
        self._last_batch_end = now

    def on_before_optimizer_step(self, optimizer) -> None:
        norms = grad_norm(self.model, norm_type=2)
        if "grad_2.0_norm_total" in norms:
            self.log("train/grad_norm", norms["grad_2.0_norm_total"], batch_size=1)

    # --- optimisation -------------------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=self.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.warmup_ratio * total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- checkpoints --------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_train_end(self) -> None:
        # Both are collectives under DDP/FSDP: every rank asks, rank 0 writes.
        state = self.trainer.strategy.lightning_module_state_dict()
        log_dir = Path(self.trainer.log_dir or ".")
        if not self.trainer.is_global_zero:
            return
        target = Path(self.adapter_dir or log_dir / "adapter")
        save_adapter(self.model, self.tokenizer, target, {k.removeprefix("model."): v for k, v in state.items()})
        self.write_summary(target, log_dir)

    def write_summary(self, adapter: Path, log_dir: Path) -> None:
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if v.numel() == 1}
        datamodule = self.trainer.datamodule
        summary = {
            "strategy": getattr(datamodule, "strategy", None),
            "model": self.model_config.name_or_path,
            "epochs": self.trainer.current_epoch,
            "optimizer_steps": self.trainer.global_step,
            "seconds": round(time.perf_counter() - self._fit_start, 1),
            "corpus": getattr(datamodule, "manifest", {}).get("counts", {}).get("by_kind"),
            "tokenized": getattr(datamodule, "manifest", {}).get("tokenized"),
            "metrics": metrics,
            "adapter": str(adapter),
            "log_dir": str(log_dir),
        }
        write_json(log_dir / "summary.json", summary)
        log.info("summary: %s", json.dumps(summary))


def save_adapter(model, tokenizer, target: Path, state_dict: dict | None = None) -> None:
    """Save the LoRA adapter in peft's format (``PeftModel.from_pretrained`` loads it) plus the tokenizer."""
    model.save_pretrained(str(target), state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(str(target))
