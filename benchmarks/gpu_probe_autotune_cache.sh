#!/usr/bin/env bash
# GPU probe (about 1.5 minutes): does XLA's per-fusion autotune cache carry one compilation's
# kernel choices to the next process?  Two JAX processes compile ConvNeXt-T 224 bf16 with the
# same cache folder; the first writes it, the second should compile faster and run the same
# kernels (the profile names the depthwise kernel).  From the repository root on the GPU
# machine, Keras wheels of ../shared/GPU.md in .whl/:   OUT=/tmp/probe bash THIS_SCRIPT
# Results of 2026-11-27 (H200): benchmarks/results/gpu_h200_2026-11-27_autotune_cache/.
OUT=${OUT:?set OUT to a folder for the logs}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD KERAS_BACKEND=jax PYTHONUNBUFFERED=1 GPU_BENCH_JOBS=infer
run() {  # name XLA_FLAGS
  XLA_FLAGS="$2" timeout 66 python3 benchmarks/gpu_bench.py --only jax --budget 62 --out $OUT/$1 > $OUT/$1.txt 2>&1
  echo "== $1 ($2)"; grep -hE "^\| infer" $OUT/$1/summary.md; grep -hE "grouped_direct|c1_k1|ms of GPU" $OUT/$1/profile_*.txt | cut -c1-90 | head -3; grep -h "Unknown\|rror" $OUT/$1.txt | head -3
}
mkdir -p /tmp/atc
run cache_a "--xla_gpu_per_fusion_autotune_cache_dir=/tmp/atc"
ls /tmp/atc | head -3; ls /tmp/atc | wc -l
run cache_b "--xla_gpu_per_fusion_autotune_cache_dir=/tmp/atc"
