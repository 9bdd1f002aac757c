#!/usr/bin/env bash
# The accelerator checks of the README's Speed and Memory sections, in one run (an H100/H200-class GPU).
#
#   bash benchmarks/accelerator_suite.sh OUT_DIR [PEAK_TFLOPS]
#
# Writes into OUT_DIR (one JSON line per measurement, each with its provenance):
#   throughput.jsonl   F0 train step in bfloat16, per-device batch 32 (the recipe's) and 256:
#                      images/s, ms/step, MFU from XLA's FLOP count against PEAK_TFLOPS
#                      (default 989, the H100/H200 SXM dense bf16 figure)
#   profile.jsonl      where one step's time goes, plus trace.json.gz and hlo.txt.gz to read it later
#   memory_plan.jsonl  every NFNet config's step memory per device as XLA:GPU compiles it,
#                      with and without remat (compiled in the background, autotuning off, so it
#                      does not share the GPU with the timed steps)
#   log.txt            everything printed
# Each stage has its own time limit; a stage that fails leaves the others' results.
set -u -o pipefail
out=${1:?usage: accelerator_suite.sh OUT_DIR [PEAK_TFLOPS]}
peak=${2:-989}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
log="$out/log.txt"
stage() {  # stage SECONDS OUTFILE COMMAND...
  local limit=$1 file=$2; shift 2
  echo "=== $(date -u +%T) $* (limit ${limit}s)" | tee -a "$log"
  timeout "$limit" "$@" 2>>"$log" | tee -a "$file" "$log"
  echo "=== rc=$? after $SECONDS s" | tee -a "$log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$log"
python3 -c "import jax, haiku, optax, orbax.checkpoint, ml_collections; print('jax', jax.__version__, 'haiku', haiku.__version__, 'optax', optax.__version__, jax.devices())" 2>&1 | tee -a "$log" || exit 1

configs=nfnet.py:F0,nfnet.py:F1,nfnet.py:F2,nfnet.py:F3,nfnet.py:F4,nfnet.py:F5,nfnet.py:F6,nfnet.py:F7
XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS="--xla_gpu_autotune_level=0" \
  timeout 470 python3 -m experiments.memory_plan --only "$configs" --remat both --json \
  >"$out/memory_plan.jsonl" 2>>"$out/memory_plan.err" &
plan=$!

export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
stage 140 "$out/throughput.jsonl" python3 -m benchmarks.train_step_throughput --batch 32 --steps 20 --peak_tflops "$peak"
stage 140 "$out/throughput.jsonl" python3 -m benchmarks.train_step_throughput --batch 256 --steps 10 --peak_tflops "$peak"
stage 130 "$out/profile.jsonl" python3 -m benchmarks.profile_train_step --dtype bfloat16 --batch 256 --config.data.image_size=192 --steps 3 --keep "$out"
wait "$plan"; echo "=== memory plan rc=$? after $SECONDS s" | tee -a "$log"
