"""``convnext export`` and ``convnext collection``."""

from __future__ import annotations

import sys

import click

from convnext_keras.cli import _checks as checks
from convnext_keras.cli._app import (
    RANDOM_WEIGHTS_BANNER,
    WEIGHTS_HELP,
    backend_option,
    main,
    parse_weights,
    quiet_backend_logs,
)

#: ``--format`` spellings of a keras-hub preset.
KERAS_HUB_FORMATS = ("keras-hub", "kerashub")


def _fail(error: Exception):
    click.echo(f"error: {error}", err=True)
    sys.exit(1)


def _keras_hub_preset(name, out, weights, overwrite):
    """``--format keras-hub``: :func:`convnext_keras.kerashub.export_preset`."""
    try:
        from convnext_keras.kerashub import export_preset
    except ImportError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    return export_preset(name, out, weights=weights, overwrite=overwrite)


@main.command("export")
@click.argument("name")
@click.option(
    "--format",
    "formats",
    multiple=True,
    default=["savedmodel"],
    show_default=True,
    help="savedmodel (TF-Hub-style, fine-tunable), onnx, tflite, keras, or keras-hub (a KerasHub "
    "preset folder with a model card: from_preset, upload_preset; needs the keras-hub extra); "
    "repeat for several.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory; writes OUT/NAME (SavedModel, keras-hub preset) or OUT/NAME.onnx|.tflite|"
    ".keras.",
)
@click.option(
    "--weights",
    default="official",
    show_default=True,
    help=WEIGHTS_HELP,
)
@click.option("--image-size", type=int, default=None, help="Input size (default: the model's).")
@click.option(
    "--dynamic-size/--fixed-size",
    default=None,
    help="Dynamic or fixed height/width (savedmodel, onnx, keras; default: dynamic for "
    "segmentation models, else fixed).",
)
@click.option(
    "--include-preprocessing",
    is_flag=True,
    help="savedmodel/keras: take uint8 RGB images of any size; crop, resize and normalise "
    "inside the model.",
)
@click.option("--overwrite", is_flag=True, help="Replace existing exports (once verified).")
@click.option(
    "--check-hub",
    is_flag=True,
    help="savedmodel: also run one hub.KerasLayer(trainable=True) fine-tuning step (tf-keras).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@backend_option
def export_command(
    name,
    formats,
    out,
    weights,
    image_size,
    dynamic_size,
    include_preprocessing,
    overwrite,
    check_hub,
    as_json,
):
    """Export model NAME (e.g. convnext_tiny_1k_224, or ..._fe for the feature extractor).

    Each export is reloaded and compared with the Keras model before it is moved into OUT;
    a failed verification leaves nothing there.
    """
    # (``ck.export`` the attribute is the function; import from the module: Keras-free.)
    from convnext_keras.export.exporter import ExportError, check_named, export_named

    presets = [f for f in formats if f.strip().lower().replace("_", "-") in KERAS_HUB_FORMATS]
    formats = [f for f in formats if f not in presets]
    options = {
        "--image-size": image_size is not None,
        "--dynamic-size/--fixed-size": dynamic_size is not None,
        "--include-preprocessing": include_preprocessing,
        "--check-hub": check_hub,
    }
    if presets and not formats and any(options.values()):
        given = ", ".join(k for k, v in options.items() if v)
        raise click.UsageError(
            f"{given} does not apply to --format keras-hub (a preset takes any size and "
            "carries its own preprocessing)"
        )
    if presets and any(f.strip().lower() in ("savedmodel", "saved_model", "tf") for f in formats):
        raise click.UsageError(
            "savedmodel and keras-hub would both write OUT/NAME; export them to different --out "
            "folders"
        )
    if formats:
        check_named(name, out, formats, overwrite=overwrite, check_hub=check_hub)
    checks.weights(name, parse_weights(weights))
    results = []
    try:
        if formats:
            results += export_named(
                name,
                out,
                formats,
                weights=parse_weights(weights),
                overwrite=overwrite,
                check_hub=check_hub,
                image_size=image_size,
                dynamic_size=dynamic_size,
                include_preprocessing=include_preprocessing,
            )
        if presets:
            results.append(_keras_hub_preset(name, out, parse_weights(weights), overwrite))
    except ExportError as e:
        _fail(e)
    if as_json:
        import json

        click.echo(json.dumps([r.to_dict() for r in results], indent=2))
        return
    if any(r.random_weights for r in results):  # once, however many formats were written
        click.echo(RANDOM_WEIGHTS_BANNER)
    for r in results:
        click.echo(
            f"wrote {r.path} ({r.format}; input {list(r.input_shape)} {r.input_dtype}; "
            f"outputs {', '.join(r.outputs)}; {r.seconds}s)"
        )
        for line in r.checks:
            click.echo(f"  verified: {line} (tolerance {r.tolerance:g})")
        if r.hub_check:
            h = r.hub_check
            click.echo(
                f"  hub.KerasLayer(trainable=True): {h['backbone_variables']} backbone variables, "
                f"{h['none_gradients'] + h['zero_gradients']} without gradient, {h['changed']} "
                f"changed by one SGD step, {h['regularization_losses']} regularisation losses, "
                f"{len(h['warnings'])} variable warnings"
            )


@main.command("collection")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Collection dir.")
@click.option("--models", "pattern", default=None, help="Shell pattern, e.g. 'convnext_tiny_*'.")
@click.option(
    "--weights-dir",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Directory with official checkpoint files under their official names; only these "
    "(and the cache) are used. Without it, weights come from the cache or are downloaded.",
)
@click.option("--overwrite", is_flag=True, help="Rebuild models that are already built.")
def collection_command(out, pattern, weights_dir, overwrite):
    """Build the TF-Hub-style collection: per model a classifier and a _fe SavedModel, .keras
    files and a model card, plus an index page. Skips what is already built and verified."""
    quiet_backend_logs()
    from convnext_keras.export import collection

    report = collection.build_collection(
        out, pattern, weights_dir=weights_dir, overwrite=overwrite, log=click.echo
    )
    click.echo(
        f"{len(report.built)} built, {len(report.skipped)} skipped (already built), "
        f"{len(report.missing)} missing weights, {len(report.failed)} failed; "
        f"index: {report.out / 'index.md'}"
    )
    if not report.ok:
        sys.exit(1)
