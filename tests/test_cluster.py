"""Multi-process training without a GPU: DDP and FSDP2 over gloo with 2 CPU processes (``cli.py fit`` as a user
runs it), per-domain validation that does not depend on the number of ranks, exact mid-epoch resume, refusals
that come before training, and the SLURM scripts' task layout under a simulated SLURM environment."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest
import torch
from cluster_helpers import assert_trains_like_ddp, fit_args, last_lora_state, read_scalars, run_env

from rega.cli import main

REPO = Path(__file__).resolve().parent.parent
DDP = ["--config", str(REPO / "configs/trainer/ddp_cpu.yaml")]
FSDP2 = [
    "--config",
    str(REPO / "configs/trainer/fsdp.yaml"),
    "--trainer.accelerator",
    "cpu",
    "--trainer.devices",
    "2",
]
STEP_CHECKPOINTS = ["--config", str(REPO / "tests/configs/step_checkpoints.yaml")]
NO_VAL = ["--trainer.limit_val_batches", "0"]


def fit(tiny_model_dir: Path, root: Path, cache: Path, *extra: str, returncode: int = 0) -> Path:
    done = subprocess.run(
        fit_args(tiny_model_dir, root, *extra, cache=cache), env=run_env(), capture_output=True, timeout=900
    )
    assert done.returncode == returncode, done.stderr.decode()[-4000:]
    return root


def kill_at(step: int) -> list[str]:
    return ["--trainer.callbacks+=cluster_helpers.ExitAtStep", f"--trainer.callbacks.step={step}"]


def test_fsdp2_trains_like_ddp_clips_by_the_global_norm_and_resumes_exactly(tiny_model_dir, tmp_path):
    """FSDP2 over 2 gloo ranks against DDP over 2 ranks on the same batches, LoRA init and dropout masks: per-step
    loss and gradient norm agree (the norm of all shards together, clipped), its checkpoint holds every LoRA
    tensor whole, and a run killed after step 2 and resumed continues the same loss curve."""
    cache = tmp_path / "cache"
    common = [*NO_VAL, *STEP_CHECKPOINTS, "--trainer.max_steps", "4", "--model.max_grad_norm", "0.05"]
    single = fit(tiny_model_dir, tmp_path / "single", cache, *NO_VAL, "--trainer.max_steps", "1")
    ddp = fit(tiny_model_dir, tmp_path / "ddp", cache, *DDP, *common)
    fsdp = fit(tiny_model_dir, tmp_path / "fsdp", cache, *FSDP2, *common)

    fsdp_state = assert_trains_like_ddp(ddp, fsdp, steps=4)
    # Rank 0's first batch is the single process's first batch: the same loss before any update.
    ddp_first = read_scalars(ddp, "train/loss")[0]
    assert ddp_first == pytest.approx(read_scalars(single, "train/loss")[0], rel=1e-6)
    from safetensors.torch import load_file

    adapter = load_file(fsdp / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == len(fsdp_state) and any(
        v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k
    )

    broken = fit(tiny_model_dir, tmp_path / "broken", cache, *FSDP2, *common, *kill_at(3), returncode=17)
    checkpoint = next(broken.rglob("last.ckpt"))
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 2
    fit(tiny_model_dir, broken, cache, *FSDP2, *common, "--ckpt_path", str(checkpoint))
    resumed, uninterrupted = read_scalars(broken, "train/loss"), read_scalars(fsdp, "train/loss")
    for step in (2, 3):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-5), step


def test_fsdp2_shards_a_bf16_base_beside_fp32_lora_with_activation_checkpointing(tiny_model_dir, tmp_path):
    """The shipped GPU dtypes (frozen bf16 base, fp32 LoRA in the same unit), which FSDP1 refused, on 2 ranks."""
    extra = ["--model.model.dtype", "bfloat16", "--model.model.gradient_checkpointing", "true"]
    root = fit(
        tiny_model_dir, tmp_path, tmp_path / "cache", *FSDP2, *NO_VAL, "--trainer.max_steps", "2", *extra
    )
    state = last_lora_state(root)
    assert state and all(t.dtype == torch.float32 for t in state.values())
    assert all(math.isfinite(v) for v in read_scalars(root, "train/loss").values())
    summary = json.loads(next(root.rglob("summary.json")).read_text())
    assert summary["optimizer_steps"] == 2


def test_ddp_resumes_mid_epoch_exactly(tiny_model_dir, tmp_path):
    """2 ranks killed after a checkpoint in the middle of the second epoch: the resumed run trains exactly the
    batches not yet seen and reproduces the uninterrupted run's losses."""
    cache = tmp_path / "cache"
    common = [*DDP, *NO_VAL, *STEP_CHECKPOINTS, "--trainer.max_epochs", "2"]
    full = fit(tiny_model_dir, tmp_path / "full", cache, *common)
    reference = read_scalars(full, "train/loss")
    per_epoch = len(reference) // 2
    assert per_epoch % 2 == 1  # the checkpoint at step per_epoch + 1 is inside epoch 1

    broken = fit(tiny_model_dir, tmp_path / "broken", cache, *common, *kill_at(per_epoch + 2), returncode=17)
    checkpoint = next(broken.rglob("last.ckpt"))
    state = torch.load(checkpoint, weights_only=False)
    assert (state["global_step"], state["epoch"]) == (per_epoch + 1, 1)
    fit(tiny_model_dir, broken, cache, *common, "--ckpt_path", str(checkpoint))
    resumed = read_scalars(broken, "train/loss")
    assert sorted(resumed) == sorted(reference)
    for step, loss in reference.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step


