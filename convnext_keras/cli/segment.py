"""``convnext segment`` and ``convnext eval-seg``: semantic segmentation (UperNet on ADE20K)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import click

from convnext_keras.cli import _checks as checks
from convnext_keras.cli._app import (
    PRECISIONS,
    RANDOM_WEIGHTS_BANNER,
    backend_option,
    engine_option,
    evaluation_options,
    exit_if_skipped,
    finish_evaluation,
    main,
    parse_weights,
)

_MODEL_HELP = (
    "Segmentation model (upernet_convnext_tiny_ade20k_512, ...; `convnext list upernet`) or a "
    ".keras file of one."
)
_WEIGHTS_HELP = (
    "'official' (download once, then cached), 'none' (random initialisation) or a local "
    "mmsegmentation checkpoint (the official upernet_convnext_*.pth)."
)
#: Lines of classes printed per image (the JSON and the legend have them all).
_SHOWN = 8


def _inference_options(f):
    """The options ``segment`` and ``eval-seg`` share: mode, multi-scale, batch, precision.
    ``--slide`` / ``--whole`` reach the command as ``mode`` ("slide", "whole" or None: the
    row's); both at once is a usage error."""

    command = f

    @functools.wraps(command)
    def with_mode(*args, slide, whole, **kwargs):
        if slide and whole:
            raise click.UsageError("--slide and --whole exclude each other: give one of them.")
        return command(*args, mode="slide" if slide else "whole" if whole else None, **kwargs)

    f = with_mode
    for option in reversed(
        [
            click.option(
                "--slide",
                is_flag=True,
                help="Sliding windows of the model's crop (the official single-scale mode).",
            ),
            click.option("--whole", is_flag=True, help="The whole image in one pass."),
            click.option(
                "--multi-scale",
                is_flag=True,
                help="Multi-scale + flip (6 scales, each also flipped), as the original's "
                "--aug-test; 12 passes per image.",
            ),
            click.option(
                "--batch-size",
                default=4,
                show_default=True,
                type=click.IntRange(min=1),
                help="Sliding windows per model call.",
            ),
            click.option(
                "--precision",
                type=click.Choice([p for p in PRECISIONS if p != "int8"]),
                default="fp32",
                show_default=True,
                help="fp32, or Keras mixed precision bf16 / fp16 (float32 logits).",
            ),
            engine_option(
                "auto: onnxruntime on the CPU for fp32 when installed, else OpenVINO, else "
                "Keras (BENCHMARKS.md)."
            ),
        ]
    ):
        f = option(f)
    return f


@main.command("segment")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "model_name", required=True, help=_MODEL_HELP)
@click.option("--weights", default="official", show_default=True, help=_WEIGHTS_HELP)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write <image>_labels.png (palette PNG: pixel = class id), <image>_overlay.png and "
    "<image>_legend.png here.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@_inference_options
@click.option(
    "--no-exif", is_flag=True, help="Ignore EXIF orientation (default: photos turned upright)."
)
@backend_option
def segment_command(
    images, model_name, weights, out_dir, as_json, mode, multi_scale, batch_size, precision,
    engine, no_exif,
):  # fmt: skip
    """Label every pixel of IMAGES with one of ADE20K's 150 classes (UperNet-ConvNeXt).

    Prints the classes present with their share of the image; --out writes the label map, an
    overlay and a legend per image. Unreadable files are reported and skipped: exit status 1
    if any failed, 2 for a bad command.
    """
    checks.segmentation(model_name)
    checks.images(images)
    checks.engine_flags(precision, engine)
    checks.weights(model_name, parse_weights(weights), hub=False)
    from convnext_keras.tasks.segment import segment_files

    results = segment_files(
        model_name,
        images,
        weights=parse_weights(weights),
        out_dir=out_dir,
        mode=mode,
        multi_scale=multi_scale,
        batch_size=batch_size,
        exif_transpose=not no_exif,
        precision=precision,
        engine=engine,
    )
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results], indent=2, allow_nan=False))
    else:
        if any(r.random_weights for r in results):
            click.echo(RANDOM_WEIGHTS_BANNER)
        for r in results:
            if not r.ok:
                continue
            height, width = r.mask.shape
            tag = "  [random weights]" if r.random_weights else ""
            click.echo(
                f"{r.path}  (width {width} x height {height}, {len(r.classes)} classes){tag}"
            )
            for _, name, _, share in r.classes[:_SHOWN]:
                click.echo(f"  {100 * share:6.2f}%  {name}")
            if len(r.classes) > _SHOWN:
                click.echo(f"  ... {len(r.classes) - _SHOWN} more (see the legend or --json)")
            for kind, path in r.files.items():
                click.echo(f"  {kind}: {path}")
    exit_if_skipped(results, "segmented")


@main.command("eval-seg")
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", "model_name", required=True, help=_MODEL_HELP)
@click.option("--weights", default="official", show_default=True, help=_WEIGHTS_HELP)
@evaluation_options(
    "images", "Write a JSON report: per-class IoU and accuracy, unreadable files, settings."
)
@_inference_options
@backend_option
def eval_seg_command(
    data, model_name, weights, limit, report, mode, multi_scale, batch_size, precision,
    engine, allow_unreadable,
):  # fmt: skip
    """mIoU, mAcc and aAcc on ADE20K validation DATA (the ADEChallengeData2016 folder:
    images/validation/*.jpg, annotations/validation/*.png; label 0 is not scored)."""
    checks.segmentation(model_name)
    checks.engine_flags(precision, engine)
    checks.weights(model_name, parse_weights(weights), hub=False)
    from convnext_keras.tasks.segment_eval import evaluate_segmentation

    result = evaluate_segmentation(
        model_name,
        data,
        weights=parse_weights(weights),
        limit=limit,
        mode=mode,
        multi_scale=multi_scale,
        batch_size=batch_size,
        precision=precision,
        engine=engine,
    )
    config = result.config
    if config["random_weights"]:
        click.echo(RANDOM_WEIGHTS_BANNER)
    scales = "multi-scale + flip" if config["multi_scale"] else "single scale"
    click.echo(
        f"model     {result.model}  ({config['backend']}, engine {config['engine']}, "
        f"{config['precision']}, {scales}, {config['mode']})"
    )
    click.echo(f"data      {result.data}")
    click.echo(f"images    {result.evaluated} evaluated, {len(result.unreadable)} unreadable")
    for key, label in (("miou", "mIoU"), ("macc", "mAcc"), ("aacc", "aAcc")):
        click.echo(f"{label:<9} {getattr(result, key):.2f}%")
    click.echo(f"speed     {result.images_per_s:.2f} img/s ({result.seconds:.1f} s)")
    finish_evaluation(result, report, allow_unreadable, "image")
