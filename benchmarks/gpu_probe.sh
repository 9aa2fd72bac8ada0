#!/usr/bin/env bash
# Short GPU probe (about 2 minutes on an H100): ConvNeXt-T 224 bf16 inference only, each
# contender in its own process, one after the other, so no compilation (XLA autotunes on the
# GPU) overlaps another's timing.  Two plain JAX runs show whether XLA's cuDNN autotuning picks
# the same depthwise kernel twice; a third runs with autotuning off.  Run from the repository
# root on the GPU machine, with the Keras wheels of ../shared/GPU.md in .whl/:
#     OUT=/tmp/probe bash benchmarks/gpu_probe.sh
# Results of 2026-11-27: benchmarks/results/gpu_h100_2026-11-27/run3_probe/.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD KERAS_BACKEND=jax PYTHONUNBUFFERED=1 GPU_BENCH_JOBS=infer
OUT=${OUT:?set OUT to a folder for the logs}
run() {  # name worker XLA_FLAGS
  XLA_FLAGS="$3" timeout 66 python3 benchmarks/gpu_bench.py --only $2 --budget 60 --out $OUT/$1 > $OUT/$1.txt 2>&1
  echo "== $1 ($3)"; grep -hE "^\| infer" $OUT/$1/summary.md; grep -hE "grouped_direct|c1_k1|ms of GPU" $OUT/$1/profile_*.txt | cut -c1-90 | head -3
}
run torch torch ""
run jax_a jax ""
run jax_b jax ""
run jax_heur jax "--xla_gpu_autotune_level=0"
