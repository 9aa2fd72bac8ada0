"""ADE20K (the MIT Scene Parsing benchmark, 150 classes): class names, palette, the
ADEChallengeData2016 folder layout and its annotations.

* :func:`classes` and :func:`palette`: output ``i`` of the segmentation models is class ``i``,
  named and coloured as mmsegmentation's ``ADE20KDataset`` (``mmseg/datasets/ade.py``; the
  original's configs evaluate with it).  Shipped in ``data/ade20k150.tsv`` (sources and
  licences: ``convnext_keras/data/README.md``).
* :func:`find_pairs`: the validation images and their annotations in the layout of
  ``ADEChallengeData2016.zip`` (``images/validation/*.jpg``, ``annotations/validation/*.png``).
* :func:`read_annotation`: an annotation PNG as class ids the way mmseg's
  ``LoadAnnotations(reduce_zero_label=True)`` makes them: 0 ("other") becomes
  :data:`IGNORE_INDEX`, every other value ``v`` becomes class ``v - 1``.

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


def read_annotation(path) -> np.ndarray:
    """An ADE20K annotation PNG as ``(H, W)`` int64 class ids: 0 -> :data:`IGNORE_INDEX`,
    ``v`` -> ``v - 1`` (mmseg ``reduce_zero_label``).

    Raises:
        convnext_keras.errors.ImageError (a ``ValueError``): the file is missing,
            unreadable, or not a single-channel 8-bit label image.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in ("L", "P"):
                raise ImageError(
                    path,
                    f"an annotation is a single-channel 8-bit PNG (class id per pixel), this "
                    f"one is {image.mode}",
                )
            labels = np.asarray(image, dtype=np.int64)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    except Exception as e:  # PIL raises OSError, SyntaxError... on damaged files
        raise ImageError(path, f"{type(e).__name__}: {e}") from e
    reduced = labels - 1
    reduced[labels == 0] = IGNORE_INDEX
    return reduced


def find_pairs(root, split: str = "validation") -> tuple[list[tuple[Path, Path]], list[dict]]:
    """``([(image, annotation), ...], problems)`` of an ADEChallengeData2016 folder.

    ``root`` is the unpacked ``ADEChallengeData2016`` folder (or the folder that holds it).
    Images are ``images/<split>/*.jpg`` in sorted order, each with ``annotations/<split>/
    <stem>.png``; an image without annotation is a problem (``{"file", "error"}``), not a pair.

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
    files = sorted(p for p in images.iterdir() if p.suffix.lower() == ".jpg" and p.is_file())
    if not files:
        raise ValueError(f"{images} holds no .jpg image.")
    pairs, problems = [], []
    for image in files:
        label = annotations / f"{image.stem}.png"
        if label.is_file():
            pairs.append((image, label))
        else:
            problems.append({"file": str(image), "error": f"no annotation {label}"})
    return pairs, problems
