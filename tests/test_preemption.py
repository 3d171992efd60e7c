"""What a GPU cluster does to a job, on 2 gloo CPU processes: a SLURM signal to one rank in the middle of a step
(saved at the step boundary by all ranks, requeued, resumed exactly by that job only), rank-0-only work longer
than the process group's timeout, and the launch scripts' guards and requeue."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from cluster_helpers import fit_args, read_scalars, run_env, slurm_tasks

from rega.callbacks.preemption import REQUEUE_EXIT, STOP_EXIT, record_path

REPO = Path(__file__).resolve().parent.parent
COMMON = ["--config", str(REPO / "configs/trainer/ddp_cpu.yaml"), "--trainer.limit_val_batches", "0"]
STEPS = ["--trainer.max_steps", "5"]


def signal_at(step: int, signum: str = "SIGUSR1") -> list[str]:
    import signal

    return ["--trainer.callbacks+=cluster_helpers.SignalAtStep", f"--trainer.callbacks.step={step}",
            f"--trainer.callbacks.signum={int(getattr(signal, signum))}"]  # fmt: skip


def tail(logs: Path) -> str:
    return "\n".join(p.read_text()[-3000:] for p in sorted(logs.glob("rank*.log")))


def test_signal_mid_step_saves_at_the_boundary_and_only_the_requeued_job_resumes(tiny_model_dir, tmp_path):
    """SIGUSR1 reaches rank 1 alone after a backward of step 2: both ranks finish that step, save there together
    and exit for requeueing (no hang: a bounded wait). Another fit started in the same root starts afresh; the
    requeued job (same SLURM job id) resumes from its own checkpoint and reproduces the uninterrupted losses."""
    cache = tmp_path / "cache"
    runs = iter(range(100))

    def job(root: Path, job_id: int, *extra: str) -> tuple[list | None, str]:
        logs = tmp_path / f"logs{next(runs)}"
        codes = slurm_tasks(fit_args(tiny_model_dir, root, *COMMON, *extra, cache=cache), logs, job_id)
        return codes, tail(logs)

    codes, out = job(tmp_path / "full", 100, *STEPS)
    assert codes == [0, 0], out
    reference = read_scalars(tmp_path / "full", "train/loss")
    assert sorted(reference) == list(range(5))

    root = tmp_path / "run"
    codes, out = job(root, 4242, *STEPS, *signal_at(2))
    assert codes == [REQUEUE_EXIT] * 2, out  # None: the ranks hung and were killed
    saved = json.loads(record_path(root, "4242").read_text())
    state = torch.load(saved["ckpt_path"], weights_only=False, map_location="cpu")
    assert state["global_step"] == 3  # the signalled step completed, nothing after it
    assert state["REGADataModule"] == {"epoch": 0, "batches_done": 3}
    assert sorted(read_scalars(root, "train/loss")) == [0, 1, 2]

    codes, out = job(root, 4343, "--trainer.max_steps", "1")  # another job, same root
    assert codes == [0, 0], out
    other = read_scalars(root / "rega" / "version_1", "train/loss")
    assert other == {0: pytest.approx(reference[0], rel=1e-6)}  # from scratch, not from step 3

    codes, out = job(root, 4242, *STEPS)  # the requeued job
    assert codes == [0, 0], out
    resumed = read_scalars(root / "rega" / "version_0", "train/loss")
    assert sorted(resumed) == sorted(reference)
    for step, loss in reference.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
    assert not record_path(root, "4242").exists()  # finished: nothing left to resume


def test_sigterm_saves_and_stops_without_requeue(tiny_model_dir, tmp_path):
    """SIGTERM (a cancel, or a preemption SLURM requeues itself) on rank 1 mid-step: saved at the boundary too,
    with the exit code the script does not requeue."""
    root = tmp_path / "run"
    args = fit_args(tiny_model_dir, root, *COMMON, *STEPS, *signal_at(1, "SIGTERM"), cache=tmp_path / "cache")
    codes = slurm_tasks(args, tmp_path / "logs", 77)
    assert codes == [STOP_EXIT] * 2, tail(tmp_path / "logs")
    saved = json.loads(record_path(root, "77").read_text())
    assert torch.load(saved["ckpt_path"], weights_only=False)["global_step"] == 2


def test_rank_zero_work_longer_than_the_collective_timeout_does_not_kill_the_job(tiny_model_dir, tmp_path):
    """The process group gives up after 10 s; after step 1 rank 0 works alone for 25 s while rank 1 waits for its
    result (as for a judge): rank 1 waits outside the collective, and training completes."""
    strategy = ["--trainer.strategy", "cluster_helpers.ShortTimeoutDDP", "--trainer.strategy.seconds", "10"]
    slow = ["--trainer.callbacks+=cluster_helpers.SlowRankZero", "--trainer.callbacks.seconds=25"]
    args = fit_args(tiny_model_dir, tmp_path, *COMMON, *strategy, *slow, "--trainer.max_steps", "3")
    done = subprocess.run(args, env=run_env(), capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-4000:]
    assert sorted(read_scalars(tmp_path, "train/loss")) == [0, 1, 2]


def test_judged_results_reach_the_other_ranks_through_the_waiting_broadcast(monkeypatch):
    """EvaluationCallback's judged benchmarks go through rega.distributed.broadcast_from_zero."""
    from rega.callbacks import evaluation

    seen = []
    monkeypatch.setattr(evaluation, "broadcast_from_zero", lambda obj: seen.append(obj) or obj)
    monkeypatch.setattr(evaluation, "run_judge_benchmarks", lambda *args: {"mt_bench": {"score": 7.0}})
    monkeypatch.setattr(evaluation, "judge_problems", lambda *args: [])
    callback = evaluation.EvaluationCallback()
    callback._judge_client = type("Client", (), {"config": None})()

    class Trainer:
        is_global_zero = True

    assert callback._judged(Trainer(), None, "", Path(".")) == {"mt_bench": {"score": 7.0}}
    assert seen == [{"mt_bench": {"score": 7.0}}]


