"""How closely opt-in int8 follows float32 on models that learned something.

    python benchmarks/int8_fidelity.py --out benchmarks/results/int8_fidelity_<date>
    python benchmarks/int8_fidelity.py --dataset digits --epochs 2 --resolution 32   # quick

With random weights top-1 agreement means nothing (near-ties everywhere), and the official
weights cannot be downloaded here, so ImageNet accuracy of int8 is not measured.  Instead
ConvNeXt-atto is trained from scratch with the library's own recipe (``ck.finetune.run``: the
original's from-scratch settings, no layer decay) on image sets that ship with packages:

* ``digits``: scikit-learn's 1797 scans of handwritten digits (10 classes), upscaled; the
  run's own stratified 80/20 split;
* ``patches``: crops of the 14 sample photos of scikit-image and scikit-learn, one class per
  photo (which photo does this patch come from - colour, texture and content of real photos);
  training crops from the left 70 % of each photo, held-out crops from the right 30 %.

Each set is trained twice: from the library's initialisation (layer scale 1e-6, the
original's; after a few epochs the blocks' layer scales are still ~0.01, so the residual
blocks weigh little) and from a random transformers ConvNext whose layer scales start at 1.0
(blocks at full strength, as in ConvNeXt V2, which has none) - int8 errors inside the blocks
then reach the logits undamped.

Then, on the held-out images, float32 (the default engine) against int8
(``quantization.quantize_int8``) calibrated in several ways: on 64 and on 16 training images, on
the sample photos (not the task's images: what ``--precision int8`` does without
``--calibration``), and with ``reduce_range`` (7-bit weights: what CPUs without VNNI get).
Reported: top-1 agreement with float32, both accuracies, logit errors, and the float32 margin
of every image whose top-1 changed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

#: Crops per photo (``patches``): training crops from the left part, held-out from the right.
PATCHES_TRAIN, PATCHES_VAL, PATCH_SPLIT = 96, 24, 0.7


def digits_folder(root: Path, size: int) -> Path:
    """scikit-learn's digits as ``root/digit<k>/<n>.png`` RGB images of ``size`` pixels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for n, (image, label) in enumerate(zip(digits.images, digits.target)):
        pixels = (image / 16.0 * 255).astype(np.uint8)
        picture = Image.fromarray(pixels, "L").resize((size, size), Image.Resampling.BICUBIC)
        path = root / f"digit{label}" / f"{n:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.convert("RGB").save(path)
    return root


def patches_folder(root: Path, crop: int, seed: int = 0) -> Path:
    """``root/{train,val}/<photo>/<n>.png``: random ``crop``-pixel squares of each sample
    photo, training ones left of :data:`PATCH_SPLIT` of the width, held-out ones right of it."""
    from PIL import Image

    from convnext_keras.engines import quantization

    rng = np.random.default_rng(seed)
    for photo in quantization.sample_photos():
        image = Image.open(photo).convert("RGB")
        w, h = image.size
        split = int(w * PATCH_SPLIT)
        for part, count, (lo, hi) in (
            ("train", PATCHES_TRAIN, (0, split - crop)),
            ("val", PATCHES_VAL, (split, w - crop)),
        ):
            folder = root / part / photo.stem
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                x, y = int(rng.integers(lo, hi + 1)), int(rng.integers(0, h - crop + 1))
                image.crop((x, y, x + crop, y + crop)).save(folder / f"{n:03d}.png")
    return root


def start_checkpoint(work: Path, layer_scale: float) -> Path:
    """A random transformers ConvNext-atto with layer scales starting at ``layer_scale``, in
    Hugging Face's layout (``ck.finetune.run(weights=...)`` reads it; the head is replaced)."""
    import torch
    from transformers import ConvNextConfig, ConvNextForImageClassification

    from convnext_keras import registry

    spec = registry.VARIANTS["atto"]
    config = ConvNextConfig(
        depths=list(spec.depths),
        hidden_sizes=list(spec.dims),
        layer_norm_eps=registry.LAYER_NORM_EPSILON,
        layer_scale_init_value=layer_scale,
        num_labels=registry.NUM_CLASSES_1K,
    )
    torch.manual_seed(0)
    folder = work / f"atto_layer_scale_{layer_scale:g}"
    ConvNextForImageClassification(config).save_pretrained(folder)
    return folder / "model.safetensors"


