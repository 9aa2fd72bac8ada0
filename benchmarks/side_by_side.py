"""This library against its peers, side by side in one process, on the CPU.

    python benchmarks/side_by_side.py                     # ConvNeXt-T, 224, batch 8
    python benchmarks/side_by_side.py --model convnextv2_tiny   # ConvNeXt V2-T (GRN)
    python benchmarks/side_by_side.py --model convnext_atto --resolution 64 --repeats 3
    python benchmarks/side_by_side.py --torch-compile --out results/   # + torch.compile, files

Contenders, timed round-robin (:func:`convnext_keras.bench.interleave`) so that load from other
programs hits all alike; ratios are to onnxruntime running the PyTorch model's ONNX export:

* float32: this library's default inference path (``runtime.inference_function``: onnxruntime
  on its own graph), the same model through Keras ``predict_on_batch`` (active backend),
  keras.applications ConvNeXt (same backend; it has no V2), Hugging Face transformers
  ConvNext / ConvNextV2 in PyTorch eager (and ``torch.compile`` with ``--torch-compile``),
  onnxruntime on that model's ONNX export, timm where it can be imported, and OpenVINO
  (when installed; ``--no-openvino`` skips it) on both ONNX graphs: this library's and the
  PyTorch export - another CPU inference engine that could have been the default (it was not
  faster, BENCHMARKS.md);
* bfloat16 (skip with ``--no-bf16``): this library with ``mixed_bfloat16`` against PyTorch
  eager with bf16 autocast, plus bf16-vs-float32 relative error and top-1 agreement on real
  photos;
* the machine's float32 matmul rate (share of peak reached) and the input pipeline's img/s.

Peers use random weights (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def sample_photos() -> list[Path]:
    """Real photos shipped inside scikit-image (for the preprocessing rate and top-1 checks)."""
    try:
        import skimage
    except ImportError:
        return []
    data = Path(skimage.__file__).parent / "data"
    names = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png"]
    return [data / n for n in names if (data / n).exists()]


def hf_peer(variant: str):
    """``(model, name)``: transformers' ConvNext, or ConvNextV2 for a GRN variant (PyTorch),
    with the registry's architecture and random weights."""
    import torch
    import transformers

    from convnext_keras import registry

    spec = registry.variant(variant)
    kind = "ConvNextV2" if spec.block == "grn" else "ConvNext"
    config = getattr(transformers, f"{kind}Config")(
        depths=list(spec.depths), hidden_sizes=list(spec.dims), num_labels=1000
    )
    torch.manual_seed(0)
    return getattr(transformers, f"{kind}ForImageClassification")(config).eval(), kind


def onnx_export(torch_model, x_nchw, path: Path):
    import torch

    torch.onnx.export(
        torch_model,
        (x_nchw,),
        str(path),
        input_names=["pixel_values"],
        output_names=["logits"],
        opset_version=17,
        dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )


def openvino_contenders(graphs: dict[str, tuple[Path, np.ndarray]], threads: int) -> dict:
    """OpenVINO (CPU plugin, float32, latency hint) on each ONNX graph: ``{name: fn}``.

    ``graphs`` maps a label to ``(onnx file, input batch)``; each graph is compiled for its
    batch's fixed shape.  Empty when openvino is not installed.  Each compiled model is checked
    against onnxruntime on the same file before it is timed (a wrong engine is not a contender).
    """
    try:
        import openvino as ov
    except ImportError:
        return {}
    import onnxruntime as ort

    core = ov.Core()
    config = {
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32",
    }
    out = {}
    for label, (path, batch) in graphs.items():
        model = core.read_model(str(path))
        model.reshape({model.inputs[0].get_any_name(): list(batch.shape)})
        request = core.compile_model(model, "CPU", config).create_infer_request()
        reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        expected = reference.run(None, {reference.get_inputs()[0].name: batch})[0]
        got = request.infer({0: batch})[0]
        if not np.allclose(got, expected, rtol=1e-3, atol=1e-3):
            raise AssertionError(
                f"OpenVINO on {label} differs from onnxruntime on the same graph by "
                f"{np.abs(got - expected).max():.3g}; not timing a wrong engine."
            )
        out[f"OpenVINO, {label}"] = lambda r=request, b=batch: r.infer({0: b})
    return out


