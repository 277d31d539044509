#!/usr/bin/env bash
# Run a segsr_jax command on this host's NVIDIA GPUs: one process that drives every local GPU,
# all of them in one ('data', 'fsdp') mesh.
#
# Usage: launch/gpu/run.sh [--dry-run] [--gpus 0,1,...] COMMAND [ARGS...]
#   COMMAND: train | sample | convert | label | evaluate (python -m segsr_jax.COMMAND ARGS)
#
#   launch/gpu/run.sh train --config configs/small.py --workdir runs/small
#   launch/gpu/run.sh sample --checkpoint CKPT --input photos/ --output out/ --dtype bfloat16
#
# It sources env.sh (memory fraction, XLA flags, compilation cache), says which GPUs it sees,
# prints the settings and the command, and runs it in the foreground: use tmux (or nohup) for
# long runs. --gpus limits it to some GPUs (CUDA_VISIBLE_DEVICES), e.g. to leave one free.
# Do not start one process per GPU: JAX drives all local GPUs from a single process.
# PYTHON picks the interpreter (default: python3).

set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

die() {
  echo "error: $*" >&2
  exit 2
}

dry_run=0 gpus=""
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --gpus) gpus=${2:?--gpus needs a list like 0,1}; shift ;;
    --gpus=*) gpus=${1#*=} ;;
    -h | --help) sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    -*) die "unknown flag $1 (flags for the command go after it)" ;;
    *) break ;;
  esac
  shift
done
(($#)) || die "which command? train, sample, convert, label or evaluate (see --help)"
command=$1
shift
case "$command" in
  train | sample | convert | label | evaluate) ;;
  *) die "unknown command '$command': train, sample, convert, label or evaluate" ;;
esac
if [[ -n "$gpus" ]]; then
  [[ "$gpus" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus takes GPU indices like 0,1,3"
  export CUDA_VISIBLE_DEVICES="$gpus"
fi

# shellcheck source=launch/gpu/env.sh
source "$here/env.sh"

if listing=$(nvidia-smi -L 2>/dev/null) && [[ -n "$listing" ]]; then
  echo "GPUs on this host:"
  echo "$listing"
  if [[ -n "$gpus" ]]; then echo "using GPUs $gpus"; fi
else
  echo "warning: nvidia-smi finds no GPU; JAX will fall back to the CPU" >&2
fi
for name in XLA_PYTHON_CLIENT_MEM_FRACTION XLA_PYTHON_CLIENT_PREALLOCATE XLA_FLAGS \
  JAX_COMPILATION_CACHE_DIR; do
  echo "$name=${!name}"
done
cmd=("${PYTHON:-python3}" -m "segsr_jax.$command" "$@")
printf -v q ' %q' "${cmd[@]}"
echo "+${q}"
if ((dry_run)); then exit 0; fi
exec "${cmd[@]}"
