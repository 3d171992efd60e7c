#!/usr/bin/env bash
# Self-distillation (D_g) under SLURM, one task per GPU on every node: rank r answers instructions i % world == r
# into its own shard, rank 0 merges; output_dir must be on a filesystem every node shares. Run it before the fits
# that read it (sbatch --dependency=afterok:JOBID ...); a rerun generates only what is missing.
#   sbatch scripts/slurm_distill.sh configs/distill/vicuna_7b_general_en.yaml
#SBATCH --job-name=rega-distill
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
srun .venv/bin/python cli.py distill --distill "${1:?distill config}" "${@:2}" --distill.accelerator cuda \
  --distill.strategy ddp --distill.devices "$SLURM_NTASKS_PER_NODE" --distill.num_nodes "$SLURM_NNODES"
