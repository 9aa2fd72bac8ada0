"""Does running a block's MLP (pwconv1 -> bias + exact GELU -> pwconv2 -> bias) in chunks along H,
so that the 4C-wide hidden activation of each chunk stays in cache, speed it up in onnxruntime?
Each row: one stage's MLP shape of ConvNeXt-T at batch 8, median of 11 interleaved runs, ratio to
the unchunked graph (all chunked graphs checked equal to it first).

    python benchmarks/results/cpu_2026-11-27_mlp_chunking/mlp_chunk.py BATCH H C THREADS
"""

import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

B, H, C = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
threads = int(sys.argv[4])
rng = np.random.default_rng(0)
w1 = (rng.standard_normal((C, 4 * C)) / np.sqrt(C)).astype(np.float32)
b1 = rng.standard_normal(4 * C).astype(np.float32)
w2 = (rng.standard_normal((4 * C, C)) / np.sqrt(4 * C)).astype(np.float32)
b2 = rng.standard_normal(C).astype(np.float32)
x = rng.standard_normal((B, H, H, C)).astype(np.float32)


def build(nchunk):
    inits = [
        numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))
    ]
    nodes = []

    def mlp(inp, s):
        nodes.append(helper.make_node("MatMul", [inp, "w1"], [f"m1{s}"]))
        nodes.append(helper.make_node("Add", [f"m1{s}", "b1"], [f"a1{s}"]))
        nodes.append(helper.make_node("Gelu", [f"a1{s}"], [f"g{s}"], approximate="none"))
        nodes.append(helper.make_node("MatMul", [f"g{s}", "w2"], [f"m2{s}"]))
        nodes.append(helper.make_node("Add", [f"m2{s}", "b2"], [f"o{s}"]))
        return f"o{s}"

    if nchunk == 1:
        out = mlp("x", "")
        nodes.append(helper.make_node("Identity", [out], ["y"]))
    else:
        inits.append(numpy_helper.from_array(np.array([H // nchunk] * nchunk, np.int64), "split"))
        nodes.append(
            helper.make_node("Split", ["x", "split"], [f"x{i}" for i in range(nchunk)], axis=1)
        )
        outs = [mlp(f"x{i}", str(i)) for i in range(nchunk)]
        nodes.append(helper.make_node("Concat", outs, ["y"], axis=1))
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, H, H, C])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, H, H, C])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
    m.ir_version = 10
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    return ort.InferenceSession(m.SerializeToString(), o, providers=["CPUExecutionProvider"])


chunks = [c for c in (1, 2, 4, 7, 8, 14, 28) if H % c == 0]
sess = {c: build(c) for c in chunks}
ref = sess[1].run(None, {"x": x})[0]
for c in chunks:
    assert np.allclose(sess[c].run(None, {"x": x})[0], ref, atol=1e-5)
times = {c: [] for c in chunks}
for _ in range(11):
    for c in chunks:
        t = time.perf_counter()
        sess[c].run(None, {"x": x})
        times[c].append(time.perf_counter() - t)
base = np.median(times[1])
for c in chunks:
    print(
        f"B={B} H={H} C={C} thr={threads} chunks={c:3d}: "
        f"{1e3 * np.median(times[c]):7.1f} ms  x{base / np.median(times[c]):.3f}"
    )
