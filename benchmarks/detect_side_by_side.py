"""Mask R-CNN / Cascade Mask R-CNN ConvNeXt-T on the CPU: this library against the tests'
plain-PyTorch reference of mmdetection 2.x inference.

    python benchmarks/detect_side_by_side.py --rounds 3 --out benchmarks/results/cpu_<date>_detect

One photo (scikit-image's ``coffee`` resized to 1333x800, so the test pipeline keeps it at
1333x800 and pads it to 1344x800), batch 1, float32, the registry's test settings (1000
proposals, score 0.05, NMS 0.5, 100 detections), random well-spread weights in the
mmdetection layout (``tests/references/mmdet_reference.py``: speed does not depend on them):

* ``ours``: ``convnext_keras.tasks.detect.detect_photo`` - what ``ck.detect_files`` /
  ``convnext detect`` run per photo: the test pipeline, the Keras detector's
  ``predict_on_batch`` on the default backend, the masks pasted into the photo;
* ``reference``: the reference's ``preprocess`` + ``simple_test`` (PyTorch eager,
  ``torch.no_grad``, masks pasted), the stand-in for mmdetection, which cannot be installed
  here (mmcv's compiled operators).

Both run in this process, one after the other, the order alternating per round (the first
call of each is a warm-up, not timed); seconds per image are the medians over rounds and the
ratio ``ours / reference`` is taken per round.  The machine is shared: the load average before
and after is recorded, and only the ratio means anything.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "references"))

MODELS = {"mask": "mask_rcnn_convnext_tiny_coco", "cascade": "cascade_mask_rcnn_convnext_tiny_coco"}


def cpu_name() -> str:
    """The CPU as lscpu would name it (model name, family, model)."""
    info = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return (
        f"{info.get('model name', platform.processor())} (family {info.get('cpu family')} "
        f"model {info.get('model')}), {os.cpu_count()} CPUs"
    )


def photo() -> np.ndarray:
    from PIL import Image
    from skimage import data

    return np.asarray(Image.fromarray(data.coffee()[..., :3]).resize((1333, 800), Image.BILINEAR))


def contenders(kind: str, folder: Path):
    """``{name: fn()}`` for one detector: ours and the reference, on the same weights."""
    import mmdet_reference as mref
    import torch

    import convnext_keras as ck
    from convnext_keras import registry
    from convnext_keras.tasks import detect

    name = MODELS[kind]
    row = registry.CHECKPOINTS[name]
    settings = row.detection.eval
    torch_model = mref.build(registry.VARIANTS["tiny"], kind == "cascade", seed=0).eval()
    path = mref.save_mmdet(torch_model, folder / f"{kind}.pth")
    keras_model = ck.load_detection_model(name, weights=str(path))
    image = photo()
    rpn = dict(nms_pre=settings.rpn_pre_nms, max_per_img=settings.rpn_max)
    rpn.update(iou_threshold=settings.rpn_iou, min_bbox_size=settings.rpn_min_size)
    rcnn = dict(score_thr=settings.score_threshold, iou_threshold=settings.iou)
    rcnn.update(max_per_img=settings.max_detections, mask_thr_binary=settings.mask_threshold)

    def ours():
        return len(detect.detect_photo(keras_model, image, settings).scores)

    def reference():
        with torch.no_grad():
            img, meta = mref.preprocess(image, settings.image_scale)
            out = mref.simple_test(torch_model, img, meta, rpn_cfg=rpn, rcnn_cfg=rcnn)
        return len(out["scores"])

    return {"ours": ours, "reference": reference}


def run(kind: str, rounds: int, folder: Path) -> dict:
    fns = contenders(kind, folder)
    counts = {k: fn() for k, fn in fns.items()}  # warm-up (graph tracing, first allocations)
    times = {k: [] for k in fns}
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for k in order:
            start = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - start)
    ratios = [o / t for o, t in zip(times["ours"], times["reference"])]
    return {
        "model": MODELS[kind],
        "detections": counts,
        "seconds": times,
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "ratio_ours_over_reference": {
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
        },
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["mask", "cascade"])
    parser.add_argument("--out", type=Path, help="Write results.json and results.md here.")
    args = parser.parse_args(argv)
    import keras

    report = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_name(),
        "backend": keras.backend.backend(),
        "load_before": os.getloadavg(),
        "runs": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.models:
            report["runs"].append(run(kind, args.rounds, Path(tmp)))
            print(json.dumps(report["runs"][-1]["median_s"]), flush=True)
    report["load_after"] = os.getloadavg()
    lines = [
        f"# Detection on the CPU, {report['date']}",
        "",
        f"CPU: {report['cpu']}; Keras backend {report['backend']}; load average before "
        f"{report['load_before'][0]:.1f}, after {report['load_after'][0]:.1f}.",
        "",
        "| model | ours (s/image) | reference, PyTorch eager (s/image) | ours / reference "
        "(median, range) | detections |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in report["runs"]:
        q = r["ratio_ours_over_reference"]
        lines.append(
            f"| {r['model']} | {r['median_s']['ours']:.2f} | {r['median_s']['reference']:.2f} "
            f"| {q['median']:.2f}x ({q['min']:.2f}-{q['max']:.2f}) | {r['detections']['ours']} / "
            f"{r['detections']['reference']} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "results.md").write_text(text)


if __name__ == "__main__":
    main()
