#!/usr/bin/env bash
# Delete the TPU slice (or its queued resource) named in settings.sh, if it exists. The bucket,
# with its checkpoints, data and logs, is kept.
#
# Usage: launch/tpu/delete.sh [--dry-run]
#
# Stop runs first (stop.sh) if you want their last checkpoint: deleting kills them.

set -euo pipefail
# shellcheck source=launch/tpu/gcloud.sh
source "$(dirname "$0")/gcloud.sh"

only_common_flags "$@"
mapfile -t where < <(tpu_where)

if ((QUEUED)); then
  qr=$(queued_name)
  if describes 0 compute tpus queued-resources describe "$qr" "${where[@]}"; then
    # --force deletes the TPU VM that the queued resource holds, too.
    gcloud_do compute tpus queued-resources delete "$qr" "${where[@]}" --force --quiet
  else
    echo "queued resource $qr does not exist: nothing to delete"
  fi
elif tpu_exists 0; then
  gcloud_do compute tpus tpu-vm delete "$TPU_NAME" "${where[@]}" --quiet
else
  echo "TPU $TPU_NAME does not exist in $ZONE: nothing to delete"
fi
