"""A training step reads nothing back from the device, so on a GPU the host never waits for it mid-step.

On CPU nothing waits, so the step's operations are recorded instead (a ``TorchDispatchMode`` around
``REGAModule.training_step`` and its batch hooks, backward included): none may be one that makes a GPU's host wait —
a scalar read (``item``, ``bool``, ``int``), ``nonzero``, a boolean-mask ``index``/``index_put``, ``masked_select``,
``tolist``. Every registered architecture trains packed rows under gradient checkpointing, with ``kl_to_base``
restricted to one domain (the loss term with the most selection). The optimizer's own step count is exempt: torch
keeps it on the host by design (a CPU tensor, also when training on a GPU).
"""

from __future__ import annotations

import traceback

import lightning as L
import numpy as np
import pytest
import torch
from test_architectures import lora_module, tiny_dirs  # noqa: F401 (a fixture)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

from rega.datamodules.contract import TrainingData
from rega.datamodules.tokenized import TokenizedExamples, collate_rows, pack_rows
from rega.modules.architectures import ARCHITECTURES
from rega.modules.lit_module import REGAModule

aten = torch.ops.aten
SCALAR_READS = {aten._local_scalar_dense, aten.is_nonzero, aten.nonzero, aten.masked_select, aten.equal}
INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
LENGTHS = [23, 9, 31, 14, 40, 5, 18, 27, 12, 33, 8, 21]
DOMAINS = ("medical", "general")


def forces_a_wait(func, args) -> bool:
    packet = func.overloadpacket
    if packet in SCALAR_READS:
        return True
    if packet in INDEXING:  # a boolean index's size is its count of True
        indices = args[1] if len(args) > 1 else []
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or [])
    return False


def where() -> str:
    """The innermost frame of the project that led here."""
    frames = [f for f in traceback.extract_stack() if "/rega/" in f.filename]
    return f"{frames[-1].filename.rsplit('/rega/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"


def inside_the_optimizer() -> bool:
    return any("/torch/optim/" in frame.filename for frame in traceback.extract_stack())


class WaitRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if forces_a_wait(func, args) and not inside_the_optimizer():
            self.found.append(f"{func} at {where()}")
        return func(*args, **(kwargs or {}))


def recorded(recorder: WaitRecorder, method):
    def run(*args, **kwargs):
        original_tolist = torch.Tensor.tolist

        def tolist(tensor):
            recorder.found.append(f"tolist at {where()}")
            return original_tolist(tensor)

        torch.Tensor.tolist = tolist
        try:
            with recorder:
                return method(*args, **kwargs)
        finally:
            torch.Tensor.tolist = original_tolist

    return run


def examples(vocab: int) -> TokenizedExamples:
    rng = np.random.default_rng(0)
    return TokenizedExamples(
        tokens=rng.integers(0, vocab, size=sum(LENGTHS)).astype(np.int32),
        offsets=np.concatenate([[0], np.cumsum(LENGTHS)]).astype(np.int64),
        spans=np.array([(n // 3, n) for n in LENGTHS], dtype=np.int32).reshape(-1, 2),
        span_offsets=np.arange(len(LENGTHS) + 1, dtype=np.int64),
        domain_ids=np.arange(len(LENGTHS), dtype=np.int16) % 2, domains=list(DOMAINS),
    )  # fmt: skip


class PackedRows(L.LightningDataModule):
    """Two packed batches of 3 rows, examples alternating between the two domains."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        data = examples(vocab)
        rows = pack_rows(data.lengths.tolist(), 64)
        self.batches = [collate_rows(data, rows[i : i + 3], pad_id=0) for i in (0, 3)]

    def train_dataloader(self):
        return DataLoader(self.batches, batch_size=None)

    def training_data(self) -> TrainingData:
        return TrainingData(domains=DOMAINS, strategy="ft", batch_size=3)


def sync_errors(method):
    """``method`` under CUDA's own detector: any synchronizing call (a device-to-host copy, a wait) raises."""

    def run(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return method(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    return run


def fit_two_steps(lora_module_, accelerator: str, wrap, monkeypatch, root) -> L.Trainer:
    """Two training steps of ``lora_module_``'s model (micro-batches of 2, kl_to_base on general tokens), the step
    and its batch hooks wrapped by ``wrap``."""
    module = REGAModule(
        model=lora_module_.model_config, lora=lora_module_.lora, micro_batch_size=2, max_grad_norm=1.0,
        loss_terms={"kl_to_base": {"domains": ["general"]}},
    )  # fmt: skip
    module.model = lora_module_.model  # LoRA B already non-zero, so the KL and every gradient are too
    for hook in ("training_step", "on_train_batch_start", "on_train_batch_end"):
        monkeypatch.setattr(module, hook, wrap(getattr(module, hook)))
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
    )  # fmt: skip
    trainer.fit(module, datamodule=PackedRows(module.model.config.vocab_size))
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/kl_to_base"])
    assert trainer.callback_metrics["train/kl_to_base"] > 0  # the selection found the general tokens
    return trainer


CASES = [(arch, record.attention[0]) for arch, record in ARCHITECTURES.items()]


@pytest.mark.parametrize(("arch", "attn"), CASES, ids=[a for a, _ in CASES])
def test_a_training_step_never_waits_for_the_device(tiny_dirs, arch, attn, monkeypatch, tmp_path):  # noqa: F811
    template = lora_module(tiny_dirs(arch), attn_implementation=attn, gradient_checkpointing=True)
    recorder = WaitRecorder()
    fit_two_steps(template, "cpu", lambda method: recorded(recorder, method), monkeypatch, tmp_path)
    assert sorted(set(recorder.found)) == []


@pytest.mark.gpu
@pytest.mark.parametrize(("arch", "attn"), CASES, ids=[a for a, _ in CASES])
def test_a_cuda_training_step_never_synchronizes(tiny_dirs, arch, attn, monkeypatch, tmp_path):  # noqa: F811
    """The same steps on a GPU under torch.cuda.set_sync_debug_mode("error"): what the CPU recording stands for."""
    template = lora_module(tiny_dirs(arch), attn_implementation=attn, gradient_checkpointing=True)
    fit_two_steps(template, "gpu", sync_errors, monkeypatch, tmp_path)
