"""Which files of a folder are images: the one rule every folder walker of this library uses.

* Each real directory is walked once, identified by its device and inode
  (``os.stat().st_dev, st_ino``): a link back up the tree (``ln -s .. sub/up``) or a second link
  to the same folder is followed no further, so no file is listed twice through a cycle.
* Only regular files are images, after following a link: a FIFO (named pipe), a socket, a
  device, a broken link or (where the folder is not walked into) a directory is *reported* -
  named with what it is - and skipped, never opened (opening a FIFO waits forever for a writer).
* Hidden files and folders (a name starting with ``.``) are left out, as before.

File names are kept as Python gives them: a name that is not valid UTF-8 comes back with
``surrogateescape`` characters (``caf\\udce9.jpg``), which :func:`os.fsencode` turns back into
the exact bytes on disk.

:func:`not_regular` answers the same question for one path (a file named on the command line);
:func:`convnext_keras.preprocess.load_image` asks it before PIL opens anything.

Imports nothing beyond the standard library.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

logger = logging.getLogger("convnext_keras")


def describe_mode(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` is, in words ("a FIFO (named pipe)", ...)."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "not a regular file"


def not_regular(path) -> str | None:
    """None when ``path`` is a regular file (after following links), else what it is instead:
    ``"no such file"``, ``"a broken link"``, ``"a directory"``, ``"a FIFO (named pipe)"``...

    Never opens the file, so a FIFO cannot block the caller.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a broken link" if os.path.islink(path) else "no such file"
    except OSError as e:  # e.g. a link loop (ELOOP), a permission denied on a parent
        return f"cannot be read ({e.strerror or type(e).__name__})"
    return None if stat.S_ISREG(mode) else describe_mode(mode)


def unidentified_reason(path) -> str:
    """Why PIL could not identify the regular file ``path`` as an image: ``"an empty file,
    0 bytes"`` for an empty one (an interrupted copy or download), else ``"not an image
    format PIL knows"``."""
    try:
        empty = os.stat(path).st_size == 0
    except (OSError, TypeError, ValueError):  # a file object, or gone since
        empty = False
    return "an empty file, 0 bytes" if empty else "not an image format PIL knows"


class Skipped(NamedTuple):
    """An entry of a walked folder that is not an image file, and why."""

    path: Path
    reason: str


class Listing(NamedTuple):
    """What :func:`image_files` found: the regular files and the entries skipped."""

    files: list[Path]
    skipped: list[Skipped]


def _wanted(name: str, suffixes: frozenset[str] | None) -> bool:
    return suffixes is None or os.path.splitext(name)[1].lower() in suffixes


def folder_key(path) -> tuple[int, int]:
    """``(device, inode)`` of a folder (after following links): its identity."""
    info = os.stat(path)
    return info.st_dev, info.st_ino


def _root_and_above(root: Path) -> set[tuple[int, int]]:
    """The identities of ``root`` and of every folder above it: a link to one of them leads
    back into the walk (a cycle) and is never followed."""
    keys = set()
    for folder in (root.resolve(), *root.resolve().parents):
        try:
            keys.add(folder_key(folder))
        except OSError:
            continue
    return keys


def image_files(
    root,
    *,
    suffixes: Iterable[str] | None = None,
    recursive: bool = True,
    report: Callable[[str], bool] | None = None,
    exclude: Iterable[tuple[int, int]] = (),
) -> Listing:
    """The regular files below ``root`` and the entries skipped, in ``os.walk``'s order: the
    files of a folder by name, then each sub-folder's, depth first, by name.

    Args:
        root: the folder (a link to one is followed).
        suffixes: file-name endings to keep (lower case with the dot, ``{".jpg", ".png"}``);
            None keeps every file.  Entries with other endings are neither listed nor
            reported.
        recursive: walk into sub-folders, following links to folders, each real folder once;
            a link to ``root`` or a folder above it (a cycle) is not followed.  False lists
            ``root`` alone, and a folder inside it whose name has a wanted ending
            (``x.jpg/``) is reported.
        report: which skipped entries to report, by name (default: those with a wanted
            ending); the others are skipped silently.
        exclude: identities (:func:`folder_key`) of folders not to walk into: the other class
            folders of a data set, so that a link from one class into another lists nothing
            twice.

    Raises:
        OSError (``FileNotFoundError``, ``NotADirectoryError``): ``root`` is not a folder.
    """
    root = Path(root)
    wanted = frozenset(s.lower() for s in suffixes) if suffixes is not None else None
    report = report or (lambda name: _wanted(name, wanted))
    if not stat.S_ISDIR(os.stat(root).st_mode):
        raise NotADirectoryError(20, "Not a folder", str(root))
    seen = _root_and_above(root) | set(exclude)
    files: list[Path] = []
    skipped: list[Skipped] = []
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            skipped.append(Skipped(folder, f"cannot be listed ({e.strerror or e})"))
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(folder, entry.name)
            try:
                info = entry.stat()  # follows a link
            except OSError:
                if report(entry.name):
                    skipped.append(Skipped(path, not_regular(path) or "cannot be read"))
                continue
            if stat.S_ISDIR(info.st_mode):
                if not recursive:
                    if _wanted(entry.name, wanted) and report(entry.name):
                        skipped.append(Skipped(path, "a directory"))
                    continue
                key = (info.st_dev, info.st_ino)
                if key in seen:
                    logger.info(f"convnext_keras: {path} leads to a folder walked already; skipped")
                    continue
                seen.add(key)
                subfolders.append(path)
            elif not _wanted(entry.name, wanted):
                continue
            elif stat.S_ISREG(info.st_mode):
                files.append(path)
            elif report(entry.name):
                skipped.append(Skipped(path, describe_mode(info.st_mode)))
        pending.extend(reversed(subfolders))  # depth first, in name order
    return Listing(files, skipped)


def subfolders(root) -> list[Path]:
    """The folders directly inside ``root`` (links to folders included; hidden ones left
    out), sorted by name."""
    found = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if not entry.name.startswith(".") and entry.is_dir():
            found.append(Path(root, entry.name))
    return found
