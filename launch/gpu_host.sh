#!/usr/bin/env bash
# Runs dit_jax on one GPU host (all its GPUs in one process), or as one node of a multi-node
# GPU job.
#
#   pip install -e ".[gpu]"
#   launch/gpu_host.sh --config=configs/dit_imagenet256.py:variant=XL/2 --workdir=/ckpt/dit_xl2 \
#       --config.data.path=/data/imagenet256_latents
#
# Several nodes without SLURM: on node i of N (node 0 listens at COORDINATOR=host:port):
#   COORDINATOR=node0:12345 NUM_NODES=N NODE_RANK=i launch/gpu_host.sh --config=... --workdir=...
# Under SLURM (srun, one task per node), jax.distributed finds the layout by itself: no variables.
# Set CUDA_VISIBLE_DEVICES to use fewer GPUs; the mesh fills the devices it sees.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi > /dev/null || ! nvidia-smi -L > /dev/null 2>&1; then
  echo "launch/gpu_host.sh: no NVIDIA GPU visible (nvidia-smi failed); for a CPU run use" \
    "python -m dit_jax.main directly." >&2
  exit 1
fi
nvidia-smi -L

# Let XLA take most of the GPU memory up front (default 75%) and overlap collectives with compute.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"

dist=()
if [[ -n "${COORDINATOR:-}" ]]; then
  dist=(--coordinator_address="$COORDINATOR" --num_processes="${NUM_NODES:?set NUM_NODES}"
    --process_id="${NODE_RANK:?set NODE_RANK}")
fi
exec python -m dit_jax.main "$@" "${dist[@]}"
