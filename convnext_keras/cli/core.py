"""``convnext list``, ``convnext convert`` and ``convnext fetch``."""

from __future__ import annotations

from pathlib import Path

import click

from convnext_keras.cli._app import echo_table, main, quiet_backend_logs

#: What the table's title says about a licence when one of the rows shown carries it.
_LICENCE_NOTES = {
    "CC-BY-NC-4.0": "CC-BY-NC-4.0 weights: non-commercial use only",
    "LicenseRef-DINOv3": "LicenseRef-DINOv3: the DINOv3 License, accepted on the Hub, HF_TOKEN "
    "to download",
}


@main.command("list")
@click.argument("pattern", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--markdown",
    is_flag=True,
    help="A Markdown table (docs/models.md's columns but family and source).",
)
def list_command(pattern, as_json, markdown):
    """Show the collection: name, params, resolution, classes, what the original reports (acc@1,
    mIoU or box / mask AP), licence, source
    (the official server, or the Hugging Face Hub repository), cached? (``yes (mirror)``: from a
    CONVNEXT_BASE_URL mirror, not the official source; see `convnext cache list`). On a narrow
    terminal the names stay whole and other columns are left out.

    PATTERN filters names: shell-style ('convnext_base*384', 'convnextv2*') or a substring
    ('xlarge').  ConvNeXt V2 weights are CC-BY-NC-4.0 (non-commercial use only); DINOv3's are
    under the DINOv3 License (accept it on the Hub; the download needs HF_TOKEN); timm's are
    Apache-2.0.
    """
    from convnext_keras import api, registry

    rows = api.model_table(pattern)
    if not rows:
        import difflib

        close = difflib.get_close_matches(pattern, registry.model_names(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"{pattern!r} matches no model name.{hint} Use a substring ('xlarge', 'upernet') "
            "or a shell pattern ('convnext_base*384'); `convnext list` alone shows them all."
        )
    if as_json:
        import json

        click.echo(json.dumps(rows, indent=2))
        return
    header = ["name", "params", "res", "classes", "pre-training", "reported", "licence"]
    cells = [
        [
            r["name"],
            f"{r['params'] / 1e6:.1f}M",
            r["resolution"],
            "-" if r["classes"] is None else r["classes"],
            r["dataset"],
            r["reported"],
            r["licence"],
        ]
        for r in rows
    ]
    if markdown:  # one write: `| head` closing the pipe early is not an error of a line
        lines = ["| " + " | ".join(header) + " |"]
        lines.append("|" + "|".join(["---", "---:", "---:", "---:", "---", "---:", "---"]) + "|")
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in cells]
        click.echo("\n".join(lines))
        return
    twins = set(registry.model_names(include_fe=True))
    notes = [f"{len(rows)} checkpoint{'s' if len(rows) != 1 else ''}"]
    if any(f"{r['name']}_fe" in twins for r in rows):
        notes.append("add '_fe' to a name for its feature extractor")
    licences = {r["licence"] for r in rows}
    notes += [note for licence, note in _LICENCE_NOTES.items() if licence in licences]
    echo_table(
        f"ConvNeXt collection ({'; '.join(notes)})",
        [*header, "source", "cached"],
        [[*row, r["source"], _cached(r)] for row, r in zip(cells, rows)],
        justify={1: "right", 2: "right", 3: "right", 5: "right"},
        # Left out first on a narrow terminal (never the names): source, pre-training, ...,
        # and the licence last (what a user may do with the weights; the README promises it):
        # at 80 columns the whole collection (a detector's 44-character name) keeps the name
        # and the licence, a filtered list more.
        drop=(7, 4, 3, 2, 8, 1, 5, 6),
    )


def _cached(row: dict) -> str:
    """The "cached" cell: ``no``, ``yes``, or ``yes (mirror)`` for a file that did not come
    from its official source (``convnext cache list`` says where it came from)."""
    if not row["cached"]:
        return "no"
    return "yes" if row.get("cached_from") in ("official", "unknown") else "yes (mirror)"


