"""COCO (2017, instances): the 80 object classes with their category ids, a colour per class,
and the dataset's folder layout.

* :func:`classes`, :func:`category_ids`, :func:`supercategories`: label ``i`` of the detection
  models is class ``i`` of mmdetection's ``CocoDataset.CLASSES`` (``mmdet/datasets/coco.py``),
  whose COCO category id is ``category_ids()[i]`` (the ids run 1-90 with gaps; mmdetection
  maps them in ascending order, ``cat_ids``).  Shipped in ``data/coco80.tsv`` (sources and
  licences: ``convnext_keras/data/README.md``).
* :func:`palette`: a distinct colour per class (golden-ratio hues), for overlays.
* :func:`find_split`: the annotation file and image folder of a COCO folder
  (``annotations/instances_val2017.json``, ``val2017/*.jpg``).

Imports no Keras.
"""

from __future__ import annotations

import colorsys
import functools
from pathlib import Path

import numpy as np

from convnext_keras import registry


@functools.cache
def _table() -> tuple[tuple[int, ...], tuple[str, ...], tuple[str, ...]]:
    from convnext_keras.data.labels import _read_text

    ids, names, groups = [], [], []
    for line in _read_text("coco80.tsv").splitlines():
        category, name, group = line.split("\t")
        ids.append(int(category))
        names.append(name)
        groups.append(group)
    if len(names) != registry.NUM_CLASSES_COCO:
        raise RuntimeError(f"data/coco80.tsv holds {len(names)} classes, not 80")
    return tuple(ids), tuple(names), tuple(groups)


def classes() -> tuple[str, ...]:
    """The 80 class names in the order of the models' labels (``"person"``, ``"bicycle"``...)."""
    return _table()[1]


def category_ids() -> tuple[int, ...]:
    """The COCO category id of each label (``1, 2, ..., 90``; 80 of them)."""
    return _table()[0]


def supercategories() -> tuple[str, ...]:
    """COCO's supercategory of each label (``"person"``, ``"vehicle"``...)."""
    return _table()[2]


def label_of(category_id: int) -> int:
    """The label (0-79) of a COCO category id; ``ValueError`` for an id COCO does not use."""
    try:
        return category_ids().index(int(category_id))
    except ValueError:
        raise ValueError(f"{category_id!r} is not one of COCO's 80 category ids.") from None


def categories() -> list[dict]:
    """The ``categories`` entries of a COCO annotation file (``id``, ``name``,
    ``supercategory``), in label order."""
    return [
        {"id": i, "name": n, "supercategory": s}
        for i, n, s in zip(category_ids(), classes(), supercategories())
    ]


@functools.cache
def palette() -> np.ndarray:
    """The ``(80, 3)`` uint8 RGB colour of each class: hues a golden ratio apart, so that
    neighbouring labels differ (read-only)."""
    colours = []
    for i in range(registry.NUM_CLASSES_COCO):
        hue = (i * 0.618033988749895) % 1.0
        colours.append([round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.75, 0.95)])
    table = np.asarray(colours, dtype=np.uint8)
    table.setflags(write=False)
    return table


def find_split(root, split: str = "val2017") -> tuple[Path, Path]:
    """``(annotation file, image folder)`` of a COCO folder: ``annotations/instances_<split>.json``
    and ``<split>/`` (the layout of the dataset's ``annotations_trainval2017.zip`` and
    ``val2017.zip`` unpacked side by side).

    Raises:
        FileNotFoundError: no such folder.  ValueError: it is not in this layout.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"No such folder: {root}")
    annotations = root / "annotations" / f"instances_{split}.json"
    images = root / split
    missing = [str(p.relative_to(root)) for p in (annotations, images) if not p.exists()]
    if missing:
        raise ValueError(
            f"{root} is not in the COCO layout: {' and '.join(missing)} missing (expected "
            f"annotations/instances_{split}.json and {split}/*.jpg below it: unpack COCO's "
            f"annotations_trainval2017.zip and {split}.zip into one folder and pass it)."
        )
    return annotations, images
