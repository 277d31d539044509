#!/usr/bin/env bash
# Show a run's log on one worker or on all of them, and follow it as it grows (Ctrl-C stops
# watching, not the run). Lines are prefixed with the worker's index.
#
# Usage: launch/tpu/logs.sh [--dry-run] [--run NAME] [--worker=N|all] [--lines N] [--no-follow]
#
# Without --run: the run whose log changed last on that worker. Worker 0 (the default) is the
# one that logs metrics in multi-host training; the others show their own errors. The same
# logs are copied to the run's gs:// folder (WORKDIR/logs/) when a run ends.

set -euo pipefail
# shellcheck source=launch/tpu/gcloud.sh
source "$(dirname "$0")/gcloud.sh"

run="" worker=0 lines=100 follow=1
while (($#)); do
  # shellcheck disable=SC2034  # the flags' variables are shipped by remote_vars
  case "$1" in
    --run) run=${2:?}; shift ;;
    --run=*) run=${1#*=} ;;
    --worker) worker=${2:?}; shift ;;
    --worker=*) worker=${1#*=} ;;
    --lines) lines=${2:?}; shift ;;
    --lines=*) lines=${1#*=} ;;
    --no-follow) follow=0 ;;
    *) common_flag "$1" || usage 2 ;;
  esac
  shift
done
require_settings
if [[ -n "$run" ]]; then check_run_name "$run"; fi
[[ "$worker" =~ ^(all|[0-9]+)$ ]] || die "--worker must be a worker index or 'all'"
[[ "$lines" =~ ^[0-9]+$ ]] || die "--lines must be a number"

script="$(remote_prelude)
$(remote_vars run lines follow LOG_DIR)
$(
  cat <<'EOS'
dir="$HOME/$LOG_DIR"
if [[ -n "$run" ]]; then
  log="$dir/$run.worker$WORKER.log"
else
  log=$(find "$dir" -maxdepth 1 -name '*.log' -printf '%T@ %p\n' 2>/dev/null |
    sort -rn | head -n 1 | cut -d' ' -f2-)
fi
if [[ -z "$log" || ! -f "$log" ]]; then
  echo "[worker $WORKER] no log ${run:+for run $run }in $dir" >&2
  exit 1
fi
opts=(-n "$lines")
if ((follow)); then opts+=(-F); fi
tail "${opts[@]}" "$log" | sed -u "s/^/[worker $WORKER] /"
EOS
)"
on_workers "$worker" "$script"
