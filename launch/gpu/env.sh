# shellcheck shell=bash
# The environment for segsr_jax on NVIDIA GPUs: one process sees every local GPU and puts them
# all in one ('data', 'fsdp') mesh. Sourced by run.sh; source it yourself for a notebook or
# your own launcher. Values already set in your environment win; your XLA_FLAGS are kept and
# these are appended.

# --- memory --------------------------------------------------------------------------------
# JAX reserves a fraction of each GPU's memory at start-up and runs its own allocator in it.
# The default (0.75) leaves a quarter idle; a training or sampling job that owns the GPU can
# take more, which is the difference between fitting a 512x512 batch or not. Lower it (or set
# XLA_PYTHON_CLIENT_PREALLOCATE=false, which allocates on demand and fragments more) when
# another process shares the GPU, e.g. a notebook next to a job.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-true}"

# --- compiler ------------------------------------------------------------------------------
segsr_gpu_xla_flags=(
  # Schedule the FSDP all-gathers and gradient reduce-scatters so they overlap with compute
  # instead of stalling it (the single biggest multi-GPU setting for sharded UNet training).
  --xla_gpu_enable_latency_hiding_scheduler=true
  # Start the all-gather of the next layer's weights (and the reduce-scatter of this layer's
  # gradients) one loop iteration early, where a scan or loop repeats them.
  --xla_gpu_enable_pipelined_all_gather=true
  --xla_gpu_enable_pipelined_reduce_scatter=true
  --xla_gpu_enable_pipelined_all_reduce=true
  # Combine many small per-parameter collectives into few large ones (NVLink and NCCL are
  # efficient only for large messages): thresholds in bytes.
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=67108864
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728
)
for segsr_flag in "${segsr_gpu_xla_flags[@]}"; do
  # A flag you set yourself (same name, any value) is left as you set it.
  case " ${XLA_FLAGS:-} " in
    *" ${segsr_flag%%=*}="*) ;;
    *) XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$segsr_flag" ;;
  esac
done
export XLA_FLAGS
unset segsr_gpu_xla_flags segsr_flag

# Keep compiled programs on disk: a restarted job or a second sampling run skips compilation
# (minutes for the SD-2-sized model). Put it on a persistent disk where you have one. (The
# sampler reads SEGSR_JAX_CACHE, everything else JAX_COMPILATION_CACHE_DIR.)
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/segsr_jax/xla}"
export SEGSR_JAX_CACHE="${SEGSR_JAX_CACHE:-$JAX_COMPILATION_CACHE_DIR}"
