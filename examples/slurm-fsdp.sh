#!/bin/bash
# Train a fitune recipe sharded with FSDP2 over every GPU of several SLURM nodes.
#   sbatch --nodes 2 examples/slurm-fsdp.sh recipe.yaml [more fitune train options]
# One torchrun agent per node starts one process per GPU; the first node hosts the rendezvous.
#SBATCH --job-name=fitune
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
set -euo pipefail

RECIPE=${1:?usage: sbatch --nodes N examples/slurm-fsdp.sh RECIPE.yaml [fitune train options]}
shift
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}

srun torchrun \
  --nnodes "$SLURM_NNODES" \
  --nproc-per-node "$GPUS_PER_NODE" \
  --rdzv-backend c10d \
  --rdzv-endpoint "$HEAD_NODE:29500" \
  --rdzv-id "$SLURM_JOB_ID" \
  -m fitune train "$RECIPE" --no-progress "$@"
