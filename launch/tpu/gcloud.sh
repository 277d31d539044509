# shellcheck shell=bash
# Sourced by every launch/tpu script: settings, the shared flags, and the one way each script
# calls gcloud: every command is printed before it runs, and under --dry-run only printed.
#
# A --dry-run touches nothing, not even to look: existence checks are printed, and a dry run
# goes on as if create.sh's resources did not exist yet and everything else's did.

set -euo pipefail

TPU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$TPU_DIR/../.." && pwd)"
# shellcheck source=launch/tpu/settings.sh
source "$TPU_DIR/settings.sh"

DRY_RUN=0
# Seconds stop.sh gives a job to save its checkpoint after SIGTERM before killing it.
: "${STOP_GRACE_S:=300}"
# The metadata server tells each TPU worker its index and the slice's worker list.
# shellcheck disable=SC2034  # shipped to the workers by remote_vars
METADATA_URL="http://metadata.google.internal/computeMetadata/v1/instance/attributes"

# Run names become file names on the workers.
check_run_name() {
  [[ "$1" =~ ^[A-Za-z0-9._-]+$ ]] || die "--run must be letters, digits, '.', '_' or '-'"
}

die() {
  echo "error: $*" >&2
  exit 2
}

# Print the comment block at the top of the calling script (its usage) and exit.
usage() {
  sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0"
  exit "${1:-0}"
}

# Handle a flag every script accepts; returns 1 when $1 is not one of them.
common_flag() {
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage 0 ;;
    *) return 1 ;;
  esac
}