def keras_applications_peer(variant: str, resolution: int):
    import keras

    from convnext_keras import registry

    spec = registry.variant(variant)
    if spec.family != "convnext":  # keras.applications has ConvNeXt (V1) only
        return None
    fn = getattr(keras.applications, f"ConvNeXt{spec.size.capitalize()}", None)
    if fn is None:
        return None
    return fn(weights=None, input_shape=(resolution, resolution, 3), include_preprocessing=False)


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    packages = (
        "keras", "tensorflow", "jax", "torch", "onnxruntime", "openvino", "transformers", "timm"
    )  # fmt: skip
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convnext_tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="default: all cores")
    parser.add_argument("--torch-compile", action="store_true", help="add torch.compile (slow)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 group")
    parser.add_argument(
        "--no-keras-applications", action="store_true", help="skip keras.applications (slow)"
    )
    parser.add_argument(
        "--no-openvino", action="store_true", help="skip OpenVINO even when it is installed"
    )
    parser.add_argument("--bf16-repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="folder for results.json and results.md")
    args = parser.parse_args()

    import keras
    import torch

    from convnext_keras import bench, registry, runtime

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    os.environ["CONVNEXT_THREADS"] = str(threads)
    variant = registry.resolve(args.model).variant.name
    bs, res = args.batch_size, args.resolution
    x = bench.random_batch(bs, res)
    x_nchw = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    flops = bench.flops_per_image(variant, res)
    started = datetime.datetime.now(datetime.timezone.utc)

    ours, _ = bench.bench_model(args.model, resolution=res)
    default_fn, engine = runtime.inference_function(ours)
    check = np.abs(default_fn(x) - ours.predict_on_batch(x)).max()
    hf, hf_kind = hf_peer(variant)
    contenders = {
        f"convnext_keras default ({engine})": lambda: default_fn(x),
        f"convnext_keras Keras predict_on_batch ({keras.backend.backend()})": (
            lambda: ours.predict_on_batch(x)
        ),
    }
    apps = None if args.no_keras_applications else keras_applications_peer(variant, res)
    if apps is not None:
        contenders[f"keras.applications ConvNeXt ({keras.backend.backend()})"] = lambda: (
            apps.predict_on_batch(x)
        )

    def hf_eager():
        with torch.inference_mode():
            return hf(x_nchw).logits

    contenders[f"transformers {hf_kind}, PyTorch eager"] = hf_eager
    if args.torch_compile:
        try:
            compiled = torch.compile(hf)
            with torch.inference_mode():
                compiled(x_nchw)

            def hf_compiled():
                with torch.inference_mode():
                    return compiled(x_nchw).logits

            contenders[f"transformers {hf_kind}, torch.compile"] = hf_compiled
        except Exception as e:  # noqa: BLE001
            print(f"torch.compile failed: {type(e).__name__}: {str(e)[:200]}")
    try:
        import timm

        tm = timm.create_model(registry.variant(variant).arch_name, pretrained=False).eval()

        def timm_eager():
            with torch.inference_mode():
                return tm(x_nchw)

        contenders["timm, PyTorch eager"] = timm_eager
    except Exception as e:  # noqa: BLE001
        print(f"timm not measured: {type(e).__name__}: {str(e)[:120]}")
    import onnxruntime as ort

    tmp = Path(tempfile.mkdtemp())
    onnx_export(hf, x_nchw, tmp / "hf.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(
        str(tmp / "hf.onnx"), options, providers=["CPUExecutionProvider"]
    )
    x_np = x_nchw.numpy()
    ort_name = "onnxruntime, PyTorch model's ONNX export"
    contenders[ort_name] = lambda: session.run(None, {"pixel_values": x_np})
    if not args.no_openvino:
        (tmp / "ours.onnx").write_bytes(
            runtime.build_onnx_graph(ours, res, res).SerializeToString()
        )
        contenders.update(
            openvino_contenders(
                {
                    "this library's ONNX graph": (tmp / "ours.onnx", x),
                    "PyTorch model's ONNX export": (tmp / "hf.onnx", x_np),
                },
                threads,
            )
        )

    print(f"timing {len(contenders)} float32 contenders, {args.repeats} rounds ...", flush=True)
    fp32 = bench.interleave(contenders, bs, warmup=args.warmup, repeats=args.repeats)
    peak = bench.matmul_rate()

    bf16 = {}
    accuracy = {}
    if not args.no_bf16:
        ours16, _ = bench.bench_model(args.model, resolution=res, precision="bf16")
        ours16.set_weights(ours.get_weights())

        def hf_bf16():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return hf(x_nchw).logits

        print(f"timing bf16, {args.bf16_repeats} rounds ...", flush=True)
        bf16 = bench.interleave(
            {
                "convnext_keras --precision bf16 (Keras mixed_bfloat16)": (
                    lambda: ours16.predict_on_batch(x)
                ),
                f"transformers {hf_kind}, PyTorch eager bf16 autocast": hf_bf16,
            },
            bs,
            warmup=1,
            repeats=args.bf16_repeats,
        )
        accuracy = bf16_accuracy(ours, ours16, res)

    photos = sample_photos()
    arch = registry.variant(variant).arch_name
    pre = bench.preprocessing_rate(photos * 8, arch) if photos else None

    ref = fp32[ort_name].images_per_second
    ref_seconds = np.asarray(fp32[ort_name].seconds)
    rows = []
    for group, timings in (("fp32", fp32), ("bf16", bf16)):
        for name, t in timings.items():
            # Paired: the ratio within each round, then the median (robust to load drifting).
            paired = (
                float(np.median(ref_seconds / np.asarray(t.seconds))) if group == "fp32" else None
            )
            rows.append(
                {
                    "group": group,
                    "name": name,
                    "img_per_s": t.images_per_second,
                    "slowest": t.spread[0],
                    "fastest": t.spread[1],
                    "iqr_percent": t.iqr_percent,
                    "vs_onnxruntime": t.images_per_second / ref,
                    "vs_onnxruntime_paired": paired,
                    "share_of_matmul_peak": t.images_per_second * flops / 1e9 / peak,
                }
            )
    if bf16:
        names = list(bf16)
        ratio = bf16[names[0]].images_per_second / bf16[names[1]].images_per_second
    report = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": bench.device_description(),
        "command": "python " + " ".join(sys.argv),
        "versions": versions(),
        "model": f"{variant} @ {res}, batch {bs}, {threads} threads",
        "gflop_per_image": flops / 1e9,
        "matmul_gflops": peak,
        "default_engine_vs_keras_max_abs_diff": float(check),
        "rows": rows,
        "bf16_vs_pytorch_bf16": ratio if bf16 else None,
        "bf16_accuracy": accuracy,
        "preprocessing_img_per_s": pre.images_per_second if pre else None,
        "preprocessing": pre.name if pre else None,
    }
    text = markdown(report)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(report, indent=2))
        (out / "results.md").write_text(text)


