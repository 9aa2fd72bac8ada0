"""``convnext list`` and ``convnext convert``."""

from __future__ import annotations

import click

from ._app import echo_table, main


@main.command("list")
@click.argument("pattern", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--markdown", is_flag=True, help="A Markdown table (the README's model table).")
def list_command(pattern, as_json, markdown):
    """Show the collection: name, params, resolution, classes, reported acc@1, licence, cached?

    PATTERN filters names: shell-style ('convnext_base*384', 'convnextv2*') or a substring
    ('xlarge').  ConvNeXt V2 weights are CC-BY-NC-4.0 (non-commercial use only).
    """
    from .. import api

    rows = api.model_table(pattern)
    if as_json:
        import json

        click.echo(json.dumps(rows, indent=2))
        return
    header = ["name", "params", "res", "classes", "pre-training", "acc@1", "licence"]
    cells = [
        [
            r["name"],
            f"{r['params'] / 1e6:.1f}M",
            r["resolution"],
            "-" if r["classes"] is None else r["classes"],
            r["dataset"],
            "-" if r["acc1"] is None else f"{r['acc1']:.1f}",
            r["licence"],
        ]
        for r in rows
    ]
    if markdown:
        click.echo("| " + " | ".join(header) + " |")
        click.echo("|" + "|".join(["---", "---:", "---:", "---:", "---", "---:", "---"]) + "|")
        for row in cells:
            click.echo("| " + " | ".join(str(c) for c in row) + " |")
        return
    echo_table(
        f"ConvNeXt collection ({len(rows)} checkpoints; add '_fe' to a name for its feature "
        "extractor; CC-BY-NC-4.0 weights: non-commercial use only)",
        [*header, "cached"],
        [[*row, "yes" if r["cached"] else "no"] for row, r in zip(cells, rows)],
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
