"""The stem alone, two ways, calls alternating (load hits both alike): this library's
patch reshape + matrix product (A) against Transpose + 4x4/4 Conv + Transpose (B), ConvNeXt-T
stem weights shape, 2 threads.  PYTHONPATH=. python <this file> (from the repository root)
"""

import statistics
import time

import numpy as np
from onnx import TensorProto, helper

from convnext_keras.engines import graph as runtime

rng = np.random.default_rng(0)
k = rng.standard_normal((4, 4, 3, 96)).astype(np.float32)
b = rng.standard_normal(96).astype(np.float32)


def build(variant, h=224):
    g = runtime._GraphBuilder()
    if variant == "A":
        x, _, _ = runtime._patchify_matmul(g, "images", h, h, 4, k, b, "stem")
    else:
        y = g.op("Transpose", ["images"], "stem", perm=[0, 3, 1, 2])
        y = g.op(
            "Conv",
            [y, g.const(k.transpose(3, 2, 0, 1), "w"), g.const(b, "b")],
            "stem",
            kernel_shape=[4, 4],
            strides=[4, 4],
        )
        x = g.op("Transpose", [y], "stem", perm=[0, 2, 3, 1])
    g.nodes.append(helper.make_node("Identity", [x], ["out"]))
    graph = helper.make_graph(
        g.nodes,
        "s",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["n", h, h, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        g.initializers,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    m.ir_version = 10
    return runtime.onnx_session(m, 2)


S = {v: build(v) for v in "AB"}
for bs in [1, 8, 32]:
    x = rng.standard_normal((bs, 224, 224, 3)).astype(np.float32)
    outs = {v: s.run(None, {"images": x})[0] for v, s in S.items()}
    assert np.allclose(outs["A"], outs["B"], atol=1e-3), np.abs(outs["A"] - outs["B"]).max()
    t = {v: [] for v in S}
    for _ in range(40):
        for v, s in S.items():
            a = time.perf_counter()
            s.run(None, {"images": x})
            t[v].append(time.perf_counter() - a)
    print(
        bs,
        {v: round(1000 * statistics.median(ts), 3) for v, ts in t.items()},
        "ms",
        open("/proc/loadavg").read().split()[:2],
    )