def compare(fp32: np.ndarray, int8: np.ndarray, labels: np.ndarray) -> dict:
    """Top-1 agreement, accuracies, logit errors and the float32 margins of the flips."""
    top32, top8 = fp32.argmax(-1), int8.argmax(-1)
    ordered = np.sort(fp32, axis=-1)
    margin = ordered[:, -1] - ordered[:, -2]
    flips = np.flatnonzero(top32 != top8)
    diff = np.abs(int8.astype(np.float64) - fp32)
    return {
        "images": len(labels),
        "top1_agreement": float(np.mean(top32 == top8)),
        "top1_changed": int(len(flips)),
        "accuracy_fp32": float(np.mean(top32 == labels)),
        "accuracy_int8": float(np.mean(top8 == labels)),
        "max_abs_logit_error": float(diff.max()),
        "mean_abs_logit_error": float(diff.mean()),
        "relative_logit_error": float(np.linalg.norm(int8 - fp32) / np.linalg.norm(fp32)),
        "fp32_logit_range": float(np.ptp(fp32)),
        "median_fp32_margin": float(np.median(margin)),
        "fp32_margins_of_changed": sorted(float(m) for m in margin[flips]),
    }


def measure(dataset: str, layer_scale: float, args, work: Path) -> dict:
    import convnext_keras as ck
    from convnext_keras import registry
    from convnext_keras.engines import quantization, runners

    resolution = args.resolution if dataset == "patches" else args.digits_resolution
    if dataset == "digits":
        data = work / "digits"
        if not data.exists():
            digits_folder(data, size=resolution)
        split_options = {"val_fraction": 0.2}
    else:
        data = work / "patches"
        if not data.exists():
            patches_folder(data, crop=args.patch_crop)
        split_options = {"val_fraction": 0.0}
    if layer_scale != registry.LAYER_SCALE_INIT:
        split_options["weights"] = str(start_checkpoint(work, layer_scale))
    run_dir = work / f"run_{dataset}_{layer_scale:g}"
    started = time.perf_counter()
    result = ck.finetune.run(
        data,
        run_dir,
        model="convnext_atto",
        epochs=args.epochs,
        batch_size=32,
        resolution=resolution,
        lr=4e-3,
        min_lr=1e-5,
        warmup_epochs=1,
        layer_decay=1.0,
        weight_decay=0.05,
        drop_path=0.0,
        crop_scale=(0.6, 1.0),
        hflip=0.0 if dataset == "digits" else 0.5,  # mirrored digits are other glyphs
        checkpoint_every=0,
        checkpoint_minutes=0,
        export=False,
        verbose=1,
        **split_options,
    )
    train_seconds = time.perf_counter() - started
    recipe = json.loads((run_dir / "run.json").read_text())["recipe"]
    config = (recipe["resolution"], recipe["crop_pct"], recipe["interpolation"])
    split = ck.finetune.scan(data, val_fraction=recipe["val_fraction"], seed=recipe["seed"])
    val_files = [p for p, _ in split.val]
    labels = np.array([y for _, y in split.val])
    held_out = quantization.calibration_images(val_files, config, limit=len(val_files))
    train_files = [p for p, _ in split.train]
    model = ck.finetune.load_run(run_dir)
    fp32 = runners.OnnxRunner(model)(held_out)
    keras_logits = np.asarray(model.predict(held_out, batch_size=64, verbose=0))
    gammas = {
        stage: float(np.mean([np.abs(layer.get_weights()[0]).mean() for layer in model.layers
                              if layer.name.startswith(f"stage{stage}_") and
                              layer.name.endswith("layer_scale")]))
        for stage in range(4)
    }  # fmt: skip
    settings = {
        "64 training images": (
            quantization.calibration_images(train_files, config, limit=64),
            None,
        ),
        "16 training images": (
            quantization.calibration_images(train_files, config, limit=16),
            None,
        ),
        "the 14 sample photos (not the task's images)": (
            quantization.calibration_images(None, config),
            None,
        ),
        "64 training images, reduce_range (CPUs without VNNI)": (
            quantization.calibration_images(train_files, config, limit=64),
            True,
        ),
    }
    rows = {}
    for name, (calibration, reduce_range) in settings.items():
        graph = quantization.quantize_int8(model, calibration, reduce_range=reduce_range)
        session = runners.onnx_session(graph)
        int8 = session.run(None, {"images": held_out})[0]
        rows[name] = compare(fp32, int8, labels)
        print(f"{dataset}, calibrated on {name}: {rows[name]}", flush=True)
    return {
        "dataset": dataset,
        "layer_scale_init": layer_scale,
        "train_images": len(train_files),
        "held_out_images": len(val_files),
        "classes": len(split.classes),
        "resolution": resolution,
        "epochs": args.epochs,
        "train_seconds": train_seconds,
        "best_val_acc1_during_training": result.best_val_acc1,
        "fp32_engine_vs_keras_max_abs_diff": float(np.abs(fp32 - keras_logits).max()),
        "mean_abs_layer_scale_by_stage": gammas,
        "int8": rows,
    }


