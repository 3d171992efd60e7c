"""Preemption that cannot hang or skip a batch.

SLURM sends SIGUSR1 before the time limit (``#SBATCH --signal``) and SIGTERM on preemption or ``scancel``, at any
moment, also while a rank is inside a collective. Lightning's own SLURM handler saves from inside the signal
handler: its barrier (and FSDP2's gathers in the checkpoint hook) pair with whatever collective the other ranks are
in, and the job hangs until it is killed, never requeued. Here a signal only sets a flag. At the end of each
optimizer step every rank contributes its flags to one small all-reduce (max); when any rank was signalled, all
ranks save together there, at a step boundary, and leave the fit:

* SIGUSR1: exit code :data:`REQUEUE_EXIT`; ``scripts/slurm_fit.sh`` then runs ``scontrol requeue``;
* SIGTERM (a cancel, or a preemption SLURM requeues itself): exit code :data:`STOP_EXIT`, not requeued by us.

The checkpoint goes into the run's own folder (``<log_dir>/checkpoints/preempted.ckpt``); under SLURM a small
record ``<default_root_dir>/requeue/job_<id>.json`` points to it, keyed by the job's id, which a requeued job
keeps: :func:`resume_requeued` makes that job, and only that job, resume from it, in the same log folder. A
different fit started in the same root has another job id and starts afresh. The record is removed when the fit
finishes.

Cost: one all-reduce of two integers per optimizer step, read on the host (Lightning 2.6 already broadcasts its own
SIGTERM flag at every step, so the host has synchronised there anyway).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from pathlib import Path

import torch
from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment
from lightning.pytorch.callbacks import Callback

from rega.io import write_json

log = logging.getLogger(__name__)

REQUEUE_EXIT = 75  # EX_TEMPFAIL: saved after SIGUSR1, to be requeued
STOP_EXIT = 143  # 128 + SIGTERM: saved after SIGTERM, not requeued
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)  # the flags' order


class Preempted(SystemExit):
    """Leaves the fit after the preemption checkpoint: no end-of-training work (adapter, summary, evaluation)."""


def job_key() -> str | None:
    """The SLURM job's id as ``scontrol requeue`` names it (``<array job>_<task>`` in an array), None outside
    SLURM."""
    if not SLURMEnvironment.detect():
        return None
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ.get("SLURM_JOB_ID")


def record_path(root: str | os.PathLike, key: str) -> Path:
    return Path(root) / "requeue" / f"job_{key}.json"


def without_slurm_requeue(plugins) -> list:
    """``trainer.plugins`` with Lightning's SLURM environment told not to install its own requeue handler."""
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if SLURMEnvironment.detect() and not any(isinstance(p, ClusterEnvironment) for p in plugins):
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


def resume_requeued(config) -> str | None:
    """For a fit without ``ckpt_path`` whose SLURM job was requeued after a preemption checkpoint: point
    ``ckpt_path`` at that checkpoint and the TensorBoard logger at the same version folder. Returns the path."""
    key = job_key()
    if key is None or config.get("ckpt_path"):
        return None
    record = record_path(config.trainer.get("default_root_dir") or os.getcwd(), key)
    if not record.is_file():
        return None
    saved = json.loads(record.read_text())
    config.ckpt_path = saved["ckpt_path"]
    init_args = getattr(config.trainer.get("logger"), "init_args", None)
    if saved.get("version") is not None and init_args is not None and init_args.get("version", 0) is None:
        init_args.version = saved["version"]
    log.info("requeued job %s: resuming from %s", key, saved["ckpt_path"])
    return saved["ckpt_path"]


class PreemptionCallback(Callback):
    """Signals set flags; the ranks agree on them after each optimizer step, save there and stop (module doc)."""

    def __init__(self):
        self._flags = [0] * len(SIGNALS)
        self._previous: dict = {}
        self._dir: Path | None = None
        self._version = None
        self._exit: int | None = None  # set once saved: leave at the next hook

    def _on_signal(self, signum, frame) -> None:
        self._flags[SIGNALS.index(signum)] = 1  # nothing else: this may run inside a collective

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in SIGNALS:
            previous = signal.signal(signum, self._on_signal)
            self._previous.setdefault(signum, previous)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":  # before Lightning's handlers: it adds no SIGUSR1 handler where one exists
            self._install()

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._install()  # Lightning has put its SIGTERM handler (a broadcast inside the handler) first

    def on_train_start(self, trainer, pl_module) -> None:
        self._install()
        self._dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective: every rank, here
        self._version = getattr(trainer.logger, "version", None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        flags = torch.tensor(self._flags, dtype=torch.int32, device=trainer.strategy.root_device)
        requeue, stop = trainer.strategy.reduce(flags, reduce_op="max").tolist()
        if requeue or stop:
            self._save(trainer)
            self._exit = STOP_EXIT if stop else REQUEUE_EXIT

    # Leave once Lightning has logged the saved step's metrics, before anything else runs (this callback comes
    # first): the next step, a validation, the epoch's or the fit's end.
    def _leave_if_saved(self, *args, **kwargs) -> None:
        if self._exit is not None:
            raise Preempted(self._exit)

    on_train_batch_start = on_validation_start = on_train_epoch_end = on_train_end = _leave_if_saved

    def _save(self, trainer) -> None:
        path = ((self._dir or Path(trainer.default_root_dir)) / "checkpoints" / "preempted.ckpt").absolute()
        trainer.save_checkpoint(path)  # every rank: a collective under FSDP2; rank 0 writes
        key = job_key()
        if trainer.is_global_zero and key is not None:
            state = {"ckpt_path": str(path), "version": self._version, "global_step": trainer.global_step}
            write_json(record_path(trainer.default_root_dir, key), state)
        trainer.strategy.barrier("rega-preempted")
        if trainer.is_global_zero:
            log.warning("signalled: saved %s after step %d; stopping", path, trainer.global_step)

    def on_fit_end(self, trainer, pl_module) -> None:
        key = job_key()
        if trainer.is_global_zero and key is not None:  # finished: a later requeue of this job starts afresh
            record_path(trainer.default_root_dir, key).unlink(missing_ok=True)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
        self._previous = {}
