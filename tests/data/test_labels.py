"""The shipped label lists: sizes, official head order, readable names, ReaL labels."""

from __future__ import annotations

import re

import pytest

from convnext_keras import registry
from convnext_keras.data import labels

WNID = re.compile(r"^n\d{8}$")


def test_imagenet_1k_in_head_order():
    names = labels.imagenet_1k()
    assert len(names) == registry.NUM_CLASSES_1K == 1000
    assert all(WNID.match(w) for w in names.wnids)
    # Head order = sorted wnids (torchvision ImageFolder over the class folders).
    assert list(names.wnids) == sorted(set(names.wnids))
    # Well-known indices of the standard ImageNet-1k head.
    known = {
        0: ("n01440764", "tench"),
        1: ("n01443537", "goldfish"),
        281: ("n02123045", "tabby"),
        285: ("n02124075", "Egyptian cat"),
        504: ("n03063599", "coffee mug"),
        812: ("n04266014", "space shuttle"),
        967: ("n07920052", "espresso"),
        999: ("n15075141", "toilet tissue"),
    }
    for index, (wnid, name) in known.items():
        assert names.wnids[index] == wnid and names.names[index] == name
        assert names.index(wnid) == index
    assert names.lemmas[281] == "tabby, tabby cat"
    with pytest.raises(KeyError, match="imagenet-1k"):
        names.index("n00000000")


def test_imagenet_21k_in_official_head_order():
    names = labels.imagenet_21k()
    assert len(names) == registry.NUM_CLASSES_21K == 21841
    assert len(set(names.wnids)) == 21841
    assert all(WNID.match(w) for w in names.wnids)
    assert list(names.wnids) == sorted(names.wnids)
    assert names.wnids[0] == "n00004475" and names.names[0] == "organism"
    assert all(n for n in names.names)
    # The fall-2011 release holds 999 of the 1k classes (n04399382, "teddy", is missing).
    missing = set(labels.imagenet_1k().wnids) - set(names.wnids)
    assert missing == {"n04399382"}
    assert names.names[names.index("n02123045")] == "tabby"


def test_for_num_classes():
    assert labels.for_num_classes(1000) is labels.imagenet_1k()
    assert labels.for_num_classes(21841) is labels.imagenet_21k()
    with pytest.raises(ValueError, match="labels=") as info:
        labels.for_num_classes(10)
    assert "1000" in str(info.value) and "21841" in str(info.value)


def test_imagenet_real_labels():
    real = labels.imagenet_real()
    assert len(real) == 50000
    assert all(0 <= c < 1000 for row in real for c in row)
    # Start of the ReaL file: no valid label, then two accepted classes, ...
    assert real[:3] == ((), (970, 795), (230, 231))
    assert sum(1 for row in real if not row) > 0
