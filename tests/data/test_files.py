"""The one folder-walking rule (``convnext_keras.data.files``): each real folder once, regular
files only, everything else named and skipped - never opened.

The walker is checked against a listing written here by hand for each tree; the FIFO cases
run in a thread with a deadline, so a regression that opens one fails instead of hanging.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from convnext_keras.data import files

IMAGES = {".jpg", ".png"}


def _tree(root: Path) -> Path:
    """a/1.jpg a/2.png a/notes.txt a/.hidden.jpg a/sub/3.jpg b/4.jpg .cache/5.jpg"""
    for name in ["a/1.jpg", "a/2.png", "a/notes.txt", "a/.hidden.jpg", "a/sub/3.jpg", "b/4.jpg",
                 ".cache/5.jpg"]:  # fmt: skip
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    return root


def _names(paths, root) -> list[str]:
    return [Path(p).relative_to(root).as_posix() for p in paths]


def _within(seconds, function):
    """``function()`` in a thread; fails (instead of hanging the suite) after ``seconds``."""
    result = {}

    def call():
        try:
            result["value"] = function()
        except BaseException as e:  # handed to the test
            result["error"] = e

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"no answer within {seconds} s (a FIFO was opened?)"
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_regular_files_in_walk_order_hidden_left_out(tmp_path):
    root = _tree(tmp_path)
    listing = files.image_files(root, suffixes=IMAGES)
    # os.walk's order: a folder's files by name, then each sub-folder, depth first.
    assert _names(listing.files, root) == ["a/1.jpg", "a/2.png", "a/sub/3.jpg", "b/4.jpg"]
    assert listing.skipped == []
    every = files.image_files(root / "a")  # no suffix filter: every regular file
    assert _names(every.files, root / "a") == ["1.jpg", "2.png", "notes.txt", "sub/3.jpg"]


def test_a_link_back_up_the_tree_is_walked_once(tmp_path):
    """``ln -s .. sub/up`` made 3 images 123 rows (os.walk(followlinks=True) went round the
    cycle until the path was too long); a link to a folder above the root, or a second link to
    one folder, is not followed either.  A link to a folder outside the tree is."""
    root = _tree(tmp_path / "data")
    os.symlink("..", root / "a" / "sub" / "up")  # -> a: a cycle
    os.symlink("../..", root / "b" / "top")  # -> tmp_path: above the root
    os.symlink("../a", root / "b" / "again")  # -> a, walked already
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "6.jpg").write_bytes(b"x")
    os.symlink(outside, root / "b" / "elsewhere")
    listing = files.image_files(root, suffixes=IMAGES)
    assert _names(listing.files, root) == [
        "a/1.jpg", "a/2.png", "a/sub/3.jpg", "b/4.jpg", "b/elsewhere/6.jpg",
    ]  # fmt: skip
    # The class folders of a data set exclude each other: a link from one into another lists
    # nothing twice (in another class, or the other split).
    claimed = {files.folder_key(root / "a"), files.folder_key(root / "b")}
    only_b = files.image_files(root / "b", suffixes=IMAGES, exclude=claimed)
    assert _names(only_b.files, root / "b") == ["4.jpg", "elsewhere/6.jpg"]


def test_entries_that_are_not_regular_files_are_named_never_opened(tmp_path):
    root = _tree(tmp_path)
    os.mkfifo(root / "a" / "pipe.jpg")  # opening it would wait for a writer forever
    os.symlink("gone.jpg", root / "a" / "broken.jpg")
    (root / "a" / "folder.jpg").mkdir()  # walked into when recursive, reported when not
    (root / "a" / "folder.jpg" / "7.jpg").write_bytes(b"x")
    os.mkfifo(root / "a" / "pipe.txt")  # not an image name: not reported
    listing = _within(10, lambda: files.image_files(root / "a", suffixes=IMAGES))
    assert _names(listing.files, root / "a") == ["1.jpg", "2.png", "folder.jpg/7.jpg", "sub/3.jpg"]
    assert {(p.name, why) for p, why in listing.skipped} == {
        ("broken.jpg", "a broken link"),
        ("pipe.jpg", "a FIFO (named pipe)"),
    }
    flat = _within(10, lambda: files.image_files(root / "a", suffixes=IMAGES, recursive=False))
    assert _names(flat.files, root / "a") == ["1.jpg", "2.png"]
    assert {(p.name, why) for p, why in flat.skipped} == {
        ("broken.jpg", "a broken link"),
        ("folder.jpg", "a directory"),
        ("pipe.jpg", "a FIFO (named pipe)"),
    }
    assert files.not_regular(root / "a" / "1.jpg") is None
    assert files.not_regular(root / "a" / "pipe.jpg") == "a FIFO (named pipe)"
    assert files.not_regular(root / "a" / "folder.jpg") == "a directory"
    assert files.not_regular(root / "a" / "broken.jpg") == "a broken link"
    assert files.not_regular(root / "a" / "missing.jpg") == "no such file"
    assert files.not_regular("/dev/null") == "a device"


def test_file_names_that_are_not_utf8_are_kept_exactly(tmp_path):
    name = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes: 'caf\udce9.jpg' in Python
    (tmp_path / name).write_bytes(b"x")
    (listed,) = files.image_files(tmp_path, suffixes=IMAGES).files
    assert os.fsencode(listed.name) == b"caf\xe9.jpg" and listed.is_file()


def test_a_root_that_is_not_a_folder_is_an_error(tmp_path):
    (tmp_path / "f.jpg").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        files.image_files(tmp_path / "f.jpg")
    with pytest.raises(FileNotFoundError):
        files.image_files(tmp_path / "missing")
    assert files.subfolders(_tree(tmp_path / "t")) == [tmp_path / "t" / "a", tmp_path / "t" / "b"]
