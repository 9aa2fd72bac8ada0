"""COCO's 80 classes, their category ids and the dataset layout (``convnext_keras.data.coco``),
against COCO 2017's ``instances_val2017.json`` facts written again by hand."""

from __future__ import annotations

import pytest

from convnext_keras.data import coco

#: The ten ids of 1-90 that COCO 2017's instance annotations do not use.
UNUSED = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}


def test_the_80_classes_and_their_ids():
    names, ids = coco.classes(), coco.category_ids()
    assert len(names) == len(set(names)) == 80
    assert list(ids) == sorted(set(range(1, 91)) - UNUSED)
    # spot checks across the table (mmdetection CocoDataset.CLASSES spells with spaces)
    assert (names[0], ids[0], coco.supercategories()[0]) == ("person", 1, "person")
    assert (names[11], ids[11]) == ("stop sign", 13)
    assert (names[60], ids[60]) == ("dining table", 67)
    assert (names[79], ids[79]) == ("toothbrush", 90)
    assert coco.label_of(90) == 79 and coco.label_of(13) == 11
    with pytest.raises(ValueError, match="not one of COCO's 80 category ids"):
        coco.label_of(12)
    assert coco.categories()[2] == {"id": 3, "name": "car", "supercategory": "vehicle"}


def test_palette_is_distinct_and_read_only():
    table = coco.palette()
    assert table.shape == (80, 3) and len({tuple(c) for c in table}) == 80
    with pytest.raises(ValueError):
        table[0, 0] = 1


def test_find_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such folder"):
        coco.find_split(tmp_path / "none")
    with pytest.raises(ValueError, match="annotations/instances_val2017.json and val2017"):
        coco.find_split(tmp_path)
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{}")
    (tmp_path / "val2017").mkdir()
    assert coco.find_split(tmp_path) == (
        tmp_path / "annotations" / "instances_val2017.json",
        tmp_path / "val2017",
    )
