#!/usr/bin/env bash
# Training under SLURM, one task per GPU on every node; Lightning reads ranks and the world from SLURM. Change the
# #SBATCH lines (or sbatch's flags) only: devices and nodes are passed from what SLURM granted. D_g must exist
# first (scripts/slurm_distill.sh); a preempted job is requeued (SIGUSR1) and resumes mid-epoch exactly.
#   sbatch --nodes=2 scripts/slurm_fit.sh --config configs/model/belle_13b.yaml --config configs/trainer/gpu.yaml \
#     --config configs/experiment/paper_zh.yaml --config configs/trainer/fsdp.yaml
#SBATCH --job-name=rega-fit
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=SIGUSR1@120
#SBATCH --requeue
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
srun .venv/bin/python cli.py fit "$@" --trainer.devices "$SLURM_NTASKS_PER_NODE" --trainer.num_nodes "$SLURM_NNODES"
