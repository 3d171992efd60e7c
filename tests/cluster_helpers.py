"""Helpers of the training and cluster tests: ``cli.py fit`` command lines, TensorBoard scalars, and a callback
that kills a run like a preemption (imported by the fit subprocesses through PYTHONPATH)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L

REPO = Path(__file__).resolve().parent.parent


class ExitAtStep(L.Callback):
    """Die like a preempted job: every rank ends at once, without cleanup, before optimizer step ``step + 1``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os._exit(17)


def read_scalars(log_dir: Path, tag: str) -> dict[int, float]:
    """Every value TensorBoard holds for ``tag`` under ``log_dir``, by step (later runs overwrite earlier)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in sorted(log_dir.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


def fit_args(tiny_model_dir: Path, root: Path, *extra: str, cache: Path | None = None) -> list[str]:
    """``cli.py fit`` on the tiny model and tests/configs/tiny_fit.yaml, everything written under ``root``."""
    return [
        sys.executable, str(REPO / "cli.py"), "fit",
        "--config", str(REPO / "configs/trainer/cpu.yaml"),
        "--config", str(REPO / "tests/configs/tiny_fit.yaml"),
        "--model.model.name_or_path", str(tiny_model_dir),
        "--trainer.default_root_dir", str(root),
        "--trainer.logger.init_args.save_dir", str(root),
        "--data.cache", str(cache or root / "cache"),
        "--model.adapter_dir", str(root / "adapter"),
        *extra,
    ]  # fmt: skip


def run_env() -> dict:
    # One thread per process: two ranks on two cores; the tests directory importable for ExitAtStep.
    path = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
