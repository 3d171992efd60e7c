"""REGAModule: a LoRA-adapted causal LM trained with loss over response tokens only.

Three choices make a step cheap without changing what it computes (benchmarks/README.md has the numbers):

* the LM head runs only on the hidden states of tokens that predict a response token: role prompts are long and
  answers short, and the vocabulary projection is a fifth of a small model's FLOPs;
* each batch is forwarded and backwarded ``micro_batch_size`` packed rows at a time and stepped once, so the
  activations held are those of one micro-batch; the loss is scaled by the batch's response-token count, so the
  gradient is the whole batch's token-mean gradient (manual optimization);
* training and validation forwards run causal attention per packed sequence (:mod:`rega.modules.attention`)
  instead of one masked attention over the whole row.
"""

from __future__ import annotations

import contextlib
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
from rega.modules.attention import decoder_hidden_states, packed_rows, prepare_packed_attention
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
        micro_batch_size: int | None = 1,
        max_grad_norm: float | None = None,
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
            micro_batch_size: rows forwarded and backwarded at a time within a batch (one optimizer step per
                batch; the data module's ``batch_size`` is the batch per step and device). ``None``: the whole
                batch at once (always under FSDP). Replaces Lightning's ``accumulate_grad_batches``, with an exact
                token mean.
            max_grad_norm: clip the adapter gradients to this global L2 norm (``None``: no clipping). Replaces
                ``Trainer(gradient_clip_val=...)``.
            adapter_dir: where the final peft adapter is saved (default ``<log_dir>/adapter``).
            seed: seeds each step's dropout from (seed, step, rank), so a resumed run draws the same masks.
        """
        super().__init__()
        self.model_config = model or ModelConfig()
        self.lora = lora or LoraSettings()
        # Plain values only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {"model": asdict(self.model_config), "lora": asdict(self.lora), "learning_rate": learning_rate,
             "weight_decay": weight_decay, "warmup_ratio": warmup_ratio, "min_lr_ratio": min_lr_ratio,
             "micro_batch_size": micro_batch_size, "max_grad_norm": max_grad_norm, "seed": seed}
        )  # fmt: skip
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.warmup_ratio = warmup_ratio
        self.min_lr_ratio = min_lr_ratio
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 or None, got {micro_batch_size}")
        self.micro_batch_size = micro_batch_size
        self.max_grad_norm = max_grad_norm
        # Several forward/backward passes per optimizer step (see the module docstring).
        self.automatic_optimization = False
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
        prepare_packed_attention(base, self.model_config)
        self.model = add_lora(base, self.lora, self.model_config.gradient_checkpointing)
        # from_pretrained returns eval mode and Lightning keeps submodule modes: without this, LoRA dropout is off.
        self.model.train()

    # --- loss ---------------------------------------------------------------------------------------------
    def token_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of every response token: (losses [N], mask [B, L-1]).

        ``mask`` marks the input positions that predict a response token; ``losses`` follow ``mask``'s row-major
        order. The LM head runs on those positions' hidden states only.
        """
        targets = batch["labels"][:, 1:]
        mask = targets != IGNORE_INDEX
        base = self.model.get_base_model()
        hidden = decoder_hidden_states(base, batch)
        logits = base.get_output_embeddings()(hidden[:, :-1][mask])
        return F.cross_entropy(logits.float(), targets[mask], reduction="none"), mask

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        rows = batch["input_ids"].size(0)
        supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        step = self.micro_batch_size or rows
        starts = range(0, rows, step)
        loss = torch.zeros((), device=batch["input_ids"].device)
        no_sync = getattr(self.trainer.strategy, "block_backward_sync", contextlib.nullcontext)
        for start in starts:
            micro = trim_padding({key: value[start : start + step] for key, value in batch.items()})
            last = start + step >= rows
            # DDP: gradients are all-reduced once, after the last micro-batch.
            with contextlib.nullcontext() if last else no_sync(), packed_rows():
                losses, _ = self.token_losses(micro)
                part = losses.sum() / max(1, supervised)
                self.manual_backward(part)
            loss += part.detach()
        if self.max_grad_norm:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm"
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.lr_schedulers().step()
        self.log("train/loss", loss, prog_bar=True, batch_size=rows)
        self._batch_tokens = (int((batch["token_domain"] >= 0).sum()), supervised, batch["input_ids"].numel())
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        with packed_rows():
            losses, mask = self.token_losses(batch)
        domains = batch["token_domain"][:, 1:][mask]
        names = self.trainer.datamodule.domains if self.trainer.datamodule is not None else []
        self.log("val/loss", losses.mean(), prog_bar=True, batch_size=losses.numel(), sync_dist=True)
        for index in domains.unique().tolist():
            selected = domains == index
            name = names[index] if index < len(names) else str(index)
            self.log(
                f"val/loss_{name}", losses[selected].mean(), batch_size=int(selected.sum()), sync_dist=True
            )

    def on_fit_start(self) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if isinstance(self.trainer.strategy, FSDPStrategy) and self.micro_batch_size is not None:
            # Several backward passes inside one FSDP root forward are not verified here: run batches whole.
            log.warning("FSDP: micro_batch_size=%s ignored; each batch runs in one forward/backward pass",
                        self.micro_batch_size)  # fmt: skip
            self.micro_batch_size = None

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
        save_adapter(
            self.model, self.tokenizer, target, {k.removeprefix("model."): v for k, v in state.items()}
        )
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


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the right-padding columns that no row of ``batch`` needs (rows are padded to the batch's longest)."""
    width = int((batch["token_domain"] >= 0).any(0).nonzero().max()) + 1
    if width == batch["input_ids"].size(1):
        return batch
    return {key: value[:, :width] for key, value in batch.items()}


def save_adapter(model, tokenizer, target: Path, state_dict: dict | None = None) -> None:
    """Save the LoRA adapter in peft's format (``PeftModel.from_pretrained`` loads it) plus the tokenizer."""
    model.save_pretrained(str(target), state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(str(target))
