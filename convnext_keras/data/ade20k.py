"""ADE20K (the MIT Scene Parsing benchmark, 150 classes): class names, palette, the
ADEChallengeData2016 folder layout and its annotations.

* :func:`classes` and :func:`palette`: output ``i`` of the segmentation models is class ``i``,
  named and coloured as mmsegmentation's ``ADE20KDataset`` (``mmseg/datasets/ade.py``; the
  original's configs evaluate with it).  Shipped in ``data/ade20k150.tsv`` (sources and
  licences: ``convnext_keras/data/README.md``).
* :func:`find_pairs`: the validation images and their annotations in the layout of
  ``ADEChallengeData2016.zip`` (``images/validation/*.jpg``, ``annotations/validation/*.png``).
* :func:`read_annotation`: an annotation PNG as class ids the way mmseg's
  ``LoadAnnotations(reduce_zero_label=True)`` makes them (``mmseg/datasets/pipelines/
  loading.py``): the file read as mmcv's ``imfrombytes(flag="unchanged", backend="pillow")``
  reads it, cast to ``uint8``, then ``0 -> 255``, ``v -> v - 1``, ``254 -> 255``: 0 ("other")
  and 255 become :data:`IGNORE_INDEX` (never scored), every other value ``v`` class ``v - 1``.

Imports no Keras.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from convnext_keras import registry
from convnext_keras.errors import ImageError

#: Label value that is not scored (mmseg's ``ignore_index``).
IGNORE_INDEX = 255
#: The folder the benchmark's archive unpacks to.
ARCHIVE_FOLDER = "ADEChallengeData2016"


@functools.cache
def _table() -> tuple[tuple[str, ...], np.ndarray]:
    from convnext_keras.data.labels import _read_text

    names, colours = [], []
    for line in _read_text("ade20k150.tsv").splitlines():
        name, colour = line.split("\t")
        names.append(name)
        colours.append([int(colour[i : i + 2], 16) for i in (0, 2, 4)])
    if len(names) != registry.NUM_CLASSES_ADE20K:
        raise RuntimeError(f"data/ade20k150.tsv holds {len(names)} classes, not 150")
    table = np.asarray(colours, dtype=np.uint8)
    table.setflags(write=False)
    return tuple(names), table


def classes() -> tuple[str, ...]:
    """The 150 class names in the order of the models' outputs (``"wall"``, ``"building"``...)."""
    return _table()[0]


def palette() -> np.ndarray:
    """The ``(150, 3)`` uint8 RGB colour of each class (read-only)."""
    return _table()[1]


def _label_values(image) -> np.ndarray:
    """The pixel values of a single-channel annotation as mmseg reads them: mmcv's pillow
    backend with ``flag="unchanged"`` (``np.array(image)``) then ``.astype(np.uint8)``: integer
    modes (``L``, ``P``'s palette indices, ``1``, ``I;16``, ``I``) exactly as numpy's cast does
    (modulo 256); ``F`` only where every value is a whole number in 0..255 (numpy's cast of
    other floats is undefined)."""
    values = np.asarray(image)
    if values.ndim != 2:
        raise ValueError(
            f"an annotation is a single-channel label image (class id per pixel), this one is "
            f"{image.mode} ({values.shape[-1]} channels)"
        )
    if np.issubdtype(values.dtype, np.floating):
        whole = np.isfinite(values) & (values == np.floor(values)) & (values >= 0) & (values <= 255)
        if not whole.all():
            raise ValueError(
                f"an annotation holds whole class ids 0..255; this {image.mode} image holds "
                f"other values (e.g. {values[~whole].flat[0]!r})"
            )
    return values.astype(np.uint8)


def reduce_zero_label(values: np.ndarray) -> np.ndarray:
    """mmseg's ``reduce_zero_label`` on ``uint8`` label values: ``0 -> 255``, ``v -> v - 1``,
    ``254 -> 255`` (so 0 and 255 are ignored, 1..254 become 0..253) -> ``int64``."""
    values = np.array(values, dtype=np.uint8)
    values[values == 0] = 255
    values = values - np.uint8(1)
    values[values == 254] = 255
    return values.astype(np.int64)


def read_annotation(path) -> np.ndarray:
    """An ADE20K annotation PNG as ``(H, W)`` int64 class ids, as mmseg's
    ``LoadAnnotations(reduce_zero_label=True)`` makes them: 0 and 255 -> :data:`IGNORE_INDEX`,
    ``v`` -> ``v - 1`` (see :func:`reduce_zero_label`); any single-channel mode PIL opens.

    Raises:
        convnext_keras.errors.ImageError (a ``ValueError``): the file is missing, not a
            regular file, unreadable, or not a single-channel label image.
    """
    from PIL import Image

    from convnext_keras.data.files import not_regular

    problem = not_regular(path)
    if problem is not None:
        raise ImageError(path, problem if problem == "no such file" else f"{problem}, not a PNG")
    try:
        with Image.open(path) as image:
            image.load()
            values = _label_values(image)
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    except ValueError as e:
        raise ImageError(path, str(e)) from None
    except Exception as e:  # PIL raises OSError, SyntaxError... on damaged files
        raise ImageError(path, f"{type(e).__name__}: {e}") from e
    return reduce_zero_label(values)


def find_pairs(root, split: str = "validation") -> tuple[list[tuple[Path, Path]], list[dict]]:
    """``([(image, annotation), ...], problems)`` of an ADEChallengeData2016 folder.

    ``root`` is the unpacked ``ADEChallengeData2016`` folder (or the folder that holds it).
    Images are ``images/<split>/*.jpg`` in sorted order, each with ``annotations/<split>/
    <stem>.png``; an image without annotation is a problem (``{"file", "error"}``), not a pair,
    and so is an entry named ``*.jpg`` that is not a regular file (a directory, a FIFO:
    :func:`convnext_keras.data.files.image_files`).

    Raises:
        FileNotFoundError: no such folder.  ValueError: it is not in this layout, or holds no
            image.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"No such folder: {root}")
    if not (root / "images").is_dir() and (root / ARCHIVE_FOLDER / "images").is_dir():
        root = root / ARCHIVE_FOLDER
    images, annotations = root / "images" / split, root / "annotations" / split
    if not images.is_dir() or not annotations.is_dir():
        raise ValueError(
            f"{root} is not in the ADEChallengeData2016 layout: expected images/{split}/*.jpg "
            f"and annotations/{split}/*.png below it (unpack ADEChallengeData2016.zip of "
            "http://sceneparsing.csail.mit.edu and pass the ADEChallengeData2016 folder)."
        )
    from convnext_keras.data import files as walker

    files, skipped = walker.image_files(images, suffixes={".jpg"}, recursive=False)
    if not files and not skipped:
        raise ValueError(f"{images} holds no .jpg image.")
    pairs = []
    problems = [{"file": str(s.path), "error": f"{s.reason}, not an image file"} for s in skipped]
    for image in files:
        label = annotations / f"{image.stem}.png"
        if label.is_file():
            pairs.append((image, label))
        else:
            problems.append({"file": str(image), "error": f"no annotation {label}"})
    return pairs, problems
