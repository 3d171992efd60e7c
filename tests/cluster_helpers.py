"""Helpers of the training and cluster tests: ``cli.py fit`` command lines, TensorBoard scalars, SLURM tasks
started as srun would, and callbacks that kill, signal or slow down a run (imported by the fit subprocesses through
PYTHONPATH)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
from lightning.pytorch.strategies import DDPStrategy

REPO = Path(__file__).resolve().parent.parent


class ExitAtStep(L.Callback):
    """Die like a preempted job: every rank ends at once, without cleanup, before optimizer step ``step + 1``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os._exit(17)


class SignalAtStep(L.Callback):
    """A SLURM signal in the middle of a step: after a backward of optimizer step ``step`` (DDP has all-reduced
    the gradients, the optimizer has not stepped), rank ``rank`` alone sends ``signum`` to itself."""

    def __init__(self, step: int, rank: int = 1, signum: int = int(signal.SIGUSR1)):
        self.step, self.rank, self.signum = step, rank, signum
        self.sent = False

    def on_after_backward(self, trainer, pl_module) -> None:
        if (trainer.global_step, trainer.global_rank) == (self.step, self.rank) and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


class SlowRankZero(L.Callback):
    """After the first step rank 0 works alone for ``seconds`` (a judge, a merge) while the other ranks wait for
    its result, as the evaluation callback's judged benchmarks do."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        from rega.distributed import broadcast_from_zero

        if trainer.global_step != 1:
            return
        if trainer.is_global_zero:
            time.sleep(self.seconds)
        assert broadcast_from_zero({"score": 1.0} if trainer.is_global_zero else None) == {"score": 1.0}
        trainer.strategy.barrier("slow-rank-zero")


class MeshReport(L.Callback):
    """Each rank writes ``folder/rank{r}.json`` at the start of training: the device mesh its trainable DTensors
    live on (dimension names, rank grid), their placements, and the sampler's replicas and rank."""

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_train_start(self, trainer, pl_module) -> None:
        import json

        from torch.distributed.tensor import DTensor

        params = [p for p in pl_module.parameters() if p.requires_grad and isinstance(p, DTensor)]
        report = {
            "meshes": sorted(
                {json.dumps([p.device_mesh.mesh_dim_names, p.device_mesh.mesh.tolist()]) for p in params}
            ),
            "placements": sorted({repr(p.placements) for p in params}),
            "params": len(params),
            "sampler": trainer.strategy.distributed_sampler_kwargs,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


class ShortTimeoutDDP(DDPStrategy):
    """DDP over gloo whose collectives give up after ``seconds``, as NCCL's do after the process group timeout."""

    def __init__(self, seconds: float = 5.0):
        super().__init__(
            process_group_backend="gloo", find_unused_parameters=False, timeout=timedelta(seconds=seconds)
        )


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def slurm_vars(job_id: int, tasks: int, rank: int) -> dict[str, str]:
    """The variables srun sets for task ``rank`` of a one-node job (those Lightning and the project read)."""
    return {
        "SLURM_NTASKS": tasks, "SLURM_NTASKS_PER_NODE": tasks, "SLURM_NNODES": 1, "SLURM_JOB_NUM_NODES": 1,
        "SLURM_NODELIST": "localhost", "SLURM_JOB_ID": job_id, "SLURM_JOB_NAME": "rega", "SLURM_PROCID": rank,
        "SLURM_LOCALID": rank, "SLURM_NODEID": 0,
    }  # fmt: skip


def slurm_tasks(
    args: list[str], logs: Path, job_id: int, tasks: int = 2, timeout: float = 300
) -> list | None:
    """``args`` as the ``tasks`` tasks of SLURM job ``job_id`` on one node, as srun starts them (output in
    ``logs/rank{r}.log``): their exit codes, or None when they did not all end within ``timeout`` (then killed)."""
    logs.mkdir(parents=True, exist_ok=True)
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = []
    for rank in range(tasks):
        env = {**run_env(), **{k: str(v) for k, v in slurm_vars(job_id, tasks, rank).items()}, **rendezvous}
        with open(logs / f"rank{rank}.log", "wb") as out:
            procs.append(subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        return [proc.wait(max(0.1, deadline - time.monotonic())) for proc in procs]
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
            proc.wait()
        return None


def memory_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB: VmRSS (resident now) or VmHWM (peak resident)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure_sharded_load(model_dir: str, out: str, dtype: str = "float32") -> None:
    """One rank of a gloo job (MASTER_ADDR/PORT, RANK, WORLD_SIZE in the environment) that loads ``model_dir`` with
    LoRA as ``REGAModule.configure_model`` does under FSDP2 (:func:`rega.modules.rank_loading.load_sharded`) and
    runs one forward and backward; writes ``out/rank{r}.json``: its resident memory before loading, its peak
    through loading and its peak after the step, in bytes (the peak is reset first where the kernel allows it)."""
    import contextlib
    import json

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from rega.config import ModelConfig
    from rega.modules.model import LoraSettings, add_lora
    from rega.modules.rank_loading import load_sharded

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("data_parallel",))
    config = ModelConfig(name_or_path=model_dir, dtype=dtype)
    dist.barrier()
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    before = memory_kib("VmRSS")
    model = load_sharded(config, mesh, lambda base: add_lora(base, LoraSettings()))
    report = {"before": before * 1024, "peak": memory_kib("VmHWM") * 1024}
    model(input_ids=torch.arange(16).view(1, 16)).logits.float().mean().backward()  # the shards work
    report["after_step"] = memory_kib("VmHWM") * 1024
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


def last_lora_state(root: Path) -> dict:
    """The LoRA state dict of the run's ``last.ckpt`` below ``root``."""
    import torch

    return torch.load(next(root.rglob("last.ckpt")), weights_only=False, map_location="cpu")["state_dict"]


def assert_trains_like_ddp(ddp: Path, other: Path, steps: int) -> dict:
    """``other`` (FSDP2, HSDP) against DDP over the same ranks, batches, LoRA init and dropout masks: per-step loss
    and clipped global gradient norm equal up to the reduction order (relative 1e-4 and 1e-3), clipping active,
    and its last checkpoint holding every LoRA tensor whole and equal. Returns ``other``'s LoRA state."""
    import pytest
    import torch

    losses, norms = ({name: read_scalars(root, key) for name, root in [("ddp", ddp), ("other", other)]}
                     for key in ("train/loss", "train/grad_norm"))  # fmt: skip
    assert sorted(losses["other"]) == sorted(losses["ddp"]) and len(losses["ddp"]) == steps
    for step in losses["ddp"]:
        assert losses["other"][step] == pytest.approx(losses["ddp"][step], rel=1e-4), step
        assert norms["other"][step] == pytest.approx(norms["ddp"][step], rel=1e-3), step
    assert max(norms["other"].values()) > 0.05  # clipping was active (max_grad_norm 0.05)
    ddp_state, state = last_lora_state(ddp), last_lora_state(other)
    assert state.keys() == ddp_state.keys() and all("lora_" in k for k in state)
    for name, tensor in ddp_state.items():
        assert state[name].shape == tensor.shape  # whole, not one rank's shard
        torch.testing.assert_close(state[name], tensor, rtol=1e-3, atol=1e-5)
    return state
