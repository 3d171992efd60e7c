#!/usr/bin/env bash
# Multi-node training under SLURM: one task per GPU, Lightning reads the SLURM environment.
#   sbatch --nodes=2 scripts/slurm_fit.sh --config configs/model/vicuna_7b.yaml --config configs/trainer/gpu.yaml \
#     --config configs/trainer/fsdp.yaml --config configs/experiment/paper_en.yaml --trainer.num_nodes 2
#SBATCH --job-name=rega-fit
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
# prepare_data (distillation, tokenization) runs on each node's first rank while the others wait; its outputs
# are keyed caches, so with a shared filesystem the second node finds them done.
srun .venv/bin/python cli.py fit "$@" --trainer.devices 4
