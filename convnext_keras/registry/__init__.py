"""The single table of ConvNeXt architectures and released checkpoints.

Every fact about a family (paper, code, weights licence), a variant (depths, widths, block
type) or a released checkpoint (source, head size, resolution, evaluation transform, licence,
reported accuracy) lives here and nowhere else.  Everything else in the package derives what it
needs from these entries.  This module imports no Keras (``convnext list`` reads it alone).

Checkpoints:

* the 21 files released by facebookresearch/ConvNeXt
  (https://github.com/facebookresearch/ConvNeXt#results-and-pre-trained-models), named as in the
  TF-Hub ConvNeXt collection (``21k`` where the files say ``22k``; both spellings are accepted);
* the 26 files released by facebookresearch/ConvNeXt-V2
  (https://github.com/facebookresearch/ConvNeXt-V2#results-and-pre-trained-models): the FCMAE
  self-supervised encoders ``convnextv2_<size>_fcmae``, the ImageNet-1k fine-tuned
  ``convnextv2_<size>_1k_224`` and the ImageNet-22k -> 1k fine-tuned
  ``convnextv2_<size>_21k_1k_<res>`` (the collection's spelling of the files'
  ``convnextv2_<size>_22k_<res>_ema.pt``; the file spellings are accepted too);
* the 3 isotropic ConvNeXts of facebookresearch/ConvNeXt (README, "ImageNet-1K trained models
  (isotropic)"; ``models/convnext_isotropic.py``): ``convnext_iso_<size>_1k_224``;
* the 4 DINOv3 ConvNeXt backbones of facebookresearch/dinov3, from the Hugging Face Hub
  (``facebook/dinov3-convnext-<size>-pretrain-lvd1689m``, gated):
  ``dinov3_convnext_<size>_lvd1689m``;
* timm's ImageNet-1k-head ConvNeXt-atto/femto/pico/nano (``timm/models/convnext.py``
  ``default_cfgs``), from the Hub (``timm/convnext_<size>.<tag>``): ``convnext_<size>_1k_224``,
  ``convnext_nano_12k_1k_<res>`` (timm's own spellings, ``convnext_atto.d2_in1k``, are
  accepted too).
* the 6 UperNet semantic-segmentation files (ADE20K, 150 classes) of facebookresearch/ConvNeXt
  (``semantic_segmentation/README.md``), named ``upernet_convnext_<size>_ade20k_<crop>``
  (the files' ``upernet_convnext_<size>_<1k|22k>_<crop>x<crop>`` spellings are accepted); their
  rows carry a :class:`Segmentation` (decoder, test-time settings, reported mIoU).
* the 7 COCO object-detection / instance-segmentation files (Mask R-CNN and Cascade Mask R-CNN,
  mmdetection 2.x) of facebookresearch/ConvNeXt (``object_detection/README.md``), named
  ``mask_rcnn_convnext_tiny_coco``, ``cascade_mask_rcnn_convnext_<size>_coco`` and
  ``cascade_mask_rcnn_convnext_<size>_in22k_coco`` (the files' spellings,
  ``cascade_mask_rcnn_convnext_base_22k_3x``, are accepted); their rows carry a
  :class:`Detection` (detector, test-time settings, reported box and mask AP).

Rows are of one type, :class:`Checkpoint`, whatever the family: a new family (isotropic, DINOv3,
timm's, segmentation backbones) adds a :class:`Family`, its :class:`Variant` rows when its
architecture is new, and :class:`Checkpoint` rows whose :class:`Source` says where the file is.

Layout: :mod:`.rows` (the row types and the architecture's constants), one file of rows per
family (:mod:`.convnext`, :mod:`.convnextv2`, :mod:`.isotropic`, :mod:`.dinov3`, :mod:`.timm`,
:mod:`.upernet`, :mod:`.detection`), and here the tables they form and the lookup of names.
"""

from __future__ import annotations

import dataclasses
import difflib
import re

