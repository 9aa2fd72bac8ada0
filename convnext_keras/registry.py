"""The single table of ConvNeXt architectures and official checkpoints.

Every fact about a variant (depths, widths) or a released checkpoint (file name, head size,
resolution, crop, reported accuracy) lives here and nowhere else.  Everything else in the
package derives what it needs from these entries.

Checkpoints are the 21 files released by facebookresearch/ConvNeXt
(https://github.com/facebookresearch/ConvNeXt#results-and-pre-trained-models), named as in the
TF-Hub ConvNeXt collection (``21k`` where the files say ``22k``; both spellings are accepted).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re

from .interface import fix

#: Where the official checkpoints are published; ``CONVNEXT_BASE_URL`` overrides it (mirrors).
OFFICIAL_BASE_URL = "https://dl.fbaipublicfiles.com/convnext/"

#: Every LayerNorm of the network uses this epsilon (the original's value).
LAYER_NORM_EPSILON = 1e-6
#: Initial value of the per-channel layer scale ``gamma`` (the original's value).
LAYER_SCALE_INIT = 1e-6
#: Standard deviation of the truncated-normal kernel initialiser (the original's value).
KERNEL_INIT_STD = 0.02
#: Depthwise kernel size, stem patch size and downsampling stride of the architecture.
DWCONV_KERNEL = 7
STEM_PATCH = 4
DOWNSAMPLE_STRIDE = 2
#: Hidden width of each block's MLP relative to the block width.
MLP_RATIO = 4

#: ImageNet normalisation the official training and evaluation use.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Resolution at and above which the official evaluation squashes instead of resize + crop.
SQUASH_RESOLUTION = 384
#: The official evaluation's centre-crop fraction below SQUASH_RESOLUTION (main.py, --crop_pct).
EVAL_CROP_PCT = 0.875
#: Evaluation settings of architecture names without a checkpoint (the original's defaults).
DEFAULT_RESOLUTION = 224
DEFAULT_INTERPOLATION = "bicubic"

NUM_CLASSES_1K = 1000
NUM_CLASSES_21K = 21841

#: Stochastic-depth rates of the original's ImageNet-22k -> 1k fine-tuning commands
#: (facebookresearch/ConvNeXt TRAINING.md, "Fine-tune from ImageNet-22K pre-training"; the same
#: at 224 and 384).  Variants without an entry have no published fine-tuning rate.
FINETUNE_DROP_PATH = {"base": 0.2, "large": 0.3, "xlarge": 0.4}


@dataclasses.dataclass(frozen=True)
class Variant:
    """An architecture: blocks per stage and channel width per stage."""

    name: str
    depths: tuple[int, int, int, int]
    dims: tuple[int, int, int, int]

    @property
    def num_blocks(self) -> int:
        return sum(self.depths)

    @property
    def num_features(self) -> int:
        return self.dims[-1]

    @property
    def min_input_size(self) -> int:
        """Smallest height and width the network takes: the stem's patch times every stride-2
        downsampling (4 x 2 x 2 x 2 = 32).  Below it the last stage has no pixels left."""
        return STEM_PATCH * DOWNSAMPLE_STRIDE ** (len(self.depths) - 1)


# facebookresearch/ConvNeXt models/convnext.py for tiny..xlarge; timm's convnext.py for the
# small edge variants (atto/femto/pico/nano).
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("atto", (2, 2, 6, 2), (40, 80, 160, 320)),
        Variant("femto", (2, 2, 6, 2), (48, 96, 192, 384)),
        Variant("pico", (2, 2, 6, 2), (64, 128, 256, 512)),
        Variant("nano", (2, 2, 8, 2), (80, 160, 320, 640)),
        Variant("tiny", (3, 3, 9, 3), (96, 192, 384, 768)),
        Variant("small", (3, 3, 27, 3), (96, 192, 384, 768)),
        Variant("base", (3, 3, 27, 3), (128, 256, 512, 1024)),
        Variant("large", (3, 3, 27, 3), (192, 384, 768, 1536)),
        Variant("xlarge", (3, 3, 27, 3), (256, 512, 1024, 2048)),
    )
}


#: The smallest height/width any variant takes (``Variant.min_input_size``): option checks.
MIN_INPUT_SIZE = min(v.min_input_size for v in VARIANTS.values())


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One released checkpoint and everything needed to use it faithfully."""

    name: str
    variant: str
    num_classes: int
    resolution: int
    #: Pre-training data: "imagenet-1k", "imagenet-21k", or "imagenet-21k -> imagenet-1k".
    dataset: str
    filename: str
    #: Top-1 accuracy on ImageNet-1k val reported by facebookresearch/ConvNeXt (None for 21k heads).
    reported_acc1: float | None
    interpolation: str = DEFAULT_INTERPOLATION
    #: Expected SHA-256 (hex) of the published file, checked at download and when the cache is
    #: read.  The official host publishes none, so the rows leave it None; users pin one with
    #: ``CONVNEXT_SHA256_<NAME>`` or ``CONVNEXT_SHA256SUMS`` (convnext_keras.hub).
    sha256: str | None = None

    @property
    def crop_pct(self) -> float:
        # The official eval (main.py, build_transform): resize shorter side to res / 0.875 and
        # centre-crop below 384; at 384 it warps to res x res without a crop.
        return 1.0 if self.resolution >= SQUASH_RESOLUTION else EVAL_CROP_PCT

    @property
    def url(self) -> str:
        base = os.environ.get("CONVNEXT_BASE_URL") or OFFICIAL_BASE_URL
        return base.rstrip("/") + "/" + self.filename

    @property
    def spec(self) -> Variant:
        return VARIANTS[self.variant]


