#!/usr/bin/env bash
# Create the gs:// bucket and the TPU VM slice named in settings.sh (both only if missing).
#
# Usage: launch/tpu/create.sh [--dry-run]
#
# With QUEUED=1 the slice is requested as a queued resource, and this waits (up to
# QUEUED_TIMEOUT_S) until it is ACTIVE; with SPOT=1 it is Spot capacity. Rerunning it when
# everything exists changes nothing.

set -euo pipefail
# shellcheck source=launch/tpu/gcloud.sh
source "$(dirname "$0")/gcloud.sh"

only_common_flags "$@"
mapfile -t where < <(tpu_where)
spot=()
if ((SPOT)); then spot=(--spot); fi

# The bucket in the TPU's region: cross-region reads are slow and billed.
region=${ZONE%-*}
if describes 1 storage buckets describe "$BUCKET" --project="$PROJECT_ID"; then
  echo "bucket $BUCKET exists"
else
  gcloud_do storage buckets create "$BUCKET" --project="$PROJECT_ID" --location="$region" \
    --uniform-bucket-level-access
fi

if ! ((QUEUED)); then
  if tpu_exists 1; then
    echo "TPU $TPU_NAME exists in $ZONE"
  else
    gcloud_do compute tpus tpu-vm create "$TPU_NAME" "${where[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${spot[@]}"
  fi
  exit 0
fi

qr=$(queued_name)
if describes 1 compute tpus queued-resources describe "$qr" "${where[@]}"; then
  echo "queued resource $qr exists"
else
  gcloud_do compute tpus queued-resources create "$qr" "${where[@]}" --node-id="$TPU_NAME" \
    --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "${spot[@]}"
fi
if ((DRY_RUN)); then exit 0; fi

deadline=$((SECONDS + QUEUED_TIMEOUT_S))
while :; do
  state=$(gcloud compute tpus queued-resources describe "$qr" "${where[@]}" \
    --format='value(state.state)')
  case "$state" in
    ACTIVE)
      echo "queued resource $qr is ACTIVE: TPU $TPU_NAME is ready"
      exit 0
      ;;
    FAILED | SUSPENDED | SUSPENDING)
      die "queued resource $qr is $state (see: gcloud compute tpus queued-resources" \
        "describe $qr ${where[*]}); delete.sh, then create.sh again"
      ;;
  esac
  ((SECONDS < deadline)) || die "queued resource $qr still $state after ${QUEUED_TIMEOUT_S}s;" \
    "it stays queued: rerun create.sh to keep waiting, or delete.sh to give up"
  echo "queued resource $qr: $state; waiting"
  sleep "$QUEUED_POLL_S"
done
