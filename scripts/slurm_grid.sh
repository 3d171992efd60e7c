#!/usr/bin/env bash
# One SLURM array job per grid run, each on one node with all its GPUs (DDP through Lightning):
#   sbatch --array=0-12 scripts/slurm_grid.sh configs/grid/paper_en.yaml
# Runs already finished (done.json) are skipped, an interrupted fit resumes from its last.ckpt.
#SBATCH --job-name=rega-grid
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
# The grid's fit stage runs `python cli.py fit` as a child; Lightning launches one process per GPU itself.
exec .venv/bin/python cli.py grid --config "${1:?grid config}" --index "${SLURM_ARRAY_TASK_ID:?run under sbatch --array}"
