"""UperNet-ConvNeXt (semantic segmentation) against transformers' UperNet on the CPU.

    python benchmarks/segment_side_by_side.py --out benchmarks/results/cpu_<date>_upernet

One forward pass of UperNet-ConvNeXt-T on a 512x512 image (batch 1, float32, random weights:
speed does not depend on them) - the window ``convnext segment``'s default single-scale path
runs per 512x512 crop - by each contender in its own process, with the isolation of
``side_by_side.py`` (its ``Harness``: one worker per contender, all others stopped during a
turn, order rotated per round, other load measured during each turn):

* ``ours``: OpenVINO on this library's graph of the model
  (``engines.upernet_graph.build_onnx_graph`` at the window's size, dynamic batch) as
  ``convnext segment`` runs it (``engines.graph_files.GraphRunner``: float32, latency hint);
* ``ort_ours``: onnxruntime on the same graph file, through the same ``GraphRunner`` (the
  session ``engines.graph_files.onnx_session`` makes) - the default before OpenVINO was
  measured here; ``convnext segment``'s ``auto`` takes the faster of the two
  (``graph_files.SEGMENTATION_ENGINES``);
* ``keras``: the same model through Keras ``predict_on_batch`` (``--engine keras``);
* ``torch_eager``: transformers' ``UperNetForSemanticSegmentation`` (ConvNext backbone, no
  auxiliary head), PyTorch eager, ``torch.inference_mode``;
* ``ort_export``: onnxruntime (default session options) on the model's ONNX export as
  ``convnext export --format onnx`` writes it (dynamic height/width, opset 17);
* ``ort_torch_export``: onnxruntime on the transformers model's ``torch.onnx`` export, when
  that export works.

Ratios ``ours / other`` are taken per round (paired) and summarised by their median and
inter-quartile range; the load average before and after and the other programs' CPU use during
the turns are recorded (the machine is shared: a run with other load over ``--max-other-load``
is labelled NOISY).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import side_by_side as sbs  # noqa: E402  (the isolated harness)

NAME = "upernet_convnext_tiny_ade20k_512"
#: Every contender (``--contenders`` picks some).
CONTENDERS = ("ours", "ort_ours", "keras", "torch_eager", "ort_export", "ort_torch_export")
MODULE = "segment_side_by_side"


# ----------------------------------------------------------------------------------------------
# Contenders built in their worker processes (``side_by_side._worker`` calls these)


def keras_calls(params: dict) -> dict:
    import keras

    import convnext_keras as ck

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(params["threads"])
    model = ck.load_model(NAME, weights=None)
    x = np.load(Path(params["folder"]) / "batch1.npy")
    return {1: lambda: model.predict_on_batch(x)}


def graph_runner_calls(params: dict) -> dict:
    """``engines.graph_files.GraphRunner`` on this library's graph file: exactly what
    ``convnext segment`` runs per window (``params["engine"]``: openvino or onnxruntime)."""
    from convnext_keras.engines.graph_files import GraphRunner

    runner = GraphRunner(params["graph"], params["engine"], threads=params["threads"])
    x = np.load(Path(params["folder"]) / "batch1.npy")
    return {1: lambda: runner(x)}


def hf_upernet(params: dict):
    import torch
    from transformers import ConvNextConfig, UperNetConfig, UperNetForSemanticSegmentation

    backbone = ConvNextConfig(
        depths=list(params["depths"]),
        hidden_sizes=list(params["dims"]),
        out_features=["stage1", "stage2", "stage3", "stage4"],
        layer_norm_eps=1e-6,
    )
    config = UperNetConfig(backbone_config=backbone, num_labels=150, use_auxiliary_head=False)
    torch.manual_seed(0)
    return UperNetForSemanticSegmentation(config).eval()


def torch_calls(params: dict) -> dict:
    import torch

    torch.set_num_threads(params["threads"])
    net = hf_upernet(params)
    x = torch.from_numpy(
        np.load(Path(params["folder"]) / "batch1.npy").transpose(0, 3, 1, 2).copy()
    )

    def forward():
        with torch.inference_mode():
            return net(pixel_values=x).logits

    return {1: forward}


# ----------------------------------------------------------------------------------------------
# Preparation: the graphs, the export, a correctness check


def _prepare(conn, params: dict) -> None:
    try:
        import torch

        import convnext_keras as ck
        from convnext_keras.engines import upernet_graph as upernet_onnx
        from convnext_keras.export.exporter import export
        from convnext_keras.tasks import bench

        folder, res = Path(params["folder"]), params["resolution"]
        model = ck.load_model(NAME, weights=None)
        (folder / "ours.onnx").write_bytes(
            upernet_onnx.build_onnx_graph(model, res, res).SerializeToString()
        )
        if "ort_export" in params["contenders"]:
            export(model, folder / "export.onnx", "onnx", image_size=res)
        x = bench.random_batch(1, res)
        np.save(folder / "batch1.npy", x)
        expected = np.asarray(model.predict_on_batch(x))
        checks = {
            f"{engine}_vs_keras_max_abs_diff": float(
                np.abs(upernet_onnx.SegmentationRunner(model, engine=engine)(x) - expected).max()
            )
            for engine in ("openvino", "onnxruntime")
        }
        try:
            if "ort_torch_export" not in params["contenders"]:
                raise RuntimeError("not asked for (--contenders)")
            net = hf_upernet(params)
            sbs_input = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
            torch.onnx.export(
                net, (sbs_input,), str(folder / "hf.onnx"), input_names=["pixel_values"],
                output_names=["logits"], opset_version=17, dynamo=False,
            )  # fmt: skip
            checks["torch_export"] = "ok"
        except Exception as e:  # noqa: BLE001 - the contender is then left out
            checks["torch_export"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        if "ort_torch_export" not in params["contenders"]:
            checks["torch_export"] = "not asked for (--contenders)"
        conn.send(("ok", checks))
    except Exception as e:  # noqa: BLE001 - reported
        import traceback

        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"))


def contenders(params: dict, torch_export: bool) -> list:
    folder = Path(params["folder"])
    c = sbs.Contender
    out = [
        c("matmul", f"numpy float32 matmul {sbs.MATMUL_N}^2 (rate reference)", "rate", "matmul",
          {**params, "batch_sizes": [0]}, [0]),
        c("ours", "OpenVINO, this library's graph (as convnext segment runs it)", "fp32",
          f"{MODULE}:graph_runner_calls", {**params, "graph": str(folder / "ours.onnx"),
                                           "engine": "openvino"}, [1]),
        c("ort_ours", "onnxruntime, this library's graph (as convnext segment runs it)", "fp32",
          f"{MODULE}:graph_runner_calls", {**params, "graph": str(folder / "ours.onnx"),
                                           "engine": "onnxruntime"}, [1]),
        c("keras", "convnext_keras Keras predict_on_batch (--engine keras)", "fp32",
          f"{MODULE}:keras_calls", params, [1]),
        c("torch_eager", "transformers UperNet (ConvNext), PyTorch eager", "fp32",
          f"{MODULE}:torch_calls", params, [1]),
        c("ort_export", "onnxruntime, convnext export's ONNX (dynamic size)", "fp32",
          "onnxruntime", {**params, "graph": str(folder / "export.onnx"), "session": "plain",
                          "layout": "nhwc"}, [1]),
    ]  # fmt: skip
    if torch_export:
        graph = {"graph": str(folder / "hf.onnx"), "session": "plain", "layout": "nchw"}
        out.append(
            c(
                "ort_torch_export",
                "onnxruntime, transformers model's torch.onnx export",
                "fp32",
                "onnxruntime",
                {**params, **graph},
                [1],
            )
        )
    out = [c for c in out if c.key == "matmul" or c.key in params["contenders"]]
    for each in out:
        each.params = {**each.params, "batch_sizes": each.batch_sizes}
    return out


def _summary(values) -> dict:
    low, high = sbs.quartiles(values)
    return {"median": statistics.median(values), "q1": low, "q3": high}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Results folder (created).")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--turn-seconds", type=float, default=0.0, help="0: one timed call.")
    parser.add_argument("--max-other-load", type=float, default=0.15)
    parser.add_argument("--no-wait", action="store_true", help="Neither wait nor retake.")
    parser.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help=f"Comma-separated subset of {','.join(CONTENDERS)} ('ours' is always timed).",
    )
    args = parser.parse_args()

    from convnext_keras import registry

    spec = registry.CHECKPOINTS[NAME].spec
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="segment_bench_") as folder:  # graphs: 240 MB each
        report = measure(args, spec, registry.CHECKPOINTS[NAME].resolution, Path(folder))
    (args.out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (args.out / "results.md").write_text(text)
    print(text)


def measure(args, spec, resolution: int, folder: Path) -> dict:
    from convnext_keras.tasks.bench import cpu_description

    params = {
        "folder": str(folder),
        "resolution": resolution,
        "depths": list(spec.depths),
        "dims": list(spec.dims),
        "threads": args.threads,
        "warmup": args.warmup,
        "contenders": sorted({"ours", *args.contenders.split(",")}),
    }
    started = time.perf_counter()
    load_before = sbs.loadavg()
    print("preparing graphs and exports ...", flush=True)
    checks = sbs._run_process(_prepare, params)
    people = contenders(params, checks["torch_export"] == "ok")
    rounds = []
    with sbs.Harness(people, args.max_other_load, 2, wait=not args.no_wait) as h:
        rate = next(c for c in h.contenders if c.key == "matmul")
        matmul = [2 * sbs.MATMUL_N**3 / min(h.turn(rate, 0, 1.0, 1)["seconds"]) / 1e9]
        timed = [c for c in h.contenders if c.key != "matmul"]
        for r in range(args.rounds):
            order = timed[r % len(timed) :] + timed[: r % len(timed)]
            rounds.append({c.key: h.turn(c, 1, args.turn_seconds, 0) for c in order})
            print(
                f"  round {r + 1}/{args.rounds} ({time.perf_counter() - started:.0f} s)", flush=True
            )
        matmul.append(2 * sbs.MATMUL_N**3 / min(h.turn(rate, 0, 1.0, 1)["seconds"]) / 1e9)
        labels = {c.key: c.label for c in h.contenders}
        unavailable = dict(h.unavailable)
    keys = [k for k in labels if k != "matmul"]
    seconds = {k: [statistics.median(r[k]["seconds"]) for r in rounds] for k in keys}
    other = [r[k]["cpu"].get("other_cores") for r in rounds for k in keys]
    other = [o for o in other if o is not None]
    rows = {}
    for k in keys:
        ratios = [t_other / t_ours for t_other, t_ours in zip(seconds[k], seconds["ours"])]
        rows[k] = {
            "label": labels[k],
            "img_per_s": _summary([1 / t for t in seconds[k]]),
            "ours_speedup": _summary(ratios),  # > 1: ours is faster
        }
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "model": NAME,
        "input": [1, params["resolution"], params["resolution"], 3],
        "cpu": cpu_description(),
        "versions": sbs.versions(),
        "threads": args.threads,
        "rounds": args.rounds,
        "load_average_before": load_before,
        "load_average_after": sbs.loadavg(),
        "other_cores_during_turns": _summary(other) if other else None,
        "verdict": "quiet" if other and max(other) <= args.max_other_load else "NOISY",
        "matmul_gflops_before_after": matmul,
        "checks": checks,
        "unavailable": unavailable,
        "contenders": rows,
        "seconds_per_round": seconds,
    }


def markdown(report: dict) -> str:
    other = report["other_cores_during_turns"]
    load = (
        f"other programs used {other['median']:.2f} cores (median; IQR {other['q1']:.2f}-"
        f"{other['q3']:.2f}) during the turns"
        if other
        else "other load not measured"
    )
    size = report["input"][1]
    lines = [
        f"# {report['model']}, 1x{size}x{size}, fp32, {report['threads']} threads",
        "",
        f"{report['date']}; CPU: {report['cpu']}; verdict **{report['verdict']}** ({load}; load "
        f"average {report['load_average_before']} before, {report['load_average_after']} after).",
        "",
        "| contender | img/s (median) | IQR | ours / it (paired, median) | IQR |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in report["contenders"].values():
        ips, up = row["img_per_s"], row["ours_speedup"]
        lines.append(
            f"| {row['label']} | {ips['median']:.3f} | {ips['q1']:.3f}-{ips['q3']:.3f} | "
            f"{up['median']:.2f}x | {up['q1']:.2f}-{up['q3']:.2f} |"
        )
    for label, reason in report["unavailable"].items():
        lines.append(f"| {label} | not measured: {reason} | | | |")
    if report["checks"].get("torch_export") not in ("ok", "not asked for (--contenders)"):
        lines += ["", f"transformers model's torch.onnx export: {report['checks']['torch_export']}"]
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
