#!/usr/bin/env bash
# Stop a run (or every run) on all workers: SIGTERM first, so the trainer writes a checkpoint
# and a rerun of train.sh resumes from it; SIGKILL to what is left after STOP_GRACE_S seconds.
#
# Usage: launch/tpu/stop.sh [--dry-run] [--run NAME]
#
# Without --run: every run started by train.sh / sample.sh that is still going. Stopping what
# is not running does nothing. The TPU stays (and is billed): delete.sh removes it.

set -euo pipefail
# shellcheck source=launch/tpu/gcloud.sh
source "$(dirname "$0")/gcloud.sh"

run=""
while (($#)); do
  # shellcheck disable=SC2034  # the flags' variables are shipped by remote_vars
  case "$1" in
    --run) run=${2:?}; shift ;;
    --run=*) run=${1#*=} ;;
    *) common_flag "$1" || usage 2 ;;
  esac
  shift
done
require_settings
if [[ -n "$run" ]]; then check_run_name "$run"; fi

script="$(remote_prelude)
$(remote_vars run LOG_DIR STOP_GRACE_S)
$(
  cat <<'EOS'
dir="$HOME/$LOG_DIR"
shopt -s nullglob
if [[ -n "$run" ]]; then pidfiles=("$dir/$run.pid"); else pidfiles=("$dir"/*.pid); fi
stopped=0
for pidfile in "${pidfiles[@]}"; do
  [[ -f "$pidfile" ]] || continue
  name=$(basename "$pidfile" .pid)
  pid=$(cat "$pidfile")
  if ! kill -0 "$pid" 2>/dev/null; then
    rm -f "$pidfile"
    continue
  fi
  echo "worker $WORKER: stopping $name (pid $pid)"
  kill -TERM "$pid"
  for ((i = 0; i < STOP_GRACE_S; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "worker $WORKER: $name still running after ${STOP_GRACE_S}s: killing it" >&2
  fi
  # The job leads its own session and process group (setsid): this also takes whatever it
  # left behind (a child that outlived it), and is a no-op after a clean exit.
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$pidfile"
  stopped=$((stopped + 1))
done
echo "worker $WORKER: stopped $stopped run(s)"
EOS
)"
on_workers all "$script"