def markdown(report: dict) -> str:
    lines = [
        f"Date: {report['date']}. CPU: {report['machine']}. Command: `{report['command']}`.",
        "",
    ]
    for r in report["results"]:
        gammas = ", ".join(f"{v:.3f}" for v in r["mean_abs_layer_scale_by_stage"].values())
        lines += [
            f"### {r['dataset']}: atto trained from scratch at {r['resolution']} px, "
            f"{r['epochs']} epochs, layer scale from {r['layer_scale_init']:g} ({r['classes']} "
            f"classes, {r['train_images']} training / {r['held_out_images']} held-out images)",
            "",
            f"float32 held-out accuracy {100 * next(iter(r['int8'].values()))['accuracy_fp32']:.1f}"
            f"% (default engine = Keras within {r['fp32_engine_vs_keras_max_abs_diff']:.1e}); "
            f"mean |layer scale| by stage {gammas}; training {r['train_seconds']:.0f} s.",
            "",
            "| int8 calibrated on | top-1 agreement | changed | accuracy fp32 -> int8 | "
            "max / mean abs logit error | relative error | fp32 margins of the changed |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for name, c in r["int8"].items():
            margins = ", ".join(f"{m:.2f}" for m in c["fp32_margins_of_changed"]) or "-"
            lines.append(
                f"| {name} | {100 * c['top1_agreement']:.2f}% | {c['top1_changed']}/{c['images']}"
                f" | {100 * c['accuracy_fp32']:.1f}% -> {100 * c['accuracy_int8']:.1f}% | "
                f"{c['max_abs_logit_error']:.3f} / {c['mean_abs_logit_error']:.4f} | "
                f"{c['relative_logit_error']:.2e} | {margins} |"
            )
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["digits", "patches", "both"], default="both")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=64, help="patches' resolution")
    parser.add_argument("--digits-resolution", type=int, default=32,
                        help="digits' resolution (the scans are 8x8 pixels)")  # fmt: skip
    parser.add_argument("--layer-scale-init", default="1e-6,1.0",
                        help="initial layer scales, comma-separated: a run each")  # fmt: skip
    parser.add_argument("--patch-crop", type=int, default=96, help="patch side in photo pixels")
    parser.add_argument("--out", default=None, help="folder for results.json and results.md")
    args = parser.parse_args()

    from side_by_side import write_results

    from convnext_keras.tasks import bench

    started = datetime.datetime.now(datetime.timezone.utc)
    datasets = ["digits", "patches"] if args.dataset == "both" else [args.dataset]
    scales = [float(v) for v in args.layer_scale_init.split(",")]
    with tempfile.TemporaryDirectory(prefix="int8_fidelity_") as tmp:
        results = [measure(d, ls, args, Path(tmp)) for d in datasets for ls in scales]
    report = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": bench.cpu_description(),
        "command": "python " + " ".join(sys.argv),
        "results": results,
    }
    text = markdown(report)
    print(text)
    if args.out:
        write_results(args.out, report, text)


if __name__ == "__main__":
    main()
