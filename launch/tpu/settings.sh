# shellcheck shell=bash
# Settings of the TPU scripts: edit the defaults here, or override any of them from the
# environment (`ZONE=europe-west4-a launch/tpu/create.sh`), or keep several setups in your own
# files and point SEGSR_TPU_SETTINGS at one (it is sourced first, so its values win over the
# defaults below but not over the environment).
# Variable names follow Google's Cloud TPU documentation.

if [[ -n "${SEGSR_TPU_SETTINGS:-}" ]]; then
  # shellcheck source=/dev/null
  source "$SEGSR_TPU_SETTINGS"
fi

# --- where the TPU lives -------------------------------------------------------------------
: "${PROJECT_ID:=}"                       # required: your Google Cloud project
: "${ZONE:=us-central2-b}"
: "${TPU_NAME:=segsr}"
: "${ACCELERATOR_TYPE:=v4-32}"            # v4-32 = 16 chips on 4 hosts (workers)
: "${RUNTIME_VERSION:=tpu-ubuntu2204-base}"  # v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5
# QUEUED=1 asks for the slice through a queued resource (waits for capacity instead of
# failing); SPOT=1 takes cheaper preemptible capacity (the trainer checkpoints on SIGTERM, and
# rerunning train.sh resumes from the last checkpoint).
: "${QUEUED:=0}"
: "${SPOT:=0}"
: "${QUEUED_TIMEOUT_S:=3600}"             # how long create.sh waits for a queued slice
: "${QUEUED_POLL_S:=30}"                  # and how often it looks
# Extra flags for every `gcloud compute tpus tpu-vm ssh` (e.g. "--internal-ip" from a VM in
# the same VPC, or "--tunnel-through-iap").
: "${SSH_FLAGS:=}"

# --- storage: checkpoints, logs and data live on gs:// -------------------------------------
: "${BUCKET:=gs://${PROJECT_ID}-segsr}"   # in ZONE's region (create.sh makes it)
: "${RUNS_DIR:=$BUCKET/runs}"             # train.sh: --workdir $RUNS_DIR/RUN
: "${DATA_GCS:=}"                         # gs:// folder mirrored to each worker before training
: "${DATA_LOCAL:=/tmp/segsr_data}"        # where workers keep their copy of DATA_GCS
: "${DATA_FLAG:=--config.data.path}"      # the trainer flag that gets DATA_LOCAL
: "${SAMPLE_STAGE_DIR:=/tmp/segsr_sample}"  # sample.sh: workers' copies of inputs and outputs

# --- the code on the workers ---------------------------------------------------------------
# setup.sh ships the commit checked out here (`git bundle`, so private and unpushed commits
# work) and installs it into a venv with the TPU build of jax.
: "${COMMIT:=}"                           # empty: HEAD of this checkout
: "${REMOTE_DIR:=segsr_jax}"              # on each worker, relative to the home directory
: "${VENV:=segsr_venv}"                   # likewise
: "${PYTHON:=python3.11}"                 # segsr_jax needs >= 3.11; Ubuntu 22.04 ships 3.10
: "${JAX_TPU_SPEC:=jax[tpu]}"             # pip requirement for jax + libtpu
# More pip requirements (space-separated): gcsfs (the `gcs` extra) is what lets Orbax
# checkpoints, the trainer's logs and tokenizer copy, and the compilation cache use gs:// paths
# (without it the trainer stops at start-up asking for it).
: "${PIP_EXTRAS:=gcsfs}"
: "${LOG_DIR:=segsr_logs}"                # per-worker logs, relative to the home directory

# --- compiler flags ------------------------------------------------------------------------
# Overlap the FSDP all-gathers / reduce-scatters of the sharded UNet and ControlNet with
# compute (the collective-matmul / async-collective settings MaxText uses on v4 and v5).
# libtpu refuses flags it does not know: set LIBTPU_INIT_ARGS="" if a new runtime drops one.
: "${LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true \
--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true \
--xla_tpu_enable_async_collective_fusion_multiple_steps=true \
--xla_tpu_overlap_compute_collective_tc=true \
--xla_enable_async_all_gather=true}"
: "${TPU_XLA_FLAGS=}"                     # exported as XLA_FLAGS on the workers
# A restarted or resumed job reuses compiled programs instead of compiling for minutes.
: "${COMPILATION_CACHE:=$BUCKET/xla_cache}"
# sample.sh runs one independent sampler per worker. On a multi-host slice the TPU runtime
# otherwise waits for every host to join one program; these make each host a slice of its own.
: "${SAMPLE_TPU_ENV=TPU_PROCESS_BOUNDS=1,1,1 TPU_HOST_BOUNDS=1,1,1}"
