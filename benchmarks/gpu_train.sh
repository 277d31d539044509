#!/usr/bin/env bash
# The SD-2-size training step on one GPU (a lent H100/H200): the joint stage as configured,
# with and without the rollout SegDM loss (seg_rollout_steps=4), then a larger batch; one
# process per case, each row appended to $OUT/gpu_train.jsonl as it is measured.
# Run from the repository root on the device machine, with .whl/ carried (grain,
# ml_collections, array_record, portpicker wheels for its Python; see benchmarks/RESULTS.md).
set -u
out=${OUT:-/tmp}
start=$(date +%s)
budget=${BUDGET_S:-540}
rm -rf /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/nvidia-smi.txt"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
cases=" ${CASES:-joint_b4 joint_b4_rollout4 joint_b8} "  # CASES="a b": only those
run() {  # run NAME ARGS...: skipped once under 60 s of the budget is left
  local name=$1; shift
  case "$cases" in *" $name "*) ;; *) return ;; esac
  local left=$((budget - ($(date +%s) - start)))
  if [ "$left" -lt 60 ]; then echo "[skip] $name: ${left}s left"; return; fi
  echo "[run] $name (limit ${left}s)"
  timeout "$left" python3 benchmarks/train_bench.py --one --steps "${STEPS:-5}" --json "$out/gpu_train.jsonl" "$@" \
    >"$out/$name.out" 2>"$out/$name.err" || { echo "[fail] $name"; tail -20 "$out/$name.err"; }
  tail -c 600 "$out/$name.out"; echo
}
run joint_b4 --config configs/segsr_sd2.py:joint --batch 4
run joint_b4_rollout4 --config configs/segsr_sd2.py:joint --batch 4 --set loss.seg_rollout_steps=4
run joint_b8 --config configs/segsr_sd2.py:joint --batch 8
echo "total $(($(date +%s) - start)) s"