def validate(tiny_model_dir: Path, root: Path, *extra: str) -> dict[str, float]:
    args = fit_args(tiny_model_dir, root, *extra)
    args[args.index("fit")] = "validate"
    args = [a for a in args if not a.startswith("--model.adapter_dir")]
    args.remove(str(root / "adapter"))
    done = subprocess.run(args, env=run_env(), capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-4000:]
    return {tag: next(iter(read_scalars(root, tag).values())) for tag in VAL_TAGS if read_scalars(root, tag)}


VAL_TAGS = ["val/loss", "val/loss_medical", "val/loss_legal", "val/loss_finance"]


def test_validation_loss_per_domain_does_not_depend_on_the_number_of_ranks(tiny_model_dir, tmp_path):
    """One validation item per domain, one per batch: over 2 ranks, rank 0 sees medical and finance, rank 1 legal
    and an empty stand-in batch. Sums and counts reduced once give the single process's values."""
    one_each = json.dumps([{"path": f"demo:{d}.jsonl", "limit": 1} for d in ("medical", "legal", "finance")])
    data = ["--data.val", one_each, "--data.batch_size", "1", "--data.val_limit_per_task", "1"]
    single = validate(tiny_model_dir, tmp_path / "single", *data)
    ranks = validate(tiny_model_dir, tmp_path / "ranks", *data, *DDP)
    assert single.keys() == set(VAL_TAGS)
    assert ranks.keys() == single.keys()
    for tag, value in single.items():
        assert ranks[tag] == pytest.approx(value, rel=1e-6), tag
    per_domain = [single[t] for t in VAL_TAGS[1:]]
    assert min(per_domain) < single["val/loss"] < max(per_domain)


def test_multi_process_fit_without_distilled_data_refuses_in_one_line(tiny_model_dir, tmp_path, capsys):
    """A fit on 2 processes does not distil D_g on one rank while the other waits: it names the command."""
    args = fit_args(tiny_model_dir, tmp_path, *DDP)[2:]
    distill = ["--data.corpus.general", "[]", "--data.distill", str(REPO / "configs/distill/demo.yaml"),
               "--data.distill.output_dir", str(tmp_path / "no_dg")]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main([*args, *distill])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(err) == 1 and "fit on 2 processes" in err[0] and "cli.py distill --distill" in err[0]
    assert not (tmp_path / "no_dg").exists()


def test_evaluation_callback_is_refused_under_fsdp_before_training():
    from rega.callbacks.evaluation import EvaluationCallback
    from rega.errors import ConfigError
    from rega.modules.fsdp import FSDP2Strategy

    class Trainer:
        strategy = FSDP2Strategy()

    with pytest.raises(ConfigError, match="rega evaluate|cli.py evaluate"):
        EvaluationCallback().setup(Trainer(), None, "fit")


