"""``convnext cache``: what the weights cache holds and where each file came from; verify it;
remove files by model name or pattern (as ``hf cache scan`` / ``hf cache delete`` do for the
Hugging Face cache).  Keras-free."""

from __future__ import annotations

import sys

import click

from convnext_keras.cli._app import echo_table, main


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return ""  # unreachable


@main.group("cache")
def cache_group():
    """The weights cache ($CONVNEXT_HOME, default ~/.cache/convnext_keras): list it with sizes
    and sources, verify it, remove files.

    Every downloaded checkpoint and its converted Keras weights carry a record of where they
    came from (the official server, a CONVNEXT_BASE_URL mirror or folder, the Hugging Face
    Hub), their SHA-256 and when; a file that did not come from its official source says so
    once whenever it is used. Hub checkpoints stay in the Hugging Face cache (`hf cache scan`).
    """


def _entries(pattern: str | None):
    from convnext_keras.weights import provenance

    entries = provenance.scan()
    return provenance.select(entries, [pattern]) if pattern else entries


@cache_group.command("list")
@click.argument("pattern", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def cache_list(pattern, as_json):
    """Every cached file: model, kind (checkpoint, converted, damaged), size, source (official,
    the mirror's URL, or unknown for files cached before sources were recorded) and when it
    was fetched. PATTERN: a model name or shell pattern ('convnextv2*')."""
    from convnext_keras.weights.cache import cache_dir

    entries = _entries(pattern)
    if as_json:
        import json

        click.echo(json.dumps([e.as_dict() for e in entries], indent=2))
        return
    total = sum(e.size for e in entries)
    rows = [
        [
            e.model or e.path.name,
            e.kind,
            _size(e.size),
            e.source,
            ((e.info or {}).get("fetched") or "-")[:10],
        ]
        for e in entries
    ]
    echo_table(
        f"{cache_dir()}: {len(entries)} file(s), {_size(total)}",
        ["model", "kind", "size", "source", "fetched"],
        rows,
        justify={2: "right"},
        drop=(4, 1),
    )
    others = [e for e in entries if e.official is False]
    if others:
        click.echo(
            f"{len(others)} file(s) did not come from their official source; `convnext cache "
            "remove --not-official` removes them."
        )


@cache_group.command("verify")
@click.argument("pattern", required=False)
def cache_verify(pattern):
    """Check every cached file (or those of PATTERN) against its SHA-256 record. Exit status 1
    if any does not match (a damaged file is also moved aside and rebuilt when it is next
    used)."""
    from convnext_keras.weights import provenance

    results = provenance.verify(_entries(pattern))
    bad = [(e, problem) for e, problem in results if problem]
    for entry, problem in results:
        status = "ok" if problem is None else f"DAMAGED: {problem}"
        click.echo(f"{entry.path}  {status}")
    click.echo(f"{len(results) - len(bad)} of {len(results)} file(s) match their records.")
    if bad:
        click.echo(
            "`convnext cache remove NAME` removes a damaged file (the next use fetches it again).",
            err=True,
        )
        sys.exit(1)


@cache_group.command("remove")
@click.argument("patterns", nargs=-1)
@click.option(
    "--not-official",
    is_flag=True,
    help="Every file that did not come from its official source (a mirror, a folder).",
)
@click.option("--damaged", is_flag=True, help="The damaged files moved aside (*.corrupt-*).")
@click.option("--dry-run", is_flag=True, help="Show what would be removed; remove nothing.")
def cache_remove(patterns, not_official, damaged, dry_run):
    """Remove the cached files of PATTERNS (model names or shell patterns: an _fe twin means
    its checkpoint's files) with their records; the next use fetches them again."""
    from convnext_keras.weights import provenance

    if not (patterns or not_official or damaged):
        raise click.UsageError("Name what to remove: PATTERNS, --not-official or --damaged.")
    chosen = provenance.select(
        provenance.scan(), patterns, not_official=not_official, damaged=damaged
    )
    if not chosen:
        click.echo("Nothing to remove.")
        return
    for entry in chosen:
        what = entry.model or entry.path.name
        click.echo(
            f"{'would remove' if dry_run else 'removing'} {entry.path}  ({what}, {entry.kind}, "
            f"{_size(entry.size)}, {entry.source})"
        )
    total = sum(e.size for e in chosen)
    if dry_run:
        click.echo(f"{len(chosen)} file(s), {_size(total)} (dry run: nothing removed).")
        return
    freed = provenance.remove(chosen)
    click.echo(f"removed {len(chosen)} file(s), freed {_size(freed)}.")