def _official_checkpoints() -> dict[str, Checkpoint]:
    table = []
    # ImageNet-1k trained (filename, reported acc@1 at 224 / 384).
    acc_1k_224 = {"tiny": 82.1, "small": 83.1, "base": 83.8, "large": 84.3}
    acc_1k_384 = {"base": 85.1, "large": 85.5}
    # ImageNet-22k trained, ImageNet-1k fine-tuned.
    acc_22k_1k_224 = {"tiny": 82.9, "small": 84.6, "base": 85.8, "large": 86.6, "xlarge": 87.0}
    acc_22k_1k_384 = {"tiny": 84.1, "small": 85.8, "base": 86.8, "large": 87.5, "xlarge": 87.8}
    for size, acc in acc_1k_224.items():
        table.append(
            Checkpoint(
                f"convnext_{size}_1k_224",
                size,
                NUM_CLASSES_1K,
                224,
                "imagenet-1k",
                f"convnext_{size}_1k_224_ema.pth",
                acc,
            )
        )
    for size, acc in acc_1k_384.items():
        table.append(
            Checkpoint(
                f"convnext_{size}_1k_384",
                size,
                NUM_CLASSES_1K,
                384,
                "imagenet-1k",
                f"convnext_{size}_1k_384.pth",
                acc,
            )
        )
    for size in acc_22k_1k_224:
        table.append(
            Checkpoint(
                f"convnext_{size}_21k_224",
                size,
                NUM_CLASSES_21K,
                224,
                "imagenet-21k",
                f"convnext_{size}_22k_224.pth",
                None,
            )
        )
    for res, accs in ((224, acc_22k_1k_224), (384, acc_22k_1k_384)):
        for size, acc in accs.items():
            ema = "_ema" if size == "xlarge" else ""
            table.append(
                Checkpoint(
                    f"convnext_{size}_21k_1k_{res}",
                    size,
                    NUM_CLASSES_1K,
                    res,
                    "imagenet-21k -> imagenet-1k",
                    f"convnext_{size}_22k_1k_{res}{ema}.pth",
                    acc,
                )
            )
    return {c.name: c for c in table}


CHECKPOINTS: dict[str, Checkpoint] = _official_checkpoints()

#: Suffix that turns a checkpoint name into its feature-extractor twin (TF-Hub convention).
FEATURE_EXTRACTOR_SUFFIX = "_fe"


@dataclasses.dataclass(frozen=True)
class ResolvedName:
    """What a user-facing model name means."""

    #: The checkpoint entry, or None for an architecture-only name such as ``convnext_atto``.
    checkpoint: Checkpoint | None
    variant: Variant
    #: "classifier" or "pooled" (``_fe`` names).
    head: str

    @property
    def num_classes(self) -> int:
        return self.checkpoint.num_classes if self.checkpoint else NUM_CLASSES_1K

    @property
    def resolution(self) -> int:
        return self.checkpoint.resolution if self.checkpoint else DEFAULT_RESOLUTION


class UnknownModelError(ValueError):
    """A model name that is not in the registry."""


def canonical_name(name: str) -> str:
    """Lower-case, ``-`` -> ``_`` and the file names' ``22k`` -> the collection's ``21k``."""
    key = name.strip().lower().replace("-", "_")
    return re.sub(r"_22k(?=_|$)", "_21k", key)


def resolve(name: str) -> ResolvedName:
    """Parse a model name: a checkpoint, its ``_fe`` twin, or a bare variant (``convnext_tiny``)."""
    key = canonical_name(name)
    head = "classifier"
    if key.endswith(FEATURE_EXTRACTOR_SUFFIX):
        key, head = key[: -len(FEATURE_EXTRACTOR_SUFFIX)], "pooled"
    if key in CHECKPOINTS:
        ckpt = CHECKPOINTS[key]
        return ResolvedName(ckpt, ckpt.spec, head)
    bare = key.removeprefix("convnext_")
    if bare in VARIANTS:
        return ResolvedName(None, VARIANTS[bare], head)
    choices = model_names()
    close = difflib.get_close_matches(key, choices, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnknownModelError(
        f"Unknown model name {name!r}.{hint} Run `convnext list` (or "
        f"convnext_keras.list_models()) for the {len(CHECKPOINTS)} checkpoints; add "
        f"'{FEATURE_EXTRACTOR_SUFFIX}' for a feature extractor, or use an architecture name "
        f"({', '.join('convnext_' + v for v in VARIANTS)}) with "
        f"{fix('weights=None', '--weights none')} or a local file."
    )


def model_names(include_fe: bool = True, include_variants: bool = False) -> list[str]:
    """Every loadable name: checkpoints, their ``_fe`` twins, optionally bare architectures."""
    names = list(CHECKPOINTS)
    if include_fe:
        names += [n + FEATURE_EXTRACTOR_SUFFIX for n in CHECKPOINTS]
    if include_variants:
        names += ["convnext_" + v for v in VARIANTS]
    return names


def checkpoints_for(variant: str, num_classes: int | None = None) -> list[str]:
    """Checkpoint names of a variant (optionally with a given head size), for error hints."""
    return [
        c.name
        for c in CHECKPOINTS.values()
        if c.variant == variant and (num_classes is None or c.num_classes == num_classes)
    ]
