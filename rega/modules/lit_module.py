"""REGAModule: a LoRA-adapted causal LM trained with loss over response tokens only.

Three choices make a step cheap without changing what it computes (benchmarks/README.md has the numbers):

* the LM head runs only on the hidden states of tokens that predict a response token: role prompts are long and
  answers short, and the vocabulary projection is a fifth of a small model's FLOPs;
* each batch is forwarded and backwarded ``micro_batch_size`` packed rows at a time and stepped once, so the
  activations held are those of one micro-batch; the loss is scaled by the batch's response-token count, so the
  gradient is the whole batch's token-mean gradient (manual optimization);
* training and validation forwards run causal attention per packed sequence (:mod:`rega.modules.attention`)
  instead of one masked attention over the whole row;
* a batch is planned on the host before it moves (:mod:`rega.modules.batch_plan`): micro-batches, response
  positions, sequence lengths and token counts, so a step reads nothing back from the GPU.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import types
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning_utilities.core.apply_func import apply_to_collection

from rega.config import DEFAULT_SEED, ModelConfig
from rega.data.chat import IGNORE_INDEX, ChatFormat
from rega.datamodules.contract import TrainingData, training_data
from rega.io import atomic_dir, write_json
from rega.model_source import load_tokenizer
from rega.modules.attention import decoder_hidden_states, prepare_packed_attention
from rega.modules.batch_plan import PLANNED, plan_batch, planned
from rega.modules.fast_lora import speed_up_lora
from rega.modules.fsdp import is_sharded
from rega.modules.losses import build_loss_terms
from rega.modules.model import LoraSettings, add_lora, decoder_layer_classes, load_model
from rega.modules.rank_loading import load_sharded

log = logging.getLogger(__name__)


class REGAModule(L.LightningModule):
    """A LoRA-adapted causal LM trained with loss over response tokens only (how a step runs: the module docstring).

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
        seed: seeds each step's dropout from (seed, step, rank), so a resumed run draws the same masks; in a fit,
            linked from ``seed_everything``.
        loss_terms: terms added to the cross-entropy, by registered name with their settings, e.g.
            ``{kl_to_base: {weight: 0.1}}`` (:mod:`rega.modules.losses`; plugins can register more).
        fast_lora: run the adapters through :mod:`rega.modules.fast_lora` (one dropout mask per layer input
            shared by the adapters reading it, fused A projections; same weights and adapter files).
            ``False``: peft's own forward (independent masks per adapter).
        compile_layers: ``torch.compile`` each decoder layer once the model is built (one graph, reused by all
            layers of the same shape); the first steps pay for the compilation.
    """

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
        seed: int = DEFAULT_SEED,
        loss_terms: dict[str, dict] | None = None,
        fast_lora: bool = True,
        compile_layers: bool = False,
    ):
        super().__init__()
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 or None, got {micro_batch_size}")
        self.model_config = model or ModelConfig()
        self.lora = lora or LoraSettings()
        settings = {"learning_rate": learning_rate, "weight_decay": weight_decay, "warmup_ratio": warmup_ratio,
                    "min_lr_ratio": min_lr_ratio, "micro_batch_size": micro_batch_size,
                    "max_grad_norm": max_grad_norm, "seed": seed}  # fmt: skip
        # Plain values only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {"model": asdict(self.model_config), "lora": asdict(self.lora), **settings, "loss_terms": loss_terms,
             "fast_lora": fast_lora, "compile_layers": compile_layers}
        )  # fmt: skip
        for name, value in settings.items():
            setattr(self, name, value)
        self.adapter_dir = adapter_dir
        self.loss_terms = build_loss_terms(loss_terms)
        self.fast_lora = fast_lora
        self.data = TrainingData()  # the fit's data, taken in setup
        self.summary: dict | None = None  # what the finished fit did (rank 0), also written to summary.json
        self.compile_layers = compile_layers
        # Several forward/backward passes per optimizer step (see the module docstring).
        self.automatic_optimization = False
        self.tokenizer = load_tokenizer(self.model_config)
        self.chat = ChatFormat(
            self.tokenizer, self.model_config.chat_template, self.model_config.system_placement
        )
        self.model = None
        # Checkpoints hold only the trainable (LoRA) weights; the frozen base comes from the model config.
        self.strict_loading = False
        self._last_batch_end: float | None = None
        self._fit_start = 0.0

    def setup(self, stage: str) -> None:
        self.data = training_data(self.trainer)  # the data module is set up before the module

    def configure_model(self) -> None:
        if self.model is not None:
            return
        if self.device_mesh is None:
            model = self._adapted(load_model(self.model_config))
        else:  # ModelParallelStrategy (FSDP2): shard before the optimizer exists; rank 0 alone reads the weights
            # the whole mesh: shard_model takes its data-parallel part, 2-D (replicate, shard) under HSDP
            model = load_sharded(self.model_config, self.device_mesh, self._adapted, ("response_logits",))
        # from_pretrained returns eval mode and Lightning keeps submodule modes: without this, LoRA dropout is off.
        self.model = model.train()
        if self.compile_layers:  # compiled lazily, at each layer's first call
            # the FSDP units' classes, so any architecture's blocks (BLOOM keeps them in transformer.h)
            layer_types = decoder_layer_classes(model)
            for layer in [m for m in model.modules() if isinstance(m, layer_types)]:
                layer.compile()

    def _adapted(self, base):
        """``base`` ready to train: packed attention, LoRA; alike on every rank, whether ``base`` holds weights or
        is on the meta device (rega.modules.rank_loading)."""
        prepare_packed_attention(base, self.model_config)
        model = add_lora(base, self.lora, self.model_config.gradient_checkpointing)
        model = speed_up_lora(model, self.fast_lora)
        # The loss runs the decoder and the LM head separately (head on response positions only); as a method of
        # the root module it is a forward to FSDP, which all-gathers the root's weights around it.
        model.response_logits = types.MethodType(response_logits, model)
        return model

    # --- the batch, planned on the host ---------------------------------------------------------------------
    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        if isinstance(batch, dict) and "input_ids" in batch:
            training = self.trainer.training
            batch = plan_batch(
                batch, self.micro_batch_size if training else None, self._stand_ins(batch, training)
            )
            if device.type == "cuda":  # pinned, so the copy does not wait for the GPU to finish the last step
                batch = apply_to_collection(batch, torch.Tensor, torch.Tensor.pin_memory)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _stand_ins(self, batch: dict, training: bool) -> int:
        """Micro-batches every rank runs under FSDP, whose every forward gathers weights from all ranks: a
        shorter batch (an epoch's last) is padded with stand-ins (rega.modules.batch_plan)."""
        if not (training and self.micro_batch_size and self.model is not None and is_sharded(self.model)):
            return 0
        rows = batch["input_ids"].size(0)
        return math.ceil(max(rows, self.data.batch_size or rows) / self.micro_batch_size)

    # --- loss ---------------------------------------------------------------------------------------------
    def token_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of every response token: (losses [N], mask [B, L-1]).

        ``mask`` marks the input positions that predict a response token; ``losses`` follow ``mask``'s row-major
        order. The LM head runs on those positions' hidden states only.
        """
        losses, _, _ = self.response_losses(batch)
        return losses, batch["labels"][:, 1:] != IGNORE_INDEX

    def response_losses(self, batch: dict[str, torch.Tensor]):
        """(losses [N], planned batch, logits [N, V]) of the response positions, in row-major order; an unplanned
        batch is planned here (:func:`rega.modules.batch_plan.planned`)."""
        batch = planned(batch)
        logits = self.model.response_logits(batch, batch[PLANNED])
        losses = F.cross_entropy(logits.float(), batch["response_targets"], reduction="none")
        return losses, batch, logits

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        counts, micro_batches = batch["counts"], batch["micro"]
        rows = len(counts["widths"])
        scale = 1.0 / max(1, counts["supervised"])  # every micro-batch's sum over the batch's token count
        device = micro_batches[0]["input_ids"].device
        totals = {name: torch.zeros((), device=device) for name in ("loss", *self.loss_terms)}
        for i, micro in enumerate(micro_batches):
            # Gradients are reduced across ranks once, after the last micro-batch.
            with self._gradient_sync(i == len(micro_batches) - 1):
                losses, micro, logits = self.response_losses(micro)
                parts = {"loss": losses.sum() * scale}
                parts.update({n: term(self, micro, logits) * scale for n, term in self.loss_terms.items()})
                self.manual_backward(sum(parts.values()))
            for name, part in parts.items():
                totals[name] += part.detach()
        self.log("train/grad_norm", self._clip_gradients(), batch_size=1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.lr_schedulers().step()
        loss = totals.pop("loss")
        self.log("train/loss", loss, prog_bar=True, batch_size=rows)
        for name, value in totals.items():
            self.log(f"train/{name}", value, batch_size=rows)
        self._batch_tokens = (counts["real"], counts["supervised"], counts["total"])
        return loss

    def _gradient_sync(self, enabled: bool):
        if enabled:
            return contextlib.nullcontext()
        if is_sharded(self.model):
            return fsdp_no_sync(self.model)
        return getattr(self.trainer.strategy, "block_backward_sync", contextlib.nullcontext)()

    def _clip_gradients(self) -> torch.Tensor:
        """The global L2 norm of the adapter gradients (all shards under FSDP), clipped to ``max_grad_norm``.

        One fused reduction, left on the device: it is read only when Lightning logs.
        """
        from torch.distributed.tensor import DTensor

        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if self.max_grad_norm:
            torch.nn.utils.clip_grads_with_norm_(params, self.max_grad_norm, norm, foreach=True)
        return norm

    # --- validation: one reduction of per-domain sums, so every rank count gives the same numbers -----------
    def on_validation_epoch_start(self) -> None:
        domains = self._domain_names()
        self._val_sums = torch.zeros(len(domains), 2, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        for micro in batch.get("micro", [batch]):
            losses, micro, _ = self.response_losses(micro)
            values = torch.stack([losses.detach().double(), torch.ones_like(losses, dtype=torch.float64)], 1)
            self._val_sums.index_add_(0, micro["response_domain"], values)

    def on_validation_epoch_end(self) -> None:
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        total = sums.sum(0)
        if total[1] == 0:  # nothing to validate (sanity check of an empty set)
            return
        self.log("val/loss", (total[0] / total[1]).float(), prog_bar=True, sync_dist=True)
        for name, (loss_sum, count) in zip(self._domain_names(), sums):
            if count > 0:
                self.log(f"val/loss_{name}", (loss_sum / count).float(), sync_dist=True)

    def _domain_names(self) -> list[str]:
        if not self.data.domains:
            raise RuntimeError("REGAModule validation needs a data module with domains (REGADataModule)")
        return list(self.data.domains)

    # --- logging ------------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        self._fit_start = time.perf_counter()
        self._last_batch_end = None
        if self.trainer.is_global_zero:
            trainable, total = parameter_counts(self.model)
            log.info("LoRA r=%d on %s: %s trainable of %s parameters (%.2f %%)", self.lora.r,
                     self.model_config.name_or_path, f"{trainable:,}", f"{total:,}", 100 * trainable / total)  # fmt: skip

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Randomness as a function of the step alone: resuming from any checkpoint replays the same dropout,
        # whatever else consumed the global generator before (data loader start, validation, restore).
        step = self.trainer.global_step * self.trainer.world_size + self.trainer.global_rank
        torch.manual_seed((self.seed * 1_000_003 + step) % 2**63)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        real, supervised, total = self._batch_tokens
        lr = self.lr_schedulers().get_last_lr()[0]
        metrics = {"padding_fraction": 1.0 - real / max(1, total), "lr": lr}
        if self._last_batch_end is not None:  # the first step includes start-up costs
            seconds = now - self._last_batch_end
            metrics.update(tokens_per_s=real / seconds, supervised_tokens_per_s=supervised / seconds)
        for name, value in metrics.items():
            # A host value as a CPU tensor: self.log would copy a Python number to the GPU, each one a step.
            self.log(f"train/{name}", torch.tensor(value, dtype=torch.float32), batch_size=1)
        self._last_batch_end = now

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
        summary = {
            "strategy": self.data.strategy,
            "model": self.model_config.name_or_path,
            "epochs": self.trainer.current_epoch,
            "optimizer_steps": self.trainer.global_step,
            "seconds": round(time.perf_counter() - self._fit_start, 1),
            "corpus": self.data.corpus_counts,
            # what the corpus was built with (its manifest), which the report shows
            "mix_ratio": self.data.mix_ratio,
            "corpus_seed": self.data.corpus_seed,
            "tokenized": self.data.tokenized,
            "metrics": metrics,
            "adapter": str(adapter),
            "log_dir": str(log_dir),
        }
        write_json(log_dir / "summary.json", summary)
        log.info("summary: %s", json.dumps(summary))
        self.summary = summary


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, all) parameters of ``model``; a sharded (FSDP2) weight counts whole, a 4-bit one as stored."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def response_logits(model, batch: dict[str, torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """Logits of the positions ``index`` of the flattened [rows x width] hidden states (a planned batch's
    ``response_index``: those that predict a response token); bound to the peft model."""
    base = model.get_base_model()
    hidden = decoder_hidden_states(base, batch)
    return base.get_output_embeddings()(hidden.flatten(0, 1).index_select(0, index))


@contextlib.contextmanager
def fsdp_no_sync(model):
    """FSDP2: accumulate this micro-batch's gradients locally (no reduce-scatter) until the last one."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def save_adapter(model, tokenizer, target: Path, state_dict: dict | None = None) -> None:
    """Save the LoRA adapter in peft's format (``PeftModel.from_pretrained`` loads it) plus the tokenizer, into a
    temporary folder that replaces ``target`` whole: a kill never leaves a config beside partial weights."""
    with atomic_dir(target) as tmp:
        model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
