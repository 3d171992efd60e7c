#!/usr/bin/env bash
# Training under SLURM, one task per GPU on every node; Lightning reads ranks and the world from SLURM. Change the
# #SBATCH lines (or sbatch's flags) only: devices and nodes are passed from what SLURM granted. D_g must exist
# first (scripts/slurm_distill.sh).
#   sbatch --nodes=2 scripts/slurm_fit.sh --config configs/model/belle_13b.yaml --config configs/trainer/gpu.yaml \
#     --config configs/experiment/paper_zh.yaml --config configs/trainer/fsdp.yaml
# Preemption (rega/callbacks/preemption.py): SIGUSR1 (120 s before the time limit; leave room for one step and a
# save) or SIGTERM only sets a flag; all ranks save at the next step boundary and exit 75 (SIGUSR1) or 143
# (SIGTERM). On 75 this script requeues the job, which keeps its id and resumes from that checkpoint by itself.
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
# On scancel or preemption SLURM sends SIGTERM to this shell too: stay, so that the ranks can finish their save.
trap 'echo "slurm_fit.sh: SIGTERM; waiting for the ranks to save" >&2' TERM
status=0
srun .venv/bin/python cli.py fit "$@" --trainer.devices "$SLURM_NTASKS_PER_NODE" --trainer.num_nodes "$SLURM_NNODES" \
  || status=$?
if [ "$status" -eq 75 ]; then
  job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID:-}}
  job=${job:-$SLURM_JOB_ID}
  echo "slurm_fit.sh: saved at a step boundary; requeueing job $job" >&2
  scontrol requeue "$job"
fi
exit "$status"
