"""OpenVINO's per-layer profile (PERF_COUNT) of this library's ONNX graph (ConvNeXt-T, 224,
batch 8, 2 threads), summed by (layer type, kernel).

    python benchmarks/results/cpu_2026-11-27_openvino/profile_openvino.py
"""

import collections
import os
import tempfile
from pathlib import Path

os.environ["CONVNEXT_THREADS"] = "2"
import openvino as ov

from convnext_keras.engines import graph as runtime
from convnext_keras.tasks import bench

bs, res = 8, 224
x = bench.random_batch(bs, res)
ours, _ = bench.bench_model("convnext_tiny", resolution=res)
g = runtime.build_onnx_graph(ours, res, res)
tmp = Path(tempfile.mkdtemp())
(tmp / "ours.onnx").write_bytes(g.SerializeToString())
core = ov.Core()
cfg = {
    "INFERENCE_NUM_THREADS": 2,
    "PERFORMANCE_HINT": "LATENCY",
    "INFERENCE_PRECISION_HINT": "f32",
    "PERF_COUNT": True,
}
c = core.compile_model(core.read_model(str(tmp / "ours.onnx")), "CPU", cfg)
r = c.create_infer_request()
for _ in range(4):
    r.infer({0: x})
tot = collections.Counter()
n = collections.Counter()
ex = {}
for pi in r.profiling_info:
    us = pi.real_time.total_seconds() * 1e6
    k = (pi.node_type, pi.exec_type)
    tot[k] += us
    n[k] += 1
    ex.setdefault(k, pi.node_name)
allt = sum(tot.values())
for k, v in tot.most_common(15):
    print(f"{str(k):60s} {v / 1000:8.1f} ms {100 * v / allt:5.1f}% n={n[k]} e.g. {ex[k][:50]}")
