"""Where onnxruntime spends its time: this library's graph against the PyTorch model's export,
per operator kind, at several batch sizes (onnxruntime's own per-node profile).

    python benchmarks/profile_cpu.py                       # ConvNeXt-T 224, batches 1, 8, 32
    python benchmarks/profile_cpu.py --batch-size 1 --calls 20 --out DIR

Both graphs run in this one process with onnxruntime's default settings (what
``runners.onnx_session`` uses too) and the same thread count, their calls alternating so that
load from other programs hits both alike.  The first call of each is dropped; per node the
median over the other calls is summed by operator kind.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _session(graph: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling = True
    options.profile_file_prefix = str(graph.with_suffix(""))
    return ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])


def by_operator(profile_file: str) -> dict:
    """``{operator kind: ms per call}``: per node the median over the calls after the first,
    summed by kind."""
    events = json.loads(Path(profile_file).read_text())
    per_node = collections.defaultdict(list)
    kind = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node[e["name"]].append(e["dur"] / 1000)
            kind[e["name"]] = e["args"]["op_name"]
    out = collections.defaultdict(float)
    for name, times in per_node.items():
        out[kind[name]] += float(np.median(times[1:]))
    return dict(out)


def profile_pair(graphs: dict, feeds: dict, threads: int, calls: int) -> dict:
    """Profile several graphs with their calls alternating (load hits all alike):
    ``{label: {operator kind: ms per call}}``."""
    sessions = {label: _session(path, threads) for label, path in graphs.items()}
    for _ in range(calls + 1):
        for label, session in sessions.items():
            session.run(None, feeds[label])
    return {label: by_operator(s.end_profiling()) for label, s in sessions.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convnext_tiny")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--batch-size", default="1,8,32")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch
    from side_by_side import hf_peer, loadavg, onnx_export

    from convnext_keras import registry
    from convnext_keras.engines import onnx_graph
    from convnext_keras.tasks import bench

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    spec = registry.resolve(args.model).variant
    res = args.resolution
    lines = [f"CPU: {bench.cpu_description()}. Load average before: {loadavg()}.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ours, _ = bench.bench_model(args.model, resolution=res)
        (tmp / "ours.onnx").write_bytes(
            onnx_graph.build_onnx_graph(ours, res, res).SerializeToString()
        )
        hf = hf_peer(spec.depths, spec.dims)
        onnx_export(hf, torch.from_numpy(bench.random_batch(1, res).transpose(0, 3, 1, 2).copy()),
                    tmp / "hf.onnx")  # fmt: skip
        for bs in (int(b) for b in args.batch_size.split(",")):
            x = bench.random_batch(bs, res)
            result = profile_pair(
                {"ours": tmp / "ours.onnx", "export": tmp / "hf.onnx"},
                {"ours": {"images": x},
                 "export": {"pixel_values": np.ascontiguousarray(x.transpose(0, 3, 1, 2))}},
                threads, args.calls)  # fmt: skip
            a, b = result["ours"], result["export"]
            lines += [
                f"### batch {bs}: ms per call by operator kind (node time, {args.calls} calls)",
                "",
                "| operator | this library's graph | PyTorch export |",
                "|---|---:|---:|",
            ]
            for op in sorted(set(a) | set(b), key=lambda o: -max(a.get(o, 0), b.get(o, 0))):
                lines.append(f"| {op} | {a.get(op, 0):.2f} | {b.get(op, 0):.2f} |")
            lines += [f"| **total** | {sum(a.values()):.2f} | {sum(b.values()):.2f} |", ""]
    lines.append(f"Load average after: {loadavg()}.")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / ".profile.md.part").write_text(text)
        (out / ".profile.md.part").replace(out / "profile.md")


if __name__ == "__main__":
    main()
