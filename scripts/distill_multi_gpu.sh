#!/usr/bin/env bash
# Self-distillation on every GPU of a node (each rank generates its own shard; rank 0 merges):
#   scripts/distill_multi_gpu.sh configs/distill/embedded_general_en.yaml
# Several nodes: add --distill.num_nodes N and start it on each node under torchrun/SLURM with a shared output_dir.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python cli.py distill --config "${1:?distill config}" --distill.accelerator cuda \
  --distill.devices "${GPUS:-$(nvidia-smi -L | wc -l)}" --distill.strategy ddp "${@:2}"
