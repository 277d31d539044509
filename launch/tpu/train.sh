#!/usr/bin/env bash
# Start training on every worker of the TPU slice at once, detached from this terminal.
#
# Usage: launch/tpu/train.sh [--dry-run] --config configs/NAME.py[:STAGE] [--run RUN]
#                            [--config.FIELD=VALUE ...] [-- more trainer flags]
#
# Each worker runs `python -m segsr_jax.train --distributed --config configs/NAME.py[:STAGE]
# --workdir $RUNS_DIR/RUN [--config.FIELD=VALUE ...]` (RUN defaults to NAME or NAME-STAGE);
# the workers find each other through jax.distributed. Checkpoints, TensorBoard events and
# metrics go to that gs:// workdir, so rerunning the same command after a stop or a preemption
# resumes from the last checkpoint. If DATA_GCS is set, each worker first mirrors it to
# DATA_LOCAL (incremental) and the trainer gets $DATA_FLAG=$DATA_LOCAL.
# Follow it with logs.sh, end it with stop.sh. A run still going is left alone.

set -euo pipefail
# shellcheck source=launch/tpu/gcloud.sh
source "$(dirname "$0")/gcloud.sh"

config="" run="" args=()
while (($#)); do
  case "$1" in
    --config) config=${2:?--config needs a file}; shift ;;
    --config=*) config=${1#*=} ;;
    --run) run=${2:?--run needs a name}; shift ;;
    --run=*) run=${1#*=} ;;
    --config.*=*) args+=("$1") ;;
    --) shift; args+=("$@"); break ;;
    *) common_flag "$1" || usage 2 ;;
  esac
  shift
done
require_settings
commit=$(local_commit)
[[ -n "$config" ]] || die "--config configs/NAME.py is required"
config_file=${config%%:*}
[[ -f "$REPO_ROOT/$config_file" ]] ||
  die "no config file $config_file (a path relative to $REPO_ROOT)"
if [[ -z "$run" ]]; then
  run=$(basename "$config_file" .py)
  if [[ "$config" == *:* ]]; then run="$run-${config#*:}"; fi
fi
check_run_name "$run"
workdir="$RUNS_DIR/$run"

setup=""
if [[ -n "$DATA_GCS" ]]; then
  setup="$(remote_vars DATA_GCS DATA_LOCAL)
mkdir -p \"\$DATA_LOCAL\"
gcloud storage rsync --recursive --quiet \"\$DATA_GCS\" \"\$DATA_LOCAL\" || exit 1"
  args+=("$DATA_FLAG=$DATA_LOCAL")
fi
# Each worker's log ends up next to the checkpoints, also when the run fails.
after="$(remote_vars workdir)
gcloud storage cp --quiet \"\$LOG\" \"\$workdir/logs/worker\$WORKER.log\""

job=$(job_script "$setup" "$after" python -m segsr_jax.train --distributed \
  --config "$config" --workdir "$workdir" "${args[@]}")
echo "run $run: workdir $workdir"
launch=$(detached_launch "$run" "$commit" "$job")
on_workers all "$launch"
