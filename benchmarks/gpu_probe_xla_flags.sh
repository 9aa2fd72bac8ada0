#!/usr/bin/env bash
# GPU probe (about 4 minutes on an H200): can an XLA flag fuse the bias + GELU pass into the
# matrix product?  In the H200 profile (BENCHMARKS.md) the bias + exact GELU + cast fusions
# take 3.5 of the 15.3 ms forward of ConvNeXt-T 224 bf16 (batch 256) - a full read and write of
# the 4x-wide hidden activations that a GEMM epilogue would not need; cuBLAS (XLA's pick) has
# no exact-GELU epilogue, Triton and cuDNN GEMM fusions can have one.  Each flag set runs in its
# own JAX process (T-224 inference, the default model only, with its kernel profile: the
# "elementwise fusion" and "matmul" lines show whether the pass moved), after one timm compiled
# run for the ratio.  A flag a jaxlib does not know stops that process at start (its .txt says
# so; all five sets parse with jaxlib 0.11.2, checked on a CPU).  From the repository root on the GPU machine, Keras wheels of ../shared/GPU.md in .whl/:
#     OUT=/tmp/probe bash benchmarks/gpu_probe_xla_flags.sh
# Measured on an H200 (2026-11-27, fifth session, BENCHMARKS.md): --xla_gpu_enable_cublaslt=true
# and --xla_gpu_cudnn_gemm_fusion_level=3 left the GELU pass where it was, with exact and with
# tanh GELU; they stay below for the record (PROBE_ALL=1 runs them).  Each run's folder is
# packed into one .tgz (the device tool returns a limited number of files).
OUT=${OUT:?set OUT to a folder for the logs}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD KERAS_BACKEND=jax PYTHONUNBUFFERED=1 GPU_BENCH_JOBS=infer GPU_BENCH_INFER=default
run() {  # name worker XLA_FLAGS
  XLA_FLAGS="$3" timeout 75 python3 benchmarks/gpu_bench.py --only $2 --budget 70 --out $OUT/$1 > $OUT/$1.txt 2>&1
  echo "== $1 ($3)"; grep -hE "^\| infer" $OUT/$1/summary.md
  grep -hE "ms of GPU|elementwise|matmul|convolution" $OUT/$1/profile_*.txt | cut -c1-90 | head -4
  grep -h "Unknown\|rror" $OUT/$1.txt | head -2
  tar czf $OUT/$1.tgz -C $OUT $1 && rm -rf $OUT/$1
}
run torch torch ""
run jax_base jax ""
if [ -n "$PROBE_ALL" ]; then
  run jax_cublaslt jax "--xla_gpu_enable_cublaslt=true"
  run jax_cudnn_fusion jax "--xla_gpu_cudnn_gemm_fusion_level=3"
fi
run jax_triton_any jax "--xla_gpu_triton_gemm_any=true"
run jax_fusion_v2 jax "--xla_gpu_experimental_gemm_fusion_v2=true --xla_gpu_triton_gemm_any=true"
