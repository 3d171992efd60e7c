#!/usr/bin/env bash
# One SLURM array job per grid run, each on one node: the grid is the job's single task, and each run's fit starts
# one process per GPU itself (the grid hides the single-task SLURM layout from it). D_g first, then the grid:
#   jid=$(sbatch --parsable scripts/slurm_distill.sh configs/distill/vicuna_7b_general_en.yaml)
#   sbatch --dependency=afterok:$jid --array=0-12 scripts/slurm_grid.sh configs/grid/paper_en.yaml
# Runs already finished (done.json) are skipped; an interrupted fit resumes from its last.ckpt, and a job that stopped
# after its fit keeps the adapter and evaluates it. Jobs that meet on one
# run take turns (a lock in its folder): a merge job waits for the per-domain jobs it merges instead of training them twice.
#SBATCH --job-name=rega-grid
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
exec .venv/bin/python cli.py grid --config "${1:?grid config}" --index "${SLURM_ARRAY_TASK_ID:?run under sbatch --array}"
