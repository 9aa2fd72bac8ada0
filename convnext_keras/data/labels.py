"""ImageNet class labels in the order of the official heads, shipped as package data.

* ImageNet-1k: the 1000 ILSVRC-2012 classes in the standard order (sorted WordNet ids, as
  torchvision's ``ImageFolder`` numbers the class folders), which every 1k head of the collection
  uses.
* ImageNet-21k: the 21841 classes of the fall-2011 ImageNet release in sorted-wnid order, the
  order of the official 21k heads (the original trained them with ``ImageFolder`` too).

Each class has a WordNet id and its WordNet lemmas; :attr:`Labels.names` holds the first lemma,
the usual readable name (``"tabby"``, ``"espresso"``).  Sources and licences:
``convnext_keras/data/README.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
from importlib import resources

from convnext_keras import registry
from convnext_keras.interface import fix


@dataclasses.dataclass(frozen=True)
class Labels:
    """A head's classes: ``wnids[i]``, ``names[i]`` and ``lemmas[i]`` describe output ``i``."""

    dataset: str
    wnids: tuple[str, ...]
    #: All WordNet lemmas of each class, comma separated ("tabby, tabby cat").
    lemmas: tuple[str, ...]

    @functools.cached_property
    def names(self) -> tuple[str, ...]:
        """The readable name of each class: its first lemma."""
        return tuple(lemma.split(",")[0].strip() for lemma in self.lemmas)

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {wnid: i for i, wnid in enumerate(self.wnids)}

    def __len__(self) -> int:
        return len(self.wnids)

    def index(self, wnid: str) -> int:
        """Head index of a WordNet id (``"n02123045"``); KeyError naming the dataset if absent."""
        try:
            return self._index[wnid]
        except KeyError:
            raise KeyError(
                f"{wnid!r} is not one of the {len(self)} {self.dataset} classes."
            ) from None


def _read_text(name: str) -> str:
    data = resources.files(__package__).joinpath(name).read_bytes()
    if name.endswith(".gz"):
        data = gzip.decompress(data)
    return data.decode("utf-8")


def _read_tsv(name: str, dataset: str) -> Labels:
    wnids, lemmas = [], []
    for line in _read_text(name).splitlines():
        wnid, lemma = line.split("\t", 1)
        wnids.append(wnid)
        lemmas.append(lemma)
    return Labels(dataset, tuple(wnids), tuple(lemmas))


@functools.cache
def imagenet_1k() -> Labels:
    """The 1000 ImageNet-1k classes in the order of the 1k heads."""
    return _read_tsv("imagenet1k.tsv", "imagenet-1k")


@functools.cache
def imagenet_21k() -> Labels:
    """The 21841 ImageNet-21k classes in the order of the official 21k heads."""
    return _read_tsv("imagenet21k.tsv.gz", "imagenet-21k")


def for_num_classes(num_classes: int) -> Labels:
    """The label list of a head size: 1000 -> ImageNet-1k, 21841 -> ImageNet-21k."""
    if num_classes == registry.NUM_CLASSES_1K:
        return imagenet_1k()
    if num_classes == registry.NUM_CLASSES_21K:
        return imagenet_21k()
    raise ValueError(
        f"No ImageNet label list has {num_classes} classes (ImageNet-1k has "
        f"{registry.NUM_CLASSES_1K}, ImageNet-21k {registry.NUM_CLASSES_21K}); pass your own "
        f"class names ({fix('labels=[...]', '--labels FILE, one name per line')}) for a "
        "fine-tuned head."
    )


@functools.cache
def imagenet_real() -> tuple[tuple[int, ...], ...]:
    """ImageNet-ReaL labels: for validation image ``i`` (file ``ILSVRC2012_val_{i+1:08d}``),
    the 1k indices its re-assessed labels accept (empty: no valid label; such images are left
    out of ReaL accuracy)."""
    raw = json.loads(_read_text("imagenet_real_labels.json.gz"))
    return tuple(tuple(int(c) for c in labels) for labels in raw)
