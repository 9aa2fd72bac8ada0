"""A warm call, end to end: ``convnext predict`` of the example photos, each call a fresh
process, against a transformers script and onnxruntime on a saved export doing the same job.

    python benchmarks/warm_call.py --out benchmarks/results/cpu_<date>_warm_call
    python benchmarks/warm_call.py --rounds 9 --cold --before /path/to/an/older/checkout

What a user times: the wall time of one command, from the process start to its exit, with the
model's weights already downloaded and converted.  Set-up (untimed, in a scratch folder):

* one set of weights for everyone: a transformers ConvNext of the model's architecture with
  random weights, saved with ``save_pretrained`` (the transformers contender reads it), read and
  converted by this library into a scratch ``CONVNEXT_HOME`` (what ``convnext predict`` reads
  after its first download), and exported by ``torch.onnx`` (the onnxruntime contender);
* one untimed call of every contender: the graph cache is written, ``.pyc`` files (the calls
  run without ``PYTHONDONTWRITEBYTECODE``, as an installed package has them) and the page cache
  are warm for all.

Contenders (each ``python ...`` in a fresh process; all print the top 3 classes per photo):

* ``convnext``: ``convnext predict PHOTOS --model NAME --top 3`` (the installed command, this
  checkout first on ``PYTHONPATH``): the plain install's path, the cached graph on OpenVINO,
  no Keras;
* ``first`` (``--cold``): the same with the model's graph cache deleted before each call (the
  first call after an install or an update: Keras builds the model, the graph is built, written
  and compiled);
* ``before`` (``--before PATH``): the same command run from another checkout of this library
  (``PYTHONPATH=PATH``), e.g. the commit before the warm path;
* ``transformers``: a script that loads ``ConvNextForImageClassification`` and its
  ``ConvNextImageProcessor`` from the saved folder, classifies the photos in PyTorch (eager,
  inference mode) and prints the top 3;
* ``onnxruntime``: a script that opens the saved export with onnxruntime (CPU), preprocesses with
  PIL + numpy (resize the short side to 256 bicubic, centre crop 224, ImageNet mean/std) and
  prints the top 3.

Rounds: every round runs each contender once, in an order rotated from round to round.  Per
call: the wall time, and the CPU the rest of the machine used meanwhile (``/proc/stat`` busy
time minus this harness's and the call's own CPU time, in cores) and the load average; a call
with more than ``--max-other-load`` cores of other load is marked.  ``--wait`` waits (10 s at
most) for a quiet machine before each call.  Reported: per contender the median wall time, its
range and inter-quartile range, the median other load, and the median of the per-round ratios
to ``convnext``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import side_by_side as sbs  # noqa: E402  (the CPU accounting and the peers' builders)

PHOTOS = sorted((ROOT / "examples" / "images").glob("*.jpg"))

TRANSFORMERS_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from PIL import Image
    from transformers import ConvNextForImageClassification

    try:  # transformers 5: the PIL processor (the default one needs torchvision)
        from transformers import ConvNextImageProcessorPil as ConvNextImageProcessor
    except ImportError:
        from transformers import ConvNextImageProcessor

    folder, *files = sys.argv[1:]
    model = ConvNextForImageClassification.from_pretrained(folder).eval()
    processor = ConvNextImageProcessor.from_pretrained(folder)
    images = [Image.open(f).convert("RGB") for f in files]
    with torch.inference_mode():
        probs = model(**processor(images, return_tensors="pt")).logits.softmax(-1)
    top = probs.topk(3)
    for f, values, indices in zip(files, top.values, top.indices):
        print(f)
        for rank, (p, i) in enumerate(zip(values.tolist(), indices.tolist()), 1):
            print(f"  {rank}. {model.config.id2label[i]}  {100 * p:6.2f}%")
    """
)