def bf16_accuracy(model32, model16, resolution: int) -> dict:
    """bf16 vs float32 logits of the same weights on real photos: relative error, top-1."""
    from convnext_keras import preprocess

    photos = sample_photos()
    if not photos:
        return {}
    config = preprocess.PreprocessConfig(resolution, 0.875, "bicubic")
    images = np.stack([preprocess.transform_file(p, config) for p in photos])
    ref = np.asarray(model32.predict_on_batch(images), np.float64)
    out = np.asarray(model16.predict_on_batch(images), np.float64)
    return {
        "photos": len(photos),
        "relative_error": float(np.linalg.norm(out - ref) / np.linalg.norm(ref)),
        "top1_same": int((out.argmax(-1) == ref.argmax(-1)).sum()),
    }


def markdown(r: dict) -> str:
    lines = [
        f"Date: {r['date']}. Machine: {r['machine']}. Model: {r['model']}.",
        f"Command: `{r['command']}`.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) + ".",
        "",
        "| precision | contender | img/s (median) | range | IQR | vs onnxruntime | "
        "same, paired by round | share of matmul peak |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['group']} | {row['name']} | {row['img_per_s']:.2f} | "
            f"{row['slowest']:.2f}-{row['fastest']:.2f} | {row['iqr_percent']:.0f}% | "
            f"{row['vs_onnxruntime']:.2f}x | "
            + (f"{row['vs_onnxruntime_paired']:.2f}x" if row["vs_onnxruntime_paired"] else "-")
            + f" | {100 * row['share_of_matmul_peak']:.0f}% |"
        )
    lines.append("")
    lines.append(
        f"float32 matmul rate (numpy, 2048^2, same run): {r['matmul_gflops']:.1f} GFLOP/s; "
        f"{r['gflop_per_image']:.2f} GFLOP per image."
    )
    lines.append(
        f"Default engine vs Keras predict_on_batch, same weights: max |diff| "
        f"{r['default_engine_vs_keras_max_abs_diff']:.2e}."
    )
    if r["bf16_vs_pytorch_bf16"]:
        acc = r["bf16_accuracy"]
        lines.append(
            f"bf16: this library / PyTorch eager bf16 autocast = {r['bf16_vs_pytorch_bf16']:.2f}x"
            + (
                f"; bf16 vs float32 logits on {acc['photos']} photos: relative error "
                f"{acc['relative_error']:.2e}, same top-1 on {acc['top1_same']}/{acc['photos']}."
                if acc
                else "."
            )
        )
    if r["preprocessing_img_per_s"]:
        lines.append(
            f"Input pipeline ({r['preprocessing']}): {r['preprocessing_img_per_s']:.1f} img/s."
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"({time.time() - t0:.0f}s)")