# --- scripts -----------------------------------------------------------------------------------------------


def fake_commands(bin_dir: Path, srun_exit: int) -> Path:
    """``srun`` that exits with ``srun_exit`` and ``scontrol`` that records its arguments, first on PATH."""
    bin_dir.mkdir()
    calls = bin_dir / "calls"
    (bin_dir / "srun").write_text(f"#!/bin/sh\nexit {srun_exit}\n")
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    for name in ("srun", "scontrol"):
        (bin_dir / name).chmod(0o755)
    return calls


@pytest.mark.parametrize("srun_exit", [REQUEUE_EXIT, STOP_EXIT, 0, 1])
def test_slurm_fit_script_requeues_only_after_a_requeue_save(tmp_path, srun_exit):
    calls = fake_commands(tmp_path / "bin", srun_exit)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "1", "SLURM_SUBMIT_DIR": str(REPO)}  # fmt: skip
    done = subprocess.run(
        ["bash", str(REPO / "scripts/slurm_fit.sh")], env=env, capture_output=True, timeout=30
    )
    assert done.returncode == srun_exit, done.stderr.decode()
    requeued = calls.read_text().split("\n") if calls.exists() else []
    assert requeued[:1] == (["requeue 4242"] if srun_exit == REQUEUE_EXIT else [])


def test_torchrun_script_refuses_inside_a_slurm_allocation():
    """Inside an sbatch allocation Lightning prefers the SLURM environment and refuses torchrun's layout."""
    env = {**os.environ, "SLURM_NTASKS": "4"}
    done = subprocess.run(
        ["bash", str(REPO / "scripts/torchrun_fit.sh")], env=env, capture_output=True, timeout=30
    )
    assert done.returncode == 2
    assert "slurm_fit.sh" in done.stderr.decode() and done.stderr.decode().startswith("error:")