ONNXRUNTIME_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import onnxruntime as ort
    from PIL import Image

    path, labels, *files = sys.argv[1:]
    names = open(labels).read().splitlines()
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)

    def transform(file):
        image = Image.open(file).convert("RGB")
        w, h = image.size
        scale = 256 / min(w, h)
        image = image.resize((round(w * scale), round(h * scale)), Image.BICUBIC)
        left, top = (image.width - 224) // 2, (image.height - 224) // 2
        x = np.asarray(image.crop((left, top, left + 224, top + 224)), np.float32) / 255
        return ((x - mean) / std).transpose(2, 0, 1)

    logits = session.run(None, {"pixel_values": np.stack([transform(f) for f in files])})[0]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = e / e.sum(axis=1, keepdims=True)
    for f, p in zip(files, probs):
        print(f)
        for rank, i in enumerate(np.argsort(-p)[:3], 1):
            print(f"  {rank}. {names[i]}  {100 * p[i]:6.2f}%")
    """
)


def prepare(name: str, folder: Path) -> dict:
    """Write the shared weights (transformers folder, converted cache, ONNX export) and the
    scripts; return the paths."""
    import numpy as np
    import torch

    from convnext_keras import registry
    from convnext_keras.data import labels
    from convnext_keras.weights import convert, layouts, read
    from convnext_keras.weights.cache import converted_cache_path, save_converted

    ckpt = registry.CHECKPOINTS[name]
    spec = ckpt.spec
    model = sbs.hf_peer(spec.depths, spec.dims, grn=spec.block == "grn")
    names = labels.imagenet_1k().names
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {n: i for i, n in enumerate(names)}
    hf = folder / "transformers"
    model.save_pretrained(hf)
    from transformers import ConvNextImageProcessor

    ConvNextImageProcessor(
        size={"shortest_edge": ckpt.resolution}, crop_pct=ckpt.crop_pct, resample=3
    ).save_pretrained(hf)
    home = folder / "home"
    os.environ["CONVNEXT_HOME"] = str(home)
    state = layouts.to_official_layout(read.read_state_dict(hf / "model.safetensors"))
    weights = convert.convert_state_dict(state, spec)
    save_converted(weights, converted_cache_path(ckpt), {"source": "benchmark", "model": name})
    export = folder / "export.onnx"
    x = torch.from_numpy(np.zeros((1, 3, ckpt.resolution, ckpt.resolution), np.float32))
    sbs.onnx_export(model, x, export)
    (folder / "labels.txt").write_text("\n".join(names) + "\n")
    (folder / "transformers_predict.py").write_text(TRANSFORMERS_SCRIPT)
    (folder / "onnxruntime_predict.py").write_text(ONNXRUNTIME_SCRIPT)
    return {"home": home, "hf": hf, "export": export, "labels": folder / "labels.txt"}


def contenders(args, folder: Path, paths: dict) -> dict[str, dict]:
    photos = [str(p) for p in PHOTOS]
    base_env = {**os.environ, "CONVNEXT_HOME": str(paths["home"])}
    base_env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    # As installed packages have them: compiled .pyc files (written by the warm-up calls).
    base_env.pop("PYTHONDONTWRITEBYTECODE", None)
    command = str(Path(sys.executable).with_name("convnext"))  # the installed entry point
    predict = [command, "predict", *photos, "--model", args.model, "--top", "3"]
    out = {
        "convnext": {"argv": predict, "env": {**base_env, "PYTHONPATH": str(ROOT)}},
        "transformers": {
            "argv": [
                sys.executable,
                str(folder / "transformers_predict.py"),
                str(paths["hf"]),
                *photos,
            ],  # fmt: skip
            "env": base_env,
        },
        "onnxruntime": {
            "argv": [
                sys.executable,
                str(folder / "onnxruntime_predict.py"),
                str(paths["export"]),
                str(paths["labels"]),
                *photos,
            ],  # fmt: skip
            "env": base_env,
        },
    }
    if args.cold:
        out["first"] = {
            "argv": predict,
            "env": {**base_env, "PYTHONPATH": str(ROOT)},
            "before_call": lambda: shutil.rmtree(paths["home"] / "graphs", ignore_errors=True),
        }
    if args.before:
        out["before"] = {"argv": predict, "env": {**base_env, "PYTHONPATH": str(args.before)}}
    return out


def call(contender: dict, max_other: float, wait: bool) -> dict:
    """One timed call in a fresh process: wall seconds, other load, load average."""
    if contender.get("before_call"):
        contender["before_call"]()
    quiet = sbs.wait_until_quiet(max_other) if wait else None
    load = sbs.loadavg()
    busy0, _ = sbs.cpu_seconds()
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    own0 = time.process_time()
    start = time.perf_counter()
    result = subprocess.run(
        contender["argv"], env=contender["env"], cwd=ROOT, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    busy1, _ = sbs.cpu_seconds()
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    child = (children1.ru_utime - children0.ru_utime) + (children1.ru_stime - children0.ru_stime)
    own = time.process_time() - own0
    other = max(0.0, (busy1 - busy0 - child - own) / wall)
    if result.returncode != 0:
        raise RuntimeError(f"{contender['argv'][:4]} failed:\n{result.stderr[-3000:]}")
    return {
        "seconds": wall,
        "child_cpu_seconds": child,
        "other_cores": other,
        "loadavg": load,
        "waited_for_quiet": quiet,
        "stdout_lines": len(result.stdout.splitlines()),
    }


def quartiles(values):
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], q[2]


def summarize(rounds: list[dict], max_other: float) -> dict:
    names = list(rounds[0])
    rows = {}
    for name in names:
        seconds = [r[name]["seconds"] for r in rounds]
        ratios = [r[name]["seconds"] / r["convnext"]["seconds"] for r in rounds]
        other = [r[name]["other_cores"] for r in rounds]
        q1, q3 = quartiles(seconds)
        rows[name] = {
            "median_s": statistics.median(seconds),
            "min_s": min(seconds),
            "max_s": max(seconds),
            "iqr_s": [q1, q3],
            "vs_convnext_paired": statistics.median(ratios),
            "median_other_cores": statistics.median(other),
            "noisy_calls": sum(o > max_other for o in other),
            "calls": len(seconds),
        }
    return rows


def markdown(report: dict) -> str:
    lines = [
        f"# Warm call: `convnext predict` of {len(PHOTOS)} photos ({report['model']})",
        "",
        f"{report['date']}; CPU: {report['cpu']}; {report['rounds']} rounds, each contender "
        "once per round in a rotated order, each call a fresh process.",
        f"Load average before / after: {report['loadavg_before']} / {report['loadavg_after']}.",
        "",
        "| contender | median wall (s) | range (s) | IQR (s) | time / convnext's (paired, "
        "median) | other load (median cores) | calls over the quiet limit |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in report["summary"].items():
        lines.append(
            f"| {name} | {row['median_s']:.2f} | {row['min_s']:.2f}-{row['max_s']:.2f} | "
            f"{row['iqr_s'][0]:.2f}-{row['iqr_s'][1]:.2f} | {row['vs_convnext_paired']:.2f}x | "
            f"{row['median_other_cores']:.2f} | {row['noisy_calls']}/{row['calls']} |"
        )
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items())]
    return "\n".join(lines) + "\n"


def cpu_name() -> str:
    fields = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        return platform.processor() or "unknown"
    return (
        f"{fields.get('Model name', '?')}, family {fields.get('CPU family', '?')} model "
        f"{fields.get('Model', '?')}, {fields.get('CPU(s)', '?')} CPUs"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="convnext_tiny_1k_224")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cold", action="store_true", help="Also time the first call.")
    parser.add_argument("--before", type=Path, help="Another checkout of this library to time.")
    parser.add_argument("--max-other-load", type=float, default=0.3)
    parser.add_argument("--wait", action="store_true", help="Wait for a quiet machine.")
    parser.add_argument("--out", type=Path, help="Write results.json and results.md here.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="warm_call_") as scratch:
        folder = Path(scratch)
        print("preparing the weights, the export and the scripts ...", flush=True)
        paths = prepare(args.model, folder)
        runs = contenders(args, folder, paths)
        for name, contender in runs.items():  # untimed: caches, .pyc files, page cache
            call(contender, args.max_other_load, wait=False)
            print(f"  warm-up call of {name} done", flush=True)
        load_before = sbs.loadavg()
        rounds = []
        for r in range(args.rounds):
            names = list(runs)
            order = names[r % len(names) :] + names[: r % len(names)]
            rounds.append({n: call(runs[n], args.max_other_load, args.wait) for n in order})
            line = ", ".join(f"{n} {rounds[-1][n]['seconds']:.2f} s" for n in names)
            print(f"round {r + 1}/{args.rounds}: {line}", flush=True)
        report = {
            "model": args.model,
            "photos": [str(p.relative_to(ROOT)) for p in PHOTOS],
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "cpu": cpu_name(),
            "rounds": args.rounds,
            "max_other_load": args.max_other_load,
            "loadavg_before": load_before,
            "loadavg_after": sbs.loadavg(),
            "commands": {n: c["argv"] for n, c in runs.items()},
            "before": str(args.before) if args.before else None,
            "versions": sbs.versions(),
            "calls": rounds,
        }
        report["summary"] = summarize(rounds, args.max_other_load)
    text = markdown(report)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        (args.out / "results.md").write_text(text)


if __name__ == "__main__":
    main()
