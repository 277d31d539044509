#!/usr/bin/env bash
# Super-resolve a folder of images on every worker of the TPU slice at once, detached.
#
# Usage: launch/tpu/sample.sh [--dry-run] --checkpoint CKPT --input DIR --output gs://DIR
#                             [--run NAME] [-- more segsr_jax.sample flags]
#
# CKPT and DIR are gs:// folders (mirrored to each worker) or paths on the workers. The images
# are split over the workers (worker i of n takes every n-th file in name order); each worker
# runs `python -m segsr_jax.sample` on its share as a single-host job (SAMPLE_TPU_ENV makes its
# chips a slice of their own) and uploads NAME_sr.png, NAME_seg.png, NAME_seg_labels.png and
# NAME_sheet.png to the gs:// output, plus its log to OUTPUT/logs/. RUN defaults to `sample`;
# follow it with `logs.sh --run RUN`. A rerun on the same workers skips finished images.

set -euo pipefail
# shellcheck source=launch/tpu/gcloud.sh
source "$(dirname "$0")/gcloud.sh"

checkpoint="" input="" output="" run=sample args=()
while (($#)); do
  case "$1" in
    --checkpoint) checkpoint=${2:?}; shift ;;
    --checkpoint=*) checkpoint=${1#*=} ;;
    --input) input=${2:?}; shift ;;
    --input=*) input=${1#*=} ;;
    --output) output=${2:?}; shift ;;
    --output=*) output=${1#*=} ;;
    --run) run=${2:?}; shift ;;
    --run=*) run=${1#*=} ;;
    --) shift; args+=("$@"); break ;;
    *) common_flag "$1" || usage 2 ;;
  esac
  shift
done
require_settings
commit=$(local_commit)
[[ -n "$checkpoint" && -n "$input" ]] || die "--checkpoint and --input are required"
[[ "$output" == gs://?* ]] || die "--output must be a gs:// folder (the workers' outputs meet there)"
check_run_name "$run"

stage="$SAMPLE_STAGE_DIR/$run"
ckpt_local=$checkpoint inputs_local=$input
if [[ "$checkpoint" == gs://* ]]; then ckpt_local="$stage/checkpoint"; fi
# shellcheck disable=SC2034  # shipped to the workers by remote_vars
if [[ "$input" == gs://* ]]; then inputs_local="$stage/inputs"; fi
# The job's first part, on each worker: mirror what is on gs://, take this worker's share.
setup="$(remote_vars checkpoint input output stage ckpt_local inputs_local SAMPLE_TPU_ENV \
  METADATA_URL)
$(
  cat <<'EOS'
mirror() {
  if [[ "$1" == gs://* ]]; then
    mkdir -p "$2" && gcloud storage rsync --recursive --quiet "$1" "$2"
  fi
}
mirror "$checkpoint" "$ckpt_local" || exit 1
mirror "$input" "$inputs_local" || exit 1
workers=$(curl -sf -H "Metadata-Flavor: Google" "$METADATA_URL/worker-network-endpoints" |
  tr ',' '\n' | grep -c . || true)
((workers > 0)) || workers=1
rm -rf "$stage/shard"
mkdir -p "$stage/shard" "$stage/out"
i=0 mine=0
while IFS= read -r -d '' f; do
  if ((i % workers == WORKER)); then
    ln -s "$f" "$stage/shard/"
    mine=$((mine + 1))
  fi
  i=$((i + 1))
done < <(find "$inputs_local" -maxdepth 1 -type f -print0 | sort -z)
echo "worker $WORKER: $mine of the $i files in $input"
if ((mine == 0)); then
  rm -f "$PIDFILE"
  exit 0
fi
for kv in $SAMPLE_TPU_ENV; do export "${kv?}"; done
EOS
)"
after="gcloud storage rsync --recursive --quiet \"\$stage/out\" \"\$output\"
gcloud storage cp --quiet \"\$LOG\" \"\$output/logs/worker\$WORKER.log\""

job=$(job_script "$setup" "$after" python -m segsr_jax.sample --checkpoint "$ckpt_local" \
  --input "$stage/shard" --output "$stage/out" "${args[@]}")
echo "run $run: $input -> $output"
launch=$(detached_launch "$run" "$commit" "$job")
on_workers all "$launch"
