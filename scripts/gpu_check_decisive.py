"""The checks of ``scripts/gpu_check.py`` that decide whether a GPU trains correctly, run before its timings.

* ``packed_*``: inside packed rows, each example's loss and LoRA gradients equal its own alone, with gradient
  checkpointing on, as every GPU config trains: LLaMA and BLOOM in fp32 (tolerance 1e-3, far below a leak) and
  under bf16 autocast (tolerance 0.02), LLaMA in 4-bit (when bitsandbytes imports). On CUDA the backward runs on autograd's own thread, where a checkpointed layer recomputes
  its forward: the layout must reach that recomputation. ``leak_loss_error`` is the same losses' error when the
  examples are not kept apart (one causal sequence per row): the scale a leak would show; ``leak_visible`` says
  whether it stands 10x above the check's own error.
* ``exact_resume``: REGADataModule (host counts, per-domain validation) over JSONL written here; a run stopped
  after the checkpoint at step 3 and resumed from it gives the uninterrupted run's per-step losses.

Models are 2-layer random LLaMA/BLOOM with LLaMA-7B's head size (128; 16 on a dry run) and the word-level
tokenizer of :func:`build_tokenizer`.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import numpy as np
import torch

PAD = 3  # the built tokenizer's <pad>
LENGTHS = [
    230,
    61,
    170,
    95,
    310,
    40,
    128,
    201,
    77,
]  # packed into rows of ROW tokens: several per row, some padding
ROW = 512


def build_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0-3
    words = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(vocab - len(specials))])}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def small_model_dir(cfg: dict, arch: str, root: Path) -> Path:
    """A 2-layer random ``llama`` or ``bloom`` with 4 heads of ``cfg['head_dim']``, saved once."""
    from transformers import BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM

    path = root / f"small-{arch}"
    if (path / "config.json").exists():
        return path
    hidden = 4 * cfg["head_dim"]
    # Weights 5x the usual init: sharper attention, so that an example seeing its neighbours changes its loss.
    ids = dict(
        vocab_size=cfg["vocab"], bos_token_id=1, eos_token_id=2, pad_token_id=PAD, initializer_range=0.1
    )
    if arch == "llama":
        config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, **ids)  # fmt: skip
        cls = LlamaForCausalLM
    else:
        config, cls = BloomConfig(hidden_size=hidden, n_layer=2, n_head=4, **ids), BloomForCausalLM
    torch.manual_seed(0)
    with torch.device(cfg["device"]):
        model = cls._from_config(config, dtype=getattr(torch, cfg["dtype"]))
    model.save_pretrained(path, safe_serialization=True)
    build_tokenizer(cfg["vocab"]).save_pretrained(path)
    return path


# --- packed examples equal themselves alone ------------------------------------------------------------------
def random_examples(cfg: dict, scale: float):
    from rega.datamodules.tokenized import TokenizedExamples

    rng = np.random.default_rng(0)
    lengths = [max(4, int(n * scale)) for n in LENGTHS]
    return TokenizedExamples(
        tokens=rng.integers(PAD + 1, cfg["vocab"], size=sum(lengths)).astype(np.int32),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        spans=np.array([(n // 3, n) for n in lengths], dtype=np.int32).reshape(-1, 2),
        span_offsets=np.arange(len(lengths) + 1, dtype=np.int64),
        domain_ids=np.zeros(len(lengths), dtype=np.int16), domains=["d"],
    )  # fmt: skip


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))


def packed_vs_alone(cfg: dict, root: Path, arch: str, bf16: bool, **options) -> dict:
    """Each packed example's per-token losses and LoRA gradients against the same example alone (plain peft
    forward), with non-reentrant checkpointing: in fp32, where any leak is far above the rounding, or under
    bf16 autocast as bf16-mixed trains (the varlen kernel's path; a dry run stays in fp32)."""
    import torch.nn.functional as F

    from rega.config import ModelConfig
    from rega.data.chat import IGNORE_INDEX
    from rega.datamodules.tokenized import collate_rows, pack_rows
    from rega.modules.lit_module import REGAModule
    from rega.modules.model import LoraSettings

    if options.get("load_in_4bit"):
        if cfg["device"] != "cuda":
            return {"skipped": "4-bit needs CUDA"}
        try:
            import bitsandbytes  # noqa: F401
        except Exception as err:
            return {"skipped": f"bitsandbytes does not import: {type(err).__name__}: {err}"[:500]}
    device, cuda = cfg["device"], cfg["device"] == "cuda"
    bf16 = bf16 and cuda
    options = {"dtype": cfg["dtype"] if bf16 else "float32", **options}
    path = small_model_dir(cfg, arch, root)
    config = ModelConfig(
        name_or_path=str(path),
        gradient_checkpointing=True,
        chat_template="vicuna_v1.1",
        **{"dtype": cfg["dtype"], **options},
    )
    module = REGAModule(model=config, lora=LoraSettings(r=8, alpha=16, dropout=0.0))
    torch.manual_seed(1)
    module.configure_model()
    with torch.no_grad():  # B starts at zero, which would leave every A gradient zero
        for name, param in module.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    module = module.to(device).train()
    params = [p for n, p in module.model.named_parameters() if "lora_" in n]
    row = ROW if cuda else 64
    data = random_examples(cfg, row / ROW)
    rows = pack_rows(data.lengths.tolist(), row)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)

    def grads(loss):
        for p in params:
            p.grad = None
        loss.backward(retain_graph=True)  # on CUDA: on autograd's device thread, which recomputes the layers
        return [p.grad.clone() for p in params]

    def alone(index):
        batch = {k: v.to(device) for k, v in collate_rows(data, [[index]], pad_id=PAD).items()}
        with autocast:
            logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE_INDEX
        losses = F.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="none")
        return losses.detach(), grads(losses.sum())

    batch = {k: v.to(device) for k, v in collate_rows(data, rows, pad_id=PAD).items()}
    leaky = dict(
        batch,
        position_ids=torch.arange(batch["input_ids"].shape[1], device=device).expand_as(batch["input_ids"]),
    )
    with autocast:
        losses, mask = module.token_losses(batch)
        with torch.no_grad():
            leak_losses, _ = module.token_losses(leaky)
    row_of, col_of = mask.nonzero(as_tuple=True)
    loss_error = grad_error = leak_error = 0.0
    for r, members in enumerate(rows):
        start = 0
        for position, i in enumerate(members):
            n = int(data.lengths[i])
            sel = (row_of == r) & (col_of >= start) & (col_of < start + n - 1)
            got = grads(losses[sel].sum())
            want_losses, want = alone(i)
            loss_error = max(loss_error, relative(losses[sel].detach(), want_losses))
            grad_error = max(grad_error, *(relative(g, w) for g, w in zip(got, want)))
            if position:  # the first example of a row sees nothing else even when leaking
                leak_error = max(leak_error, relative(leak_losses[sel], want_losses))
            start += n
    tolerance = 0.02 if bf16 or options.get("load_in_4bit") else 1e-3
    return {
        "arch": arch, "bf16_autocast": bf16, "model_options": options, "rows": len(rows), "examples": len(LENGTHS),
        "row_tokens": row, "max_rel_loss_error": float(f"{loss_error:.3g}"),
        "max_rel_grad_error": float(f"{grad_error:.3g}"), "leak_loss_error": float(f"{leak_error:.3g}"),
        "leak_visible": leak_error > 10 * max(loss_error, grad_error), "tolerance": tolerance,
        "ok": loss_error < tolerance and grad_error < tolerance,
    }  # fmt: skip