from convnext_keras.interface import fix
from convnext_keras.registry import (
    convnext,
    convnextv2,
    detection,
    dinov3,
    isotropic,
    timm,
    upernet,
)
from convnext_keras.registry.rows import (
    BATCH_NORM_EPSILON,
    BLOCKS,
    CROP_MODES,
    DEFAULT_INTERPOLATION,
    DEFAULT_RESOLUTION,
    DELTA_WH_RATIO_CLIP,
    DETECTION_METHODS,
    DOWNSAMPLE_STRIDE,
    DWCONV_KERNEL,
    EVAL_CROP_PCT,
    FAMILIES,
    GRN_EPSILON,
    HUB_URL,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ISOTROPIC_PATCH,
    KERNEL_INIT_STD,
    LAYER_NORM_EPSILON,
    LAYER_SCALE_INIT,
    MLP_RATIO,
    MULTI_SCALE_RATIOS,
    NUM_CLASSES_1K,
    NUM_CLASSES_21K,
    NUM_CLASSES_ADE20K,
    NUM_CLASSES_COCO,
    OFFICIAL_BASE_URL,
    SEGMENTATION_MODES,
    SQUASH_RESOLUTION,
    STEM_PATCH,
    VARIANTS,
    BoxHead,
    Checkpoint,
    Detection,
    DetectionEval,
    DetectorHead,
    Family,
    FinetuneDefaults,
    Segmentation,
    SegmentationEval,
    Source,
    UperNetHead,
    Variant,
    canonical_name,
    official_crop_pct,
    squashes,
)

#: The family files, in registry order.
_FAMILY_FILES = (convnext, convnextv2, isotropic, dinov3, timm, upernet, detection)

FAMILIES.update((f.FAMILY.name, f.FAMILY) for f in _FAMILY_FILES if hasattr(f, "FAMILY"))
VARIANTS.update((v.name, v) for f in _FAMILY_FILES for v in getattr(f, "VARIANTS", ()))


def _by_arch_name() -> dict[str, Variant]:
    # Computed on each call: tests and extensions may add rows to VARIANTS.
    return {v.arch_name: v for v in VARIANTS.values()}


def variant(spec: str | Variant) -> Variant:
    """The :class:`Variant` of a registry key (``"tiny"``, ``"convnextv2_tiny"``), an
    architecture name (``"convnext_tiny"``) or a ``Variant`` (returned as is).

    Raises ``ValueError`` naming the choices for anything else.
    """
    if isinstance(spec, Variant):
        return spec
    found = VARIANTS.get(spec) or _by_arch_name().get(spec)
    if found is None:
        raise ValueError(
            f"Unknown ConvNeXt variant {spec!r}; choose one of {', '.join(VARIANTS)} (or an "
            f"architecture name such as {', '.join(list(_by_arch_name())[:2])})."
        )
    return found


#: The smallest height/width any variant takes (``Variant.min_input_size``): option checks.
MIN_INPUT_SIZE = min(v.min_input_size for v in VARIANTS.values())

#: Every released checkpoint, by name, in registry order.
CHECKPOINTS: dict[str, Checkpoint] = {c.name: c for f in _FAMILY_FILES for c in f.checkpoints()}

#: Variants with published (or, for the V2 sizes TRAINING.md leaves out, the nearest published)
#: fine-tuning settings.
FINETUNE: dict[str, FinetuneDefaults] = {
    k: v for f in _FAMILY_FILES for k, v in getattr(f, "FINETUNE", {}).items()
}


#: Suffix that turns a checkpoint name into its feature-extractor twin (TF-Hub convention).
FEATURE_EXTRACTOR_SUFFIX = "_fe"


def families(family: str | None = None) -> list[str]:
    """Checkpoint names of one family (all when None), in registry order."""
    return [c.name for c in CHECKPOINTS.values() if family in (None, c.family)]


# ---------------------------------------------------------------------------------------------
# Names


@dataclasses.dataclass(frozen=True)
class ResolvedName:
    """What a user-facing model name means."""

    #: The checkpoint entry, or None for an architecture-only name such as ``convnext_atto``.
    checkpoint: Checkpoint | None
    variant: Variant
    #: "classifier", "pooled" (``_fe`` names), "pyramid" (an encoder without head, FCMAE),
    #: "segmentation" (a UperNet checkpoint: per-pixel logits) or "detection" (a Mask R-CNN /
    #: Cascade Mask R-CNN checkpoint: boxes, classes, scores and masks).
    head: str
    #: The name in the registry's spelling (``convnextv2_tiny_22k_384_ema_fe`` ->
    #: ``convnextv2_tiny_21k_1k_384_fe``).
    name: str = ""

    @property
    def num_classes(self) -> int | None:
        """The head size (None for an encoder without head)."""
        return self.checkpoint.num_classes if self.checkpoint else NUM_CLASSES_1K

    @property
    def resolution(self) -> int:
        return self.checkpoint.resolution if self.checkpoint else DEFAULT_RESOLUTION


