#!/usr/bin/env bash
# Multi-node training with torchrun (run on every node; NODE_RANK and MASTER_ADDR set per node):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 scripts/torchrun_fit.sh --config configs/model/vicuna_7b.yaml \
#     --config configs/trainer/gpu.yaml --config configs/trainer/ddp.yaml --config configs/experiment/paper_en.yaml
# Under SLURM use scripts/slurm_fit.sh (one task per GPU): Lightning prefers the SLURM environment and refuses
# torchrun's process layout inside an allocation.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${SLURM_NTASKS:-}" ]; then
  echo "error: inside a SLURM job; use scripts/slurm_fit.sh (one task per GPU)" >&2
  exit 2
fi
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
exec .venv/bin/torchrun --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" --nproc-per-node "$GPUS" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
  cli.py fit "$@" --trainer.num_nodes "${NNODES:-1}" --trainer.devices "$GPUS"
