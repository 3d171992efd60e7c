#!/usr/bin/env bash
# Self-distillation on every GPU of this node (each rank generates its own shard; rank 0 merges):
#   scripts/distill_multi_gpu.sh configs/distill/vicuna_7b_general_en.yaml
# Under SLURM use scripts/slurm_distill.sh (one task per GPU), which Lightning's SLURM detection expects.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${SLURM_NTASKS:-}" ]; then
  echo "error: inside a SLURM job; use scripts/slurm_distill.sh (one task per GPU)" >&2
  exit 2
fi
exec .venv/bin/python cli.py distill --distill "${1:?distill config}" --distill.accelerator cuda \
  --distill.devices "${GPUS:-$(nvidia-smi -L | wc -l)}" --distill.strategy ddp "${@:2}"