class UnknownModelError(ValueError):
    """A model name that is not in the registry."""


class UnlistedNameError(UnknownModelError):
    """A name that is no checkpoint, ``_fe`` twin or architecture (a typo, most often): the
    case a task may answer with a hint among its own models (the other unknown-model errors -
    a file given as a name, a task model's ``_fe`` - keep the registry's words)."""


def _aliases() -> dict[str, str]:
    aliases = {}
    for c in CHECKPOINTS.values():
        for alias in c.aliases:
            if alias in CHECKPOINTS or aliases.get(alias, c.name) != c.name:
                raise RuntimeError(f"registry: alias {alias!r} of {c.name} is taken")
            aliases[alias] = c.name
    return aliases


#: Other spellings (the published file names) -> checkpoint name.
ALIASES: dict[str, str] = _aliases()


def resolve(name: str) -> ResolvedName:
    """Parse a model name: a checkpoint (or a file-name spelling of it), its ``_fe`` twin, or a
    bare architecture (``convnext_tiny``, ``convnextv2_tiny``)."""
    key = canonical_name(name)
    head, suffix = None, ""
    if key.endswith(FEATURE_EXTRACTOR_SUFFIX):
        key, head, suffix = (
            key[: -len(FEATURE_EXTRACTOR_SUFFIX)],
            "pooled",
            FEATURE_EXTRACTOR_SUFFIX,
        )
    key = ALIASES.get(key, key)
    if key in CHECKPOINTS:
        ckpt = CHECKPOINTS[key]
        task = {"segmentation": "a semantic-segmentation model (per-pixel logits)"}
        task["detection"] = "an object-detection model (boxes, classes, scores, masks)"
        if ckpt.task in task:
            if head is not None:
                raise UnknownModelError(
                    f"{name!r}: {key} is {task[ckpt.task]}, which has no "
                    f"'{FEATURE_EXTRACTOR_SUFFIX}' feature-extractor twin; use {key}, or a "
                    f"classifier's '{FEATURE_EXTRACTOR_SUFFIX}' name for pooled features."
                )
            return ResolvedName(ckpt, ckpt.spec, ckpt.task, key)
        default = "classifier" if ckpt.has_head else "pyramid"
        return ResolvedName(ckpt, ckpt.spec, head or default, key + suffix)
    spec = _by_arch_name().get(key)
    if spec is not None:
        return ResolvedName(None, spec, head or "classifier", key + suffix)
    if (
        "/" in name
        or "\\" in name
        or re.search(r"\.(onnx|pth|pt|bin|safetensors|h5|tflite|keras)$", key)
    ):
        raise UnknownModelError(
            f"{name!r} is a file, not a model name: a model is a name of `convnext list` or a "
            "saved .keras file; a checkpoint file (.pth/.bin/.safetensors) goes to "
            f"{fix('weights=', '--weights')} with an architecture name (e.g. convnext_tiny)."
        )
    choices = model_names()
    close = difflib.get_close_matches(key, choices, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnlistedNameError(
        f"Unknown model name {name!r}.{hint} Run `convnext list` (or "
        f"convnext_keras.list_models()) for the {len(CHECKPOINTS)} checkpoints; add "
        f"'{FEATURE_EXTRACTOR_SUFFIX}' for a feature extractor, or use an architecture name "
        f"({', '.join(_by_arch_name())}) with {fix('weights=None', '--weights none')} or a "
        "local file."
    )


def model_names(include_fe: bool = True, include_variants: bool = False) -> list[str]:
    """Every loadable name: checkpoints, their ``_fe`` twins, optionally bare architectures."""
    names = list(CHECKPOINTS)
    if include_fe:  # segmentation and detection models have no _fe twin
        names += [
            n + FEATURE_EXTRACTOR_SUFFIX
            for n, c in CHECKPOINTS.items()
            if c.task == "classification"
        ]
    if include_variants:
        names += list(_by_arch_name())
    return names


def checkpoints_for(variant: str, num_classes: int | None = ...) -> list[str]:
    """Checkpoint names of a variant (optionally with a given head size; None: encoders
    without head), for error hints."""
    return [
        c.name
        for c in CHECKPOINTS.values()
        if c.variant == variant and (num_classes is ... or c.num_classes == num_classes)
    ]