# --- SLURM ---------------------------------------------------------------------------------------------------


def sbatch_options(script: Path) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", script.read_text(), flags=re.M))


def slurm_env(monkeypatch, nodes: int, tasks_per_node: int) -> None:
    """The variables srun sets for task 0 of such an allocation (those Lightning reads)."""
    for key, value in {
        "SLURM_NTASKS": nodes * tasks_per_node, "SLURM_NTASKS_PER_NODE": tasks_per_node, "SLURM_NNODES": nodes,
        "SLURM_JOB_NUM_NODES": nodes, "SLURM_NODELIST": f"node[1-{nodes}]", "SLURM_JOB_ID": 42,
        "SLURM_JOB_NAME": "rega", "SLURM_PROCID": 0, "SLURM_LOCALID": 0, "SLURM_NODEID": 0,
    }.items():  # fmt: skip
        monkeypatch.setenv(key, str(value))


def make_trainer(devices, num_nodes: int, strategy):
    """A Trainer as the fit would build it, with the layout check Lightning makes before starting processes."""
    import lightning as L

    trainer = L.Trainer(
        accelerator="cpu", devices=devices, num_nodes=num_nodes, strategy=strategy, logger=False
    )
    trainer.strategy.cluster_environment.validate_settings(trainer.num_devices, trainer.num_nodes)
    return trainer


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_slurm_fit_script_layout_is_accepted(monkeypatch, strategy):
    """slurm_fit.sh passes what SLURM granted (tasks per node, nodes) as devices and num_nodes."""
    from lightning.fabric.plugins.environments import SLURMEnvironment
    from lightning.pytorch.strategies import DDPStrategy

    from rega.modules.fsdp import FSDP2Strategy

    script = REPO / "scripts/slurm_fit.sh"
    text = script.read_text()
    assert '--trainer.devices "$SLURM_NTASKS_PER_NODE" --trainer.num_nodes "$SLURM_NNODES"' in text
    assert re.search(r"^srun ", text, flags=re.M)
    tasks = int(sbatch_options(script)["ntasks-per-node"])
    assert tasks == int(sbatch_options(script)["gpus-per-node"])
    slurm_env(monkeypatch, nodes=2, tasks_per_node=tasks)
    trainer = make_trainer(tasks, 2, DDPStrategy() if strategy == "ddp" else FSDP2Strategy())
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    assert trainer.world_size == 2 * tasks


def test_slurm_grid_fits_start_their_own_processes(monkeypatch):
    """slurm_grid.sh runs the grid as the job's one task; its fits see no task layout and start one process per
    GPU. Without that, Lightning refuses the layout (the failure the script had)."""
    from lightning.fabric.plugins.environments import LightningEnvironment

    from rega.experiments.grid import stage_env

    options = sbatch_options(REPO / "scripts/slurm_grid.sh")
    assert options["ntasks-per-node"] == "1"
    gpus = int(options["gpus-per-node"])
    slurm_env(monkeypatch, nodes=1, tasks_per_node=1)
    with pytest.raises(ValueError, match="ntasks-per-node"):
        make_trainer(gpus, 1, "ddp")
    import os

    for key in set(os.environ) - set(stage_env(os.environ)):
        monkeypatch.delenv(key)
    trainer = make_trainer(gpus, 1, "ddp")
    assert isinstance(trainer.strategy.cluster_environment, LightningEnvironment)


def test_slurm_distill_script_layout_is_accepted(monkeypatch):
    from lightning.fabric import Fabric
    from lightning.fabric.plugins.environments import SLURMEnvironment

    script = REPO / "scripts/slurm_distill.sh"
    assert (
        '--distill.devices "$SLURM_NTASKS_PER_NODE" --distill.num_nodes "$SLURM_NNODES"' in script.read_text()
    )
    tasks = int(sbatch_options(script)["ntasks-per-node"])
    slurm_env(monkeypatch, nodes=2, tasks_per_node=tasks)
    fabric = Fabric(accelerator="cpu", devices=tasks, num_nodes=2, strategy="ddp")
    assert isinstance(fabric._connector.cluster_environment, SLURMEnvironment)
    assert fabric.world_size == 2 * tasks
