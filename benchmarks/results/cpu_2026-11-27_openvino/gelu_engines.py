"""Exact GELU over one stage-0 hidden activation (8x56x56x384 float32) in each engine, and a
plain Add over it (the memory-bound floor), 2 threads; plus each engine's error vs float64.

    python benchmarks/results/cpu_2026-11-27_openvino/gelu_engines.py
"""

import time

import numpy as np
import onnxruntime as ort
import openvino as ov
import torch
from onnx import TensorProto, helper

torch.set_num_threads(2)
shape = [8, 56, 56, 384]
x = np.random.randn(*shape).astype(np.float32)
b = np.random.randn(384).astype(np.float32)


def bench(f, n=10):
    f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return 1e3 * np.median(ts)


def model(nodes, inputs, inits=None, opset=20, domains=()):
    if inits is None:
        inits = []
    g = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits
    )
    m = helper.make_model(
        g,
        opset_imports=[helper.make_opsetid("", opset)]
        + [helper.make_opsetid(d, 1) for d in domains],
    )
    m.ir_version = 10
    return m.SerializeToString()


inp = [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)]
binit = [helper.make_tensor("b", TensorProto.FLOAT, [384], b)]
o = ort.SessionOptions()
o.intra_op_num_threads = 2
o.inter_op_num_threads = 1
s_gelu = ort.InferenceSession(model([helper.make_node("Gelu", ["x"], ["y"])], inp), o)
s_bg = ort.InferenceSession(
    model(
        [helper.make_node("BiasGelu", ["x", "b"], ["y"], domain="com.microsoft")],
        inp,
        binit,
        domains=["com.microsoft"],
    ),
    o,
)
s_add = ort.InferenceSession(model([helper.make_node("Add", ["x", "b"], ["y"])], inp, binit), o)
s_erf = ort.InferenceSession(model([helper.make_node("Erf", ["x"], ["y"])], inp), o)
core = ov.Core()
c = core.compile_model(
    core.read_model(model([helper.make_node("Gelu", ["x"], ["y"])], inp), b""),
    "CPU",
    {"INFERENCE_NUM_THREADS": 2, "INFERENCE_PRECISION_HINT": "f32"},
)
r = c.create_infer_request()
tx = torch.from_numpy(x)
tb = torch.from_numpy(b)
out = torch.empty_like(tx)
print("ort Gelu", bench(lambda: s_gelu.run(None, {"x": x})))
print("ort BiasGelu", bench(lambda: s_bg.run(None, {"x": x})))
print("ort Add", bench(lambda: s_add.run(None, {"x": x})))
print("ort Erf", bench(lambda: s_erf.run(None, {"x": x})))
print("ov Gelu", bench(lambda: r.infer({0: x})))
print("torch gelu", bench(lambda: torch.nn.functional.gelu(tx)))
print("torch gelu(x+b)", bench(lambda: torch.nn.functional.gelu(tx + tb)))
print("numpy add", bench(lambda: np.add(x, b)))
ref = torch.nn.functional.gelu(tx.double()).numpy()
for n, y in [
    ("ort", s_gelu.run(None, {"x": x})[0]),
    ("ov", r.infer({0: x})[0]),
    ("torch", torch.nn.functional.gelu(tx).numpy()),
]:
    print(n, "max abs err vs float64", np.abs(y - ref).max())