# --- save, stop, resume exactly; validation per domain ------------------------------------------------------
class Stop(Exception):
    """Raised by :class:`StopAt`: a run cut short after its checkpoint."""


def write_domain_data(cfg: dict, root: Path, words: int) -> dict[str, Path]:
    """Random-word records in the project's JSONL schema: train and dev sets of two domains, a general set."""
    rng = np.random.default_rng(2)
    sizes = {"medical": 60, "legal": 60, "general": 30, "medical_dev": 6, "legal_dev": 6}
    paths = {}
    for name, count in sizes.items():
        domain = name.removesuffix("_dev")
        lines = []
        for k in range(count):
            text = [" ".join(f"w{w}" for w in rng.integers(0, cfg["vocab"] - 4, int(rng.integers(n // 2, n))))
                    for n in (words, 2 * words)]  # fmt: skip
            lines.append(json.dumps({"id": f"{name}-{k}", "instruction": text[0], "input": "", "output": text[1],
                                     "domain": domain, "task": name, "lang": "en"}))  # fmt: skip
        paths[name] = root / "data" / f"{name}.jsonl"
        paths[name].parent.mkdir(parents=True, exist_ok=True)
        paths[name].write_text("\n".join(lines) + "\n")
    return paths


def exact_resume(cfg: dict, root: Path, steps: int = 6, stop_at: int = 3) -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from rega.config import DataSource, ModelConfig
    from rega.data.corpus import CorpusConfig
    from rega.datamodules import REGADataModule
    from rega.modules.lit_module import REGAModule

    cuda = cfg["device"] == "cuda"
    max_length = 512 if cuda else 96
    paths = write_domain_data(cfg, root / "resume", max_length // 8)
    model = ModelConfig(name_or_path=str(small_model_dir(cfg, "llama", root)), dtype=cfg["dtype"],
                        gradient_checkpointing=True, chat_template="vicuna_v1.1")  # fmt: skip
    corpus = CorpusConfig(strategy="rega", domains=[DataSource(str(paths["medical"])), DataSource(str(paths["legal"]))],
                          general=[DataSource(str(paths["general"]))])  # fmt: skip
    val = [DataSource(str(paths["medical_dev"])), DataSource(str(paths["legal_dev"]))]

    class Record(L.Callback):  # per-step losses; stops before step `stop` once its checkpoint is written
        def __init__(self, stop: int | None):
            self.losses, self.stop = {}, stop

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == self.stop:
                raise Stop

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses[trainer.global_step] = float(loss)

    def run(name: str, stop: int | None = None, ckpt_path: str | None = None):
        L.seed_everything(
            1234, verbose=False
        )  # the same LoRA initialisation in every run, as the CLI seeds it
        record = Record(stop)
        data = REGADataModule(corpus=corpus, val=val, model=model, max_length=max_length, batch_size=4,
                              cache=str(root / "resume" / "cache"))  # fmt: skip
        saves = ModelCheckpoint(dirpath=root / "resume" / name, save_last=True, save_top_k=0,
                                every_n_train_steps=stop_at)  # fmt: skip
        trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, precision=cfg["precision"],
                            max_steps=steps, val_check_interval=stop_at, limit_val_batches=None, logger=False,
                            enable_progress_bar=False, num_sanity_val_steps=0, callbacks=[record, saves],
                            default_root_dir=str(root / "resume" / name))  # fmt: skip
        module = REGAModule(
            model=model, micro_batch_size=2, adapter_dir=str(root / "resume" / name / "adapter")
        )
        with contextlib.suppress(Stop):
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return record.losses, trainer

    began = time.perf_counter()
    full, trainer = run("full")
    validation = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/loss")}
    cut, _ = run("cut", stop=stop_at)
    resumed, _ = run("cut", ckpt_path=str(root / "resume" / "cut" / "last.ckpt"))
    after = {step: loss for step, loss in resumed.items() if step > stop_at}
    diffs = [abs(after[s] - full[s]) / abs(full[s]) for s in after if s in full]
    tolerance = 1e-2 if cuda else 1e-5  # CUDA's backward kernels may add in another order
    return {
        "steps": steps, "checkpoint_step": stop_at, "steps_before_stop": sorted(cut),
        "losses_full": full, "losses_cut": cut, "losses_resumed": after, "max_rel_loss_diff": float(f"{max(diffs, default=1):.3g}"),
        "bitwise_equal": all(after[s] == full[s] for s in after if s in full), "val_losses": validation,
        "seconds": round(time.perf_counter() - began, 1),
        "ok": sorted(after) == [s for s in sorted(full) if s > stop_at] and max(diffs, default=1) < tolerance
        and {"val/loss_medical", "val/loss_legal"} <= validation.keys(),
    }  # fmt: skip
