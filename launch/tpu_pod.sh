#!/usr/bin/env bash
# Runs dit_jax on every worker of a Cloud TPU VM slice (one process per host, joined by
# jax.distributed, which reads the slice layout from the TPU runtime: no flags needed).
#
#   export TPU_NAME=dit-v5p-32 ZONE=us-east5-a ACCELERATOR=v5p-32 RUNTIME=v2-alpha-tpuv5
#   launch/tpu_pod.sh create                 # the slice (add SPOT=1 for spot capacity)
#   launch/tpu_pod.sh copy                   # this checkout -> ~/dit_jax on every worker
#   launch/tpu_pod.sh setup                  # uv: Python 3.11 venv + ".[tpu,gcs]" on every worker
#   launch/tpu_pod.sh run --config=configs/dit_imagenet256.py:variant=XL/2 \
#       --workdir=gs://BUCKET/dit_xl2 --config.data.path=gs://BUCKET/imagenet256_latents \
#       --config.parallel.preset=fsdp
#   launch/tpu_pod.sh logs                   # follow worker 0's log (WORKER=3 for another)
#   launch/tpu_pod.sh stop | delete
#
# `run` starts the job in the background on all workers with nohup (log: ~/dit_jax.log), so an
# ssh drop does not kill it; rerunning the same `run` resumes from the newest checkpoint in the
# workdir. Use a gs:// workdir (or a disk every worker shares) on multi-host slices: every host
# writes its shards of each checkpoint. PROJECT=<id> adds --project. DRY_RUN=1 prints the gcloud
# commands instead of running them.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR="${ACCELERATOR:-v5p-8}"
RUNTIME="${RUNTIME:-v2-alpha-tpuv5}"
REMOTE_DIR="${REMOTE_DIR:-dit_jax}"
WORKER="${WORKER:-0}"
project=()
if [[ -n "${PROJECT:-}" ]]; then project=(--project="$PROJECT"); fi

gc() {
  if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' gcloud "$@"
    echo
  else
    gcloud "$@"
  fi
}

on_all() {  # Runs a shell command on every worker of the slice.
  gc compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${project[@]}" --worker=all \
    --command="$1"
}

cmd="${1:-}"
shift || true
case "$cmd" in
  create)
    spot=()
    if [[ -n "${SPOT:-}" ]]; then spot=(--spot); fi
    gc compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" "${project[@]}" \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME" "${spot[@]}"
    ;;
  copy)
    repo="$(cd "$(dirname "$0")/.." && pwd)"
    on_all "mkdir -p ~/$REMOTE_DIR"
    gc compute tpus tpu-vm scp --recurse "$repo/dit_jax" "$repo/configs" "$repo/launch" \
      "$repo/setup.py" "$repo/README.md" "$TPU_NAME:~/$REMOTE_DIR" --zone="$ZONE" \
      "${project[@]}" --worker=all
    ;;
  setup)
    # uv makes the venv with Python $PYTHON (a managed build it downloads where the image has an
    # older python3, as Ubuntu 22.04 TPU runtimes have 3.10) and installs into it.
    on_all "set -e; cd ~/$REMOTE_DIR; export PATH=\$HOME/.local/bin:\$PATH; \
command -v uv >/dev/null || python3 -m pip install -q --user uv || \
curl -LsSf https://astral.sh/uv/install.sh | sh; \
uv venv --python '${PYTHON:-3.11}' .venv; \
uv pip install -q --python .venv/bin/python -e '.[tpu,gcs]'"
    ;;
  run)
    args="$(printf '%q ' "$@")"
    on_all "cd ~/$REMOTE_DIR && nohup .venv/bin/python -m dit_jax.main $args \
> ~/dit_jax.log 2>&1 < /dev/null &"
    ;;
  logs)
    gc compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${project[@]}" --worker="$WORKER" \
      --command="tail -n 200 -f ~/dit_jax.log"
    ;;
  stop)
    on_all "pkill -f 'dit_jax.main' || true"
    ;;
  delete)
    gc compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" "${project[@]}" --quiet
    ;;
  *)
    sed -n '2,22p' "$0"
    exit 2
    ;;
esac
