"""``convnext detect`` and ``convnext eval-det``: object detection and instance segmentation
(Mask R-CNN / Cascade Mask R-CNN on COCO)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from convnext_keras.cli import _checks as checks
from convnext_keras.cli._app import (
    PRECISIONS,
    RANDOM_WEIGHTS_BANNER,
    backend_option,
    evaluation_options,
    exit_if_skipped,
    finish_evaluation,
    main,
    parse_weights,
)

_MODEL_HELP = (
    "Detection model (mask_rcnn_convnext_tiny_coco, cascade_mask_rcnn_convnext_tiny_coco, ...; "
    "`convnext list coco`) or a .keras file of one."
)
_WEIGHTS_HELP = (
    "'official' (download once, then cached), 'none' (random initialisation) or a local "
    "mmdetection checkpoint (the official *mask_rcnn_convnext_*.pth)."
)
#: Detections printed per image (the JSON and the overlay have them all).
_SHOWN = 10


@main.command("detect")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "model_name", required=True, help=_MODEL_HELP)
@click.option("--weights", default="official", show_default=True, help=_WEIGHTS_HELP)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write <image>_overlay.png (masks, boxes and a legend) and <image>_detections.json "
    "(COCO results entries, masks as RLE) here.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@click.option(
    "--precision",
    type=click.Choice([p for p in PRECISIONS if p != "int8"]),
    default="fp32",
    show_default=True,
    help="fp32, or Keras mixed precision bf16 / fp16 (float32 boxes, scores and masks).",
)
@click.option(
    "--score",
    "score_threshold",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    default=None,
    help="Keep detections whose class score is above this (default: the checkpoint's test "
    "setting, 0.05, as COCO AP is measured; 0.3 for a picture).",
)
@click.option(
    "--no-exif", is_flag=True, help="Ignore EXIF orientation (default: photos turned upright)."
)
@backend_option
def detect_command(
    images, model_name, weights, out_dir, as_json, precision, score_threshold, no_exif
):  # fmt: skip
    """Find the objects of COCO's 80 classes in IMAGES: boxes, classes, scores and masks.

    Prints the detections of each image, best first; --out writes an overlay and the COCO
    results JSON per image. Unreadable files are reported and skipped: exit status 1 if any
    failed, 2 for a bad command.
    """
    checks.detection(model_name)
    checks.images(images)
    from convnext_keras.tasks.detect import detect_files

    results = detect_files(
        model_name,
        images,
        weights=parse_weights(weights),
        out_dir=out_dir,
        exif_transpose=not no_exif,
        precision=precision,
        score_threshold=score_threshold,
    )
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results], indent=2, allow_nan=False))
    else:
        if any(r.random_weights for r in results):
            click.echo(RANDOM_WEIGHTS_BANNER)
        for r in results:
            if not r.ok:
                continue
            height, width = r.masks.shape[1:]
            tag = "  [random weights]" if r.random_weights else ""
            click.echo(f"{r.path}  ({width}x{height}, {len(r.scores)} detections){tag}")
            for name, score, box in list(zip(r.names, r.scores, r.boxes))[:_SHOWN]:
                corners = ", ".join(f"{v:.0f}" for v in box)
                click.echo(f"  {score:.3f}  {name:<16} [{corners}]")
            if len(r.scores) > _SHOWN:
                click.echo(f"  ... {len(r.scores) - _SHOWN} more (see the overlay or --json)")
            for kind, path in r.files.items():
                click.echo(f"  {kind}: {path}")
    exit_if_skipped(results, "detected")


@main.command("eval-det")
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", "model_name", required=True, help=_MODEL_HELP)
@click.option("--weights", default="official", show_default=True, help=_WEIGHTS_HELP)
@click.option("--split", default="val2017", show_default=True, help="COCO split to score.")
@evaluation_options("images", "Write a JSON report: every COCO statistic, unreadable files.")
@click.option(
    "--precision",
    type=click.Choice([p for p in PRECISIONS if p != "int8"]),
    default="fp32",
    show_default=True,
    help="fp32, or Keras mixed precision bf16 / fp16.",
)
@backend_option
def eval_det_command(
    data, model_name, weights, split, limit, report, allow_unreadable, precision
):  # fmt: skip
    """Box and mask AP on COCO DATA (annotations/instances_val2017.json and val2017/*.jpg),
    through the COCO API (pycocotools)."""
    checks.detection(model_name)
    from convnext_keras.tasks.detect_eval import evaluate_detection

    result = evaluate_detection(
        model_name,
        data,
        weights=parse_weights(weights),
        split=split,
        limit=limit,
        precision=precision,
    )
    config = result.config
    if config["random_weights"]:
        click.echo(RANDOM_WEIGHTS_BANNER)
    click.echo(f"model     {result.model}  ({config['backend']}, {config['precision']})")
    click.echo(f"data      {result.data} ({config['split']})")
    click.echo(f"images    {result.evaluated} evaluated, {len(result.unreadable)} unreadable")
    for kind, label in (("bbox", "box"), ("segm", "mask")):
        stats = result.stats[kind]
        shown = "  ".join(
            f"{name} {'-' if stats[name] is None else format(stats[name], '.1f')}"
            for name in ("AP", "AP50", "AP75")
        )
        click.echo(f"{label:<9} {shown}")
    click.echo(f"speed     {result.images_per_s:.2f} img/s ({result.seconds:.1f} s)")
    finish_evaluation(result, report, allow_unreadable, "image")
