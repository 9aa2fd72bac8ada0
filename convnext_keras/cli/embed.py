"""``convnext embed``: pooled features of every image in a folder (Parquet or .npy)."""

from __future__ import annotations

import click

from convnext_keras.cli import _checks as checks
from convnext_keras.cli._app import (
    RANDOM_WEIGHTS_BANNER,
    WEIGHTS_HELP,
    backend_option,
    engine_option,
    main,
    parse_weights,
)


@main.command("embed")
@click.argument("images_dir", type=click.Path(file_okay=False))
@click.option(
    "--model",
    required=True,
    help="Any model name: a feature extractor (convnext_base_21k_224_fe), a classifier (its "
    "pooled features) or an architecture (convnext_atto, with --weights none or FILE).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Features folder.")
@click.option("--weights", default="official", show_default=True, help=WEIGHTS_HELP)
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["parquet", "npy"]),
    default="parquet",
    show_default=True,
    help="parquet: path, feature, model, preprocessing columns; npy: part-*.npy + paths.",
)
@click.option(
    "--shard",
    default=None,
    metavar="I/N",
    help="Embed every N-th image from the I-th only (0 <= I < N): N jobs fill one folder.",
)
@click.option(
    "--resolution",
    default=None,
    type=int,
    help=f"Input size, {checks.RESOLUTION_RULE}. [default: the model's evaluation resolution]",
)
@click.option(
    "--part-size",
    default=4096,
    show_default=True,
    type=click.IntRange(min=1),
    help="Images per part file, at least (a part ends at the first whole batch that reaches "
    "it; the last part may hold fewer). A killed run loses at most one part's work.",
)
@click.option("--workers", type=click.IntRange(min=1), help="Decoding threads (default: CPUs).")
@engine_option(
    "Inference engine (auto: OpenVINO, else onnxruntime, on a CPU when it can run the model)."
)
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="local",
    default=None,
    metavar="[ADDRESS]",
    help="Run on a Ray cluster with Ray Data (ADDRESS as ray.init takes it; alone: a local one).",
)
@click.option(
    "--actors",
    type=click.IntRange(min=1),
    help="--ray: model actors. [default: one per 4 CPUs of the cluster]",
)
@click.option("--quiet", is_flag=True, help="No start and end lines.")
@backend_option
def embed_command(
    images_dir,
    model,
    out,
    weights,
    batch_size,
    output_format,
    shard,
    resolution,
    part_size,
    workers,
    engine,
    ray_address,
    actors,
    quiet,
):
    """Pooled features of every image below IMAGES_DIR into --out: parts of (path, feature,
    model, preprocessing) and a manifest. A killed run continues where it stopped when run
    again with the same options; unreadable files are listed in the manifest."""
    from convnext_keras.tasks.embed import check_options, embed  # light: no Keras yet

    weights = parse_weights(weights)
    checks.model_name(model)
    checks.folder(images_dir, "image folder")
    check_options(model, output_format, shard, resolution, ray_address)
    checks.engine_flags(None, engine)
    checks.weights(model, weights)
    if weights is None:  # stderr: the features themselves go to files
        click.echo(RANDOM_WEIGHTS_BANNER, err=True)
    embed(
        images_dir,
        out,
        model=model,
        weights=weights,
        batch_size=batch_size,
        format=output_format,
        shard=shard,
        resolution=resolution,
        part_size=part_size,
        workers=workers,
        engine=engine,
        ray=ray_address,
        actors=actors,
        verbose=0 if quiet else 1,
    )
