"""Where each cached file came from, and the cache as a user sees it: list, verify, remove.

Every file the cache keeps for a registry row gets a provenance record beside it,
``<file>.source.json``, written atomically when the file is::

    {"model": "convnext_tiny_1k_224", "kind": "checkpoint",
     "url": "file:///mirror/convnext_tiny_1k_224_ema.pth",          (where it was fetched)
     "official_url": "https://dl.fbaipublicfiles.com/convnext/convnext_tiny_1k_224_ema.pth",
     "official": false, "via": "CONVNEXT_BASE_URL",
     "sha256": "...", "bytes": 114414741, "fetched": "2026-12-08T10:02:11Z"}

A converted-weights file (``keras/<name>.safetensors``) records the checkpoint it was converted
from (the same ``url`` / ``official``, and ``checkpoint_sha256``); ``sha256`` is always the
file's own.  A file that did not come from its official source
(a ``CONVNEXT_BASE_URL`` mirror or folder, an ``HF_ENDPOINT`` other than the Hub) says so in one
line each time a process first uses it (:func:`announce`), so a test file or a mirror's copy
cached under an official name is never silent.  Files cached before these records have none:
their source shows as ``unknown``.

:func:`scan` lists the cache (``convnext cache list``: each file's model, kind, size, source,
date), :func:`verify` checks every file against its SHA-256 record (``convnext cache verify``),
:func:`remove` deletes files by model name or pattern, or every file not from its official
source, with their records (``convnext cache remove``) - the jobs ``hf cache scan`` / ``hf cache
delete`` do for the Hugging Face cache.  A Hub row's checkpoint stays in the Hugging Face cache
(``hf cache scan`` lists it); this cache holds its converted weights.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import os
import re
import time
from pathlib import Path

from convnext_keras import registry
from convnext_keras.weights.cache import (
    RECORD_SUFFIX,
    DamagedFileError,
    atomic_path,
    cache_dir,
    check_record,
    locked,
    read_record,
    record_path,
)

logger = logging.getLogger("convnext_keras")

#: Suffix of the provenance record beside each cached file.
SUFFIX = ".source.json"
#: The kinds of files the cache keeps.
KINDS = ("checkpoint", "converted", "damaged")
_CORRUPT = re.compile(r"^(?P<name>.+)\.corrupt-\d{8}-\d{6}$")
_TEMP = re.compile(r"^\..+\.part$")


def source_path(path: Path) -> Path:
    """The provenance record of a cached file: ``<file>.source.json`` beside it."""
    path = Path(path)
    return path.with_name(path.name + SUFFIX)


def hub_endpoint() -> str:
    """The Hugging Face endpoint downloads go to (``HF_ENDPOINT``, else the Hub)."""
    import sys

    loaded = sys.modules.get("huggingface_hub.constants")
    endpoint = loaded.ENDPOINT if loaded is not None else os.environ.get("HF_ENDPOINT")
    return (endpoint or registry.HUB_URL).rstrip("/")


def origin(ckpt: registry.Checkpoint) -> dict:
    """Where ``ckpt``'s file is fetched from now: ``url``, ``official_url``, ``official`` and
    ``via`` (``"CONVNEXT_BASE_URL"``, ``"HF_ENDPOINT"``, or None for the official source)."""
    src = ckpt.source
    if src.is_hub:
        url = f"{hub_endpoint()}/{src.repo}/resolve/{src.revision or 'main'}/{src.path}"
        via = "HF_ENDPOINT"
    else:
        url, via = src.url, "CONVNEXT_BASE_URL"
    official = url == src.official_url
    return {
        "url": url,
        "official_url": src.official_url,
        "official": official,
        "via": None if official else via,
    }


def write(path: Path, ckpt: registry.Checkpoint, kind: str, where: dict, digest: str) -> None:
    """Record where the cached file ``path`` (``kind``: ``"checkpoint"`` or ``"converted"``)
    came from: ``where`` is :func:`origin`'s answer (for converted weights: their checkpoint's
    record), ``digest`` its SHA-256."""
    path = Path(path)
    info = {
        "model": ckpt.name,
        "kind": kind,
        "url": where.get("url"),
        "official_url": where.get("official_url", ckpt.source.official_url),
        "official": where.get("official"),
        "via": where.get("via"),
        "sha256": digest,
        "bytes": path.stat().st_size,
        "fetched": where.get("fetched") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if kind == "converted":  # from the checkpoint: its SHA-256 and when it was fetched
        info["checkpoint_sha256"] = where.get("sha256")
        info["converted"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with atomic_path(source_path(path)) as tmp:
        tmp.write_text(json.dumps(info, indent=1) + "\n")


def read(path: Path) -> dict | None:
    """The provenance record of ``path``, or None (none written: cached before records)."""
    try:
        info = json.loads(source_path(path).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


_announced: set[str] = set()


def announce(path: Path, info: dict | None) -> None:
    """Say once per process, in one line, that the cached file ``path`` did not come from its
    official source (``info``: its record; nothing is said for an official file or one
    without a record)."""
    if not info or info.get("official") is not False or str(path) in _announced:
        return
    _announced.add(str(path))
    via = f" ({info['via']})" if info.get("via") else ""
    when = f" on {info['fetched'][:10]}" if info.get("fetched") else ""
    digest = (info.get("checkpoint_sha256") or info.get("sha256") or "")[:12]
    logger.warning(
        f"convnext_keras: {info.get('model')}'s weights come from {info.get('url')}{via}{when}, "
        f"not its official source {info.get('official_url')} (SHA-256 {digest}...); "
        f"`convnext cache list` shows where each cached file came from, `convnext cache remove "
        f"{info.get('model')}` removes it."
    )


# ---------------------------------------------------------------------------------------------
# The cache as a user sees it


@dataclasses.dataclass
class Entry:
    """One file in the cache."""

    path: Path
    #: ``"checkpoint"`` (a downloaded file), ``"converted"`` (Keras weights) or ``"damaged"``
    #: (a file moved aside as ``<name>.corrupt-<time>`` when it stopped matching its record).
    kind: str
    #: The registry name it belongs to (None: a file no row names).
    model: str | None
    size: int
    #: Its provenance record (None: cached before records, or a damaged file).
    info: dict | None

    @property
    def official(self) -> bool | None:
        """Whether it came from its official source (None: not known)."""
        return None if self.info is None else self.info.get("official")

    @property
    def source(self) -> str:
        """Where it came from, in words: ``official``, the URL, or ``unknown``."""
        if self.kind == "damaged":
            return "damaged (moved aside)"
        if self.info is None:
            return "unknown (cached before provenance records)"
        if self.info.get("official"):
            return "official"
        via = f" ({self.info['via']})" if self.info.get("via") else ""
        return f"{self.info.get('url')}{via}"

    def files(self) -> list[Path]:
        """The file and its records."""
        return [self.path, record_path(self.path), source_path(self.path)]

    def as_dict(self) -> dict:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "model": self.model,
            "bytes": self.size,
            "source": self.source,
            "official": self.official,
            "url": (self.info or {}).get("url"),
            "sha256": (self.info or {}).get("sha256") or read_record(self.path),
            "fetched": (self.info or {}).get("fetched"),
        }


def _rows_by_file() -> dict[str, str]:
    """Cache path (relative to ``checkpoints/``) -> registry name, for official files."""
    return {c.source.cache_name: c.name for c in registry.CHECKPOINTS.values()}


def _is_side_file(name: str) -> bool:
    return name.endswith((RECORD_SUFFIX, SUFFIX)) or bool(_TEMP.match(name))


def scan() -> list[Entry]:
    """Every file in the cache (:func:`.cache.cache_dir`), sorted by model then kind: the
    downloaded checkpoints, the converted weights and the damaged files moved aside; records,
    locks and temporary files are not entries."""
    root = cache_dir()
    by_file = _rows_by_file()
    entries = []
    for kind_dir in ("checkpoints", "keras"):
        base = root / kind_dir
        if not base.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in sorted(filenames):
                if _is_side_file(name):
                    continue
                path = Path(dirpath, name)
                relative = path.relative_to(base).as_posix()
                corrupt = _CORRUPT.match(relative)
                kind = "checkpoint" if kind_dir == "checkpoints" else "converted"
                if corrupt:
                    kind, relative = "damaged", corrupt.group("name")
                if kind_dir == "checkpoints":
                    model = by_file.get(relative)
                else:
                    model = (
                        relative[: -len(".safetensors")]
                        if relative.endswith(".safetensors")
                        else None
                    )
                    model = model if model in registry.CHECKPOINTS else None
                try:
                    size = path.stat().st_size
                except OSError:
                    continue  # removed meanwhile
                info = None if kind == "damaged" else read(path)
                entries.append(Entry(path, kind, model, size, info))
    order = {k: i for i, k in enumerate(KINDS)}
    return sorted(entries, key=lambda e: (e.model or "~", order[e.kind], str(e.path)))


def select(
    entries: list[Entry], patterns=(), *, not_official: bool = False, damaged: bool = False
) -> list[Entry]:
    """The entries a removal means: those of the model names or shell patterns ``patterns``
    (an ``_fe`` twin means its checkpoint's files; a pattern without wildcards is a whole name,
    or a path below the cache), those not from their official source (``not_official``; files
    without a record are not counted), and the damaged ones (``damaged``).

    Raises ``ValueError`` for a pattern that matches nothing in the cache."""
    chosen: dict[Path, Entry] = {}
    for pattern in patterns:
        wanted = registry.canonical_name(pattern)
        if wanted.endswith("_fe") and wanted[: -len("_fe")] in registry.CHECKPOINTS:
            wanted = wanted[: -len("_fe")]
        wild = any(c in wanted for c in "*?[")
        hits = [
            e
            for e in entries
            if (e.model and (fnmatch.fnmatch(e.model, wanted) if wild else e.model == wanted))
            or str(e.path) == pattern
            or (wild and fnmatch.fnmatch(e.path.name, pattern))
        ]
        if not hits:
            names = sorted({e.model for e in entries if e.model})
            held = (
                f" The cache holds files of: {', '.join(names)}."
                if names
                else (" The cache is empty.")
            )
            raise ValueError(f"{pattern!r} matches no file in the cache {cache_dir()}.{held}")
        chosen.update((e.path, e) for e in hits)
    for e in entries:
        if (not_official and e.official is False) or (damaged and e.kind == "damaged"):
            chosen[e.path] = e
    return [e for e in entries if e.path in chosen]


def remove(entries: list[Entry]) -> int:
    """Delete each entry's file and its records (each under the file's lock, so that no
    process reading or writing it is cut off); returns the bytes freed."""
    freed = 0
    for entry in entries:
        with locked(entry.path):
            for file in entry.files():
                try:
                    size = file.stat().st_size
                    file.unlink()
                except FileNotFoundError:
                    continue
                freed += size
    return freed


def verify(entries: list[Entry]) -> list[tuple[Entry, str | None]]:
    """Each checkpoint and converted file checked against its SHA-256 record (and its
    provenance record's): ``[(entry, problem or None)]``.  A file without a record gets one
    (as on every load); nothing is moved or deleted.  Damaged files are reported as such."""
    results = []
    for entry in entries:
        if entry.kind == "damaged":
            results.append((entry, "moved aside earlier as damaged"))
            continue
        pinned = None
        recorded = (entry.info or {}).get("sha256")
        if recorded:
            pinned = (recorded, f"its provenance record {source_path(entry.path).name}")
        try:
            check_record(entry.path, pinned)
            results.append((entry, None))
        except DamagedFileError as e:
            results.append((entry, str(e)))
        except OSError as e:
            results.append((entry, f"unreadable ({e.strerror or e})"))
    return results
