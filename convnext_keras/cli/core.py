"""``convnext list`` and ``convnext convert``."""

from __future__ import annotations

import click

from ._app import echo_table, main


@main.command("list")
@click.argument("pattern", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_command(pattern, as_json):
    """Show the collection: name, params, resolution, classes, reported acc@1, cached?

    PATTERN filters names shell-style, e.g. 'convnext_base*384'.
    """
    from .. import api, hub, registry

    rows = []
    for name in api.list_models(pattern, include_fe=False):
        c = registry.CHECKPOINTS[name]
        rows.append(
            {
                "name": name,
                "params": api.count_params(c.variant, c.num_classes),
                "resolution": c.resolution,
                "classes": c.num_classes,
                "dataset": c.dataset,
                "acc1": c.reported_acc1,
                "cached": hub.is_cached(c),
                "url": c.url,
            }
        )
    if as_json:
        import json

        click.echo(json.dumps(rows, indent=2))
        return
    echo_table(
        f"ConvNeXt collection ({len(rows)} checkpoints; add '_fe' to a name for its feature "
        "extractor)",
        ["name", "params", "res", "classes", "pre-training", "acc@1", "cached"],
        [
            [
                r["name"],
                f"{r['params'] / 1e6:.1f}M",
                r["resolution"],
                r["classes"],
                r["dataset"],
                "-" if r["acc1"] is None else f"{r['acc1']:.1f}",
                "yes" if r["cached"] else "no",
            ]
            for r in rows
        ],
        justify={1: "right", 2: "right", 3: "right", 5: "right"},
    )


@main.command("convert")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--model",
    "model_name",
    required=True,
    help="Model name the checkpoint belongs to, e.g. convnext_tiny_1k_224.",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .keras file.")
@click.option(
    "--features",
    type=click.Choice(["classifier", "pooled", "pyramid"]),
    default=None,
    help="Head to keep (default: as the model name says).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def convert_command(checkpoint, model_name, out, features, overwrite):
    """Convert CHECKPOINT (official, timm or Hugging Face layout) to a .keras model."""
    from .. import api

    path = api.convert_checkpoint(
        checkpoint, model_name, out, features=features, overwrite=overwrite
    )
    click.echo(f"wrote {path}")