# The whole command line of a script that takes only the common flags, then the settings check.
only_common_flags() {
  while (($#)); do
    common_flag "$1" || usage 2
    shift
  done
  require_settings
}

require_settings() {
  [[ -n "$PROJECT_ID" ]] || die "set PROJECT_ID (launch/tpu/settings.sh or the environment)"
  [[ "$BUCKET" == gs://?* ]] || die "BUCKET must be a gs:// URL, got '$BUCKET'"
}

# The TPU's location flags, for every gcloud compute tpus call.
tpu_where() {
  printf '%s\n' "--zone=$ZONE" "--project=$PROJECT_ID"
}

show() {
  local q
  printf -v q ' %q' "$@"
  echo "+${q}"
}

# Run a gcloud command that changes something (or, under --dry-run, print it).
gcloud_do() {
  show gcloud "$@"
  if ((DRY_RUN)); then return 0; fi
  gcloud "$@"
}

# Does `gcloud ... describe` succeed? Under --dry-run: print it and answer $1 (0 = yes).
describes() {
  local assume=$1
  shift
  if ((DRY_RUN)); then
    show gcloud "$@"
    return "$assume"
  fi
  gcloud "$@" >/dev/null 2>&1
}

queued_name() { echo "${TPU_NAME}-qr"; }

tpu_exists() {
  local assume=${1:-0}
  local where
  mapfile -t where < <(tpu_where)
  describes "$assume" compute tpus tpu-vm describe "$TPU_NAME" "${where[@]}"
}

# Run a bash script on the TPU's workers (`all` or an index) over gcloud's ssh, all at once.
# The script is printed apart (under --dry-run in full), to be readable.
on_workers() {
  local worker=$1 script=$2 where extra
  mapfile -t where < <(tpu_where)
  read -r -a extra <<<"$SSH_FLAGS"
  local cmd=(compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --worker="$worker" "${extra[@]}")
  local q line
  printf -v q ' %q' gcloud "${cmd[@]}"
  echo "+${q} --command=\"\$SCRIPT\""
  if ((DRY_RUN)); then
    echo "  with SCRIPT ="
    while IFS= read -r line; do echo "  | $line"; done <<<"$script"
    return 0
  fi
  gcloud "${cmd[@]}" --command="$script"
}

# `NAME=VALUE` lines, shell-quoted, that recreate these variables in a remote script. (The
# variables are named, not passed: shellcheck's SC2034 directives mark them where they are set.)
remote_vars() {
  local name
  for name in "$@"; do
    printf '%s=%q\n' "$name" "${!name}"
  done
}

# Lines that start every remote script: strict mode, this worker's index as $WORKER.
remote_prelude() {
  echo 'set -euo pipefail'
  remote_vars METADATA_URL
  # shellcheck disable=SC2016  # expanded on the worker
  echo 'WORKER=$(curl -sf -H "Metadata-Flavor: Google" "$METADATA_URL/agent-worker-number" || echo 0)'
}

# The commit setup.sh ships: HEAD of this checkout.
local_commit() {
  git -C "$REPO_ROOT" rev-parse --verify HEAD 2>/dev/null ||
    die "$REPO_ROOT is not a git checkout with a commit; setup.sh ships HEAD"
}

# A remote script that starts `job` (a bash script) detached on every worker, as run `run`:
# in its own session (setsid) immune to hang-ups, so an ssh drop does not kill it; stdout and
# stderr to ~/$LOG_DIR/RUN.workerN.log; the job's pid in ~/$LOG_DIR/RUN.pid. A run that is
# still going is left alone (so rerunning a launch is harmless). The job is refused when the
# worker's code is not `commit` (the one checked out here): every worker runs the same code.
detached_launch() {
  # shellcheck disable=SC2034  # shipped to the workers by remote_vars
  local run=$1 commit=$2 job=$3
  remote_prelude
  remote_vars run commit REMOTE_DIR LOG_DIR
  cat <<'EOS'
dir="$HOME/$LOG_DIR"
mkdir -p "$dir"
pidfile="$dir/$run.pid"
if [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  echo "worker $WORKER: $run is already running (pid $(cat "$pidfile")); stop.sh to restart it"
  exit 0
fi
have=$(git -C "$HOME/$REMOTE_DIR" rev-parse HEAD 2>/dev/null || echo none)
if [[ "$have" != "$commit" ]]; then
  echo "worker $WORKER: has commit $have, this checkout is at $commit: run setup.sh" >&2
  exit 1
fi
cat >"$dir/$run.job" <<'SEGSR_JOB_EOF'
EOS
  echo "$job"
  cat <<'EOS'
SEGSR_JOB_EOF
log="$dir/$run.worker$WORKER.log"
export WORKER PIDFILE="$pidfile" LOG="$log"
setsid nohup bash "$dir/$run.job" >"$log" 2>&1 </dev/null &
echo "worker $WORKER: started $run, log $log"
EOS
}

# A job (run by detached_launch): enter the code and venv, export the compiler settings, run
# `setup` (a bash snippet: staging data, ...), then `cmd` (words) so that a SIGTERM (stop.sh,
# or a preemption notice) reaches it and it may checkpoint before exiting; then `after` (a
# bash snippet that may read $rc: uploads, cleanup). The job exits with the command's status.
job_script() {
  local setup=$1 after=$2 cmd
  shift 2
  printf -v cmd ' %q' "$@"
  cmd=${cmd# }
  remote_vars REMOTE_DIR VENV LIBTPU_INIT_ARGS TPU_XLA_FLAGS COMPILATION_CACHE
  cat <<'EOS'
set -uo pipefail
echo $$ >"$PIDFILE"
child=
trap '[[ -n "$child" ]] && kill -TERM "$child" 2>/dev/null' TERM INT
cd "$HOME/$REMOTE_DIR" || exit 1
# shellcheck source=/dev/null
source "$HOME/$VENV/bin/activate" || exit 1
export LIBTPU_INIT_ARGS
export XLA_FLAGS="$TPU_XLA_FLAGS"
export JAX_COMPILATION_CACHE_DIR="$COMPILATION_CACHE" SEGSR_JAX_CACHE="$COMPILATION_CACHE"
echo "worker $WORKER: $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD) on $(hostname)"
EOS
  echo "$setup"
  printf 'echo %q\n' "+ $cmd"
  echo "$cmd &"
  cat <<'EOS'
child=$!
# `wait` returns early when the trap runs; keep waiting until the child has really exited.
while :; do
  wait "$child"
  rc=$?
  kill -0 "$child" 2>/dev/null || break
done
echo "worker $WORKER: $(date -u +%FT%TZ) exited with status $rc"
EOS
  echo "$after"
  # shellcheck disable=SC2016  # expanded on the worker
  echo 'rm -f "$PIDFILE"; exit "$rc"'
}