@main.command("convert")
@click.argument("checkpoint", type=click.Path(exists=True))
@click.option(
    "--model",
    "model_name",
    required=True,
    help="Model name the checkpoint belongs to, e.g. convnext_tiny_1k_224.",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .keras file.")
@click.option(
    "--features",
    type=click.Choice(["classifier", "pooled", "pyramid", "dense"]),
    default=None,
    help="Head to keep (default: as the model name says).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def convert_command(checkpoint, model_name, out, features, overwrite):
    """Convert CHECKPOINT (official, isotropic, timm, Hugging Face, DINOv3 or FCMAE layout; a
    file, or a folder holding one, as transformers' save_pretrained writes it) to a .keras
    model."""
    from convnext_keras import api, registry

    registry.resolve(model_name)  # a typo is said before a backend loads
    quiet_backend_logs()

    path = api.convert_checkpoint(
        checkpoint, model_name, out, features=features, overwrite=overwrite
    )
    click.echo(f"wrote {path}")


@main.command("fetch")
@click.argument("names", nargs=-1, required=True)
@click.option(
    "--to",
    "folder",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to put the official files in (created).",
)
def fetch_command(names, folder):
    """Download official checkpoint files into a folder, to carry to a machine without internet.

    NAMES are model names (convnext_tiny_1k_224; an _fe twin means the same file) or shell
    patterns ('convnext_tiny_*'). Each file is verified (it must be that checkpoint) and kept
    under its official name; the cache's copy is used when there is one. On the other machine,
    point CONVNEXT_BASE_URL at the folder, or pass one file with --weights FILE (rows from the
    Hugging Face Hub: --weights FILE, or the copied Hugging Face cache with HF_HUB_OFFLINE=1).
    """
    from convnext_keras import api, registry
    from convnext_keras.weights import store

    wanted: dict[str, registry.Checkpoint] = {}
    for name in names:
        if any(c in name for c in "*?["):
            matched = api.list_models(name, include_fe=False)
            if not matched:
                raise ValueError(f"{name!r} matches no model name; see `convnext list`.")
        else:
            matched = [name]
        for each in matched:
            resolved = registry.resolve(each)
            if resolved.checkpoint is None:
                raise ValueError(
                    f"{each!r} is an architecture without an official checkpoint; see "
                    "`convnext list` for the names that have one."
                )
            wanted[resolved.checkpoint.filename] = resolved.checkpoint
    fetched = []
    for ckpt in wanted.values():
        path, how = store.fetch_official(ckpt, folder)
        size = path.stat().st_size / 1e6
        click.echo(f"{path}  ({ckpt.name}, {size:,.1f} MB, {how})")
        fetched.append((ckpt, path.expanduser().resolve()))
    for line in _offline_recipe(fetched, folder.expanduser().resolve()):
        click.echo(line)


def _command_for(ckpt) -> str:
    """The command that takes a row's file: segment, predict (a classifier), or embed (an
    encoder or feature extractor: pooled features)."""
    if ckpt.segmentation is not None:
        return "segment IMAGES"
    return "predict IMAGES" if ckpt.has_head else "embed IMAGES_DIR --out FEATURES"


def _offline_recipe(fetched, where: Path) -> list[str]:
    """What to run on the machine without internet, for what was fetched: official rows read
    the folder as ``CONVNEXT_BASE_URL``; Hub rows never do - they take ``--weights FILE``, or
    the copied Hugging Face cache with ``HF_HUB_OFFLINE=1``."""
    lines = []
    official = [(c, p) for c, p in fetched if not c.source.is_hub]
    if official:
        commands = sorted({_command_for(c) for c, _ in official})
        file = official[0][1] if len(official) == 1 else f"{where}/FILE"
        lines.append(
            f"On the machine without internet: CONVNEXT_BASE_URL={where.as_uri()}/ convnext "
            f"{' | '.join(commands)} ... --model NAME, or --weights {file}."
        )
    for ckpt, path in ((c, p) for c, p in fetched if c.source.is_hub):
        from convnext_keras.weights.hfhub import _hf_cache_root

        lines.append(
            f"On the machine without internet ({ckpt.name} comes from the Hugging Face Hub, "
            f"which CONVNEXT_BASE_URL does not serve): convnext {_command_for(ckpt)} --model "
            f"{ckpt.name} --weights {path}; or copy the Hugging Face cache "
            f"({_hf_cache_root()}) there, point HF_HUB_CACHE at it and set HF_HUB_OFFLINE=1."
        )
    return lines
