"""Per-node onnxruntime profile of this library's ONNX graph (ConvNeXt-T, 224, batch 8, 2 threads),
summed by operator and matrix-product shape, with each shape's GFLOP/s.

    python benchmarks/results/cpu_2026-11-27_openvino/profile_onnxruntime.py
"""

import collections
import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from convnext_keras.engines import graph as runtime
from convnext_keras.tasks import bench

bs, res = 8, 224
x = bench.random_batch(bs, res)
ours, _ = bench.bench_model("convnext_tiny", resolution=res)
g = runtime.build_onnx_graph(ours, res, res)
tmp = Path(tempfile.mkdtemp())
p = tmp / "ours.onnx"
p.write_bytes(g.SerializeToString())
opt = ort.SessionOptions()
opt.intra_op_num_threads = 2
opt.inter_op_num_threads = 1
opt.enable_profiling = True
opt.profile_file_prefix = str(tmp / "prof")
s = ort.InferenceSession(str(p), opt, providers=["CPUExecutionProvider"])
R = 8
for _ in range(R):
    s.run(None, {"images": x})
ev = json.load(open(s.end_profiling()))
node = collections.defaultdict(list)
shapes = {}
for e in ev:
    if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
        node[e["name"]].append(e["dur"])
        a = e["args"]
        shapes[e["name"]] = (a["op_name"], a.get("input_type_shape"), a.get("output_type_shape"))
rows = collections.defaultdict(lambda: [0.0, 0.0, 0])
for n, d in node.items():
    op, ins, outs = shapes[n]
    med = np.median(d[1:]) / 1000
    if op == "MatMul":
        a = list(ins[0].values())[0]
        b = list(outs[0].values())[0]
        m = int(np.prod(a[:-1]))
        k = a[-1]
        nn = b[-1]
        key = f"MatMul M={m} K={k} N={nn}"
        rows[key][0] += med
        rows[key][1] += 2 * m * k * nn / 1e9
        rows[key][2] += 1
    else:
        key = f"{op} {list(list(ins[0].values())[0]) if ins else ''}"
        rows[key][0] += med
        rows[key][2] += 1
tot = sum(r[0] for r in rows.values())
for k, (ms, gf, n) in sorted(rows.items(), key=lambda kv: -kv[1][0]):
    print(
        f"{k:55s} n={n:2d} {ms:7.1f} ms {100 * ms / tot:5.1f}%"
        + (f"  {gf / ms * 1e3:5.1f} GFLOP/s" if gf else "")
    )
print("total", tot)
