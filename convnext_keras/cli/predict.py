"""``convnext predict`` and ``convnext eval``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from convnext_keras.cli import _checks as checks
from convnext_keras.cli._app import (
    RANDOM_WEIGHTS_BANNER,
    WEIGHTS_HELP,
    backend_option,
    calibration_option,
    engine_option,
    evaluation_options,
    exit_if_skipped,
    finish_evaluation,
    main,
    parse_weights,
    precision_option,
)

_MODEL_HELP = "Model name (convnext_tiny_1k_224, ...; see `convnext list`) or a .keras file."
_PRECISION_HELP = (
    "fp32, or Keras mixed precision bf16 / fp16 (runs on Keras: faster on GPUs, slower on CPUs "
    "without native bfloat16), or int8 (opt-in: onnxruntime on the CPU, the model quantized to "
    "int8 after calibration on real photos; close to fp32, not equal: see BENCHMARKS.md)."
)


def _read_labels(path):
    if path is None:
        return None
    names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not names:
        raise click.BadParameter(f"{path} holds no class names.", param_hint="--labels")
    return names


def _check_predict(model_name, images, weights, precision, calibration, cam_dir) -> None:
    """What ``predict`` checks before a backend loads (:mod:`._checks`)."""
    checks.classifier(model_name)
    checks.images(images)
    checks.engine_flags(precision, "auto", calibration)
    checks.cam(cam_dir)
    checks.weights(model_name, parse_weights(weights))


def _check_eval(model_name, weights, engine, precision, calibration) -> None:
    """What ``eval`` checks before a backend loads (DATA: Click checks it exists)."""
    checks.classifier(model_name)
    checks.engine_flags(precision, engine, calibration)
    checks.weights(model_name, parse_weights(weights))


@main.command("predict")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "model_name", required=True, help=_MODEL_HELP)
@click.option("--weights", default="official", show_default=True, help=WEIGHTS_HELP)
@click.option("--top", default=5, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@click.option(
    "--cam",
    "cam_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write a Grad-CAM overlay <image>_cam.png of each image's top class to this folder.",
)
@click.option(
    "--labels",
    "labels_file",
    type=click.Path(exists=True, dir_okay=False),
    help="Class names, one per line, for heads that are neither ImageNet-1k nor -21k "
    "(default for a .keras file: labels.txt beside it, as `convnext finetune` writes).",
)
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--no-exif", is_flag=True, help="Ignore EXIF orientation (default: photos turned upright)."
)
@precision_option(_PRECISION_HELP)
@calibration_option
@backend_option
def predict_command(
    images, model_name, weights, top, as_json, cam_dir, labels_file, batch_size, no_exif,
    precision, calibration,
):  # fmt: skip
    """Classify IMAGES: top-k labels with probabilities (softmax of the logits).

    Unreadable files (and any the model returns NaN/inf for) are reported and skipped; the
    exit status is 1 if any failed, 2 for a bad command (unknown model, damaged weights...).
    """
    _check_predict(model_name, images, weights, precision, calibration, cam_dir)
    from convnext_keras.tasks.predict import predict_files

    results = predict_files(
        model_name,
        images,
        weights=parse_weights(weights),
        top=top,
        labels=_read_labels(labels_file),
        batch_size=batch_size,
        cam_dir=cam_dir,
        exif_transpose=not no_exif,
        precision=precision,
        calibration=calibration,
    )
    if as_json:  # allow_nan=False: never the invalid JSON token NaN (predict_files has none)
        click.echo(json.dumps([r.to_dict() for r in results], indent=2, allow_nan=False))
    else:
        if any(r.random_weights for r in results):
            click.echo(RANDOM_WEIGHTS_BANNER)
        for r in results:
            if not r.ok:
                continue
            click.echo(r.path + ("  [random weights]" if r.random_weights else ""))
            width = max(len(p.name) for p in r.predictions)
            for rank, p in enumerate(r.predictions, 1):
                wnid = f"  {p.wnid}" if p.wnid else ""
                click.echo(f"  {rank}. {p.name:<{width}}  {100 * p.probability:6.2f}%{wnid}")
            if r.cam_path:
                click.echo(f"  Grad-CAM: {r.cam_path}")
    exit_if_skipped(results, "classified")


@main.command("eval")
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", "model_name", required=True, help=_MODEL_HELP)
@click.option("--weights", default="official", show_default=True, help=WEIGHTS_HELP)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@evaluation_options(
    "files", "Write a JSON report: per-class accuracy, unreadable files, per-image top-5."
)
@click.option(
    "--ground-truth",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Ground truth of the flat ILSVRC2012 layout, if not found beside DATA.",
)
@click.option("--real", is_flag=True, help="Also report ImageNet-ReaL acc@1.")
@click.option("--workers", type=click.IntRange(min=1), help="Decoding workers (default: CPUs).")
@click.option(
    "--processes/--threads",
    default=None,
    help="Decode in worker processes or threads (default: processes from 1000 images on).",
)
@click.option(
    "--single-device", is_flag=True, help="Do not replicate the model over several devices."
)
@engine_option(
    "auto: OpenVINO, else onnxruntime, on a single CPU device when installed (as predict), "
    "else Keras."
)
@precision_option(_PRECISION_HELP)
@calibration_option
@backend_option
def eval_command(
    data, model_name, weights, batch_size, limit, report, ground_truth, real, workers,
    processes, single_device, allow_unreadable, engine, precision, calibration,
):  # fmt: skip
    """Accuracy on ImageNet-1k validation DATA (class folders or flat ILSVRC2012 layout).

    Files that could not be evaluated (unreadable, unlabelled, a directory where an image should
    be, NaN/inf logits) are listed and make the exit status 1, unless --allow-unreadable.
    """
    _check_eval(model_name, weights, engine, precision, calibration)
    from convnext_keras.tasks.evaluate import evaluate

    result = evaluate(
        model_name,
        data,
        weights=parse_weights(weights),
        batch_size=batch_size,
        limit=limit,
        ground_truth=ground_truth,
        real=real,
        workers=workers,
        processes=processes,
        data_parallel=not single_device,
        engine=engine,
        precision=precision,
        calibration=calibration,
    )
    if result.evaluated == 0:  # an accuracy of nothing: say why instead (also with
        # --allow-unreadable, which accepts some files failing, not all)
        first = result.unreadable[0] if result.unreadable else {"file": data, "error": "none"}
        raise ValueError(
            f"None of the {len(result.unreadable)} file(s) in {data} could be evaluated (e.g. "
            f"{first['file']}: {first['error']}); fix or remove them and run again."
        )
    if result.config.get("random_weights"):
        click.echo(RANDOM_WEIGHTS_BANNER)
    backend = result.config["backend"] or "no backend: cached graph"  # None: the warm path
    click.echo(
        f"model     {result.model}  ({backend}, {result.devices} device(s),"
        f" engine {result.config.get('engine', 'keras')}, {result.config.get('precision', 'fp32')})"
    )
    click.echo(f"data      {result.data}  [{result.layout}]")
    click.echo(f"images    {result.evaluated} evaluated, {len(result.unreadable)} unreadable")
    click.echo(f"acc@1     {result.acc1:.3f}%")
    click.echo(f"acc@5     {result.acc5:.3f}%")
    if result.real_acc1 is not None:
        click.echo(f"ReaL@1    {result.real_acc1:.3f}%")
    pre = result.preprocess_images_per_s
    click.echo(
        f"speed     {result.images_per_s:.1f} img/s overall; model {result.model_images_per_s:.1f}"
        f" img/s; preprocessing {'-' if pre is None else f'{pre:.1f}'} img/s (first model call"
        f" {result.first_call_seconds:.1f} s)"
    )
    finish_evaluation(result, report, allow_unreadable, "file")
