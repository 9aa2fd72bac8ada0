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

Rows are of one type, :class:`Checkpoint`, whatever the family: a new family (isotropic, DINOv3,
timm's, segmentation backbones) adds a :class:`Family`, its :class:`Variant` rows when its
architecture is new, and :class:`Checkpoint` rows whose :class:`Source` says where the file is.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re

from convnext_keras.interface import fix

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

#: Epsilon of Global Response Normalization (ConvNeXt V2 ``models/utils.py``, ``GRN``).
GRN_EPSILON = 1e-6


# ---------------------------------------------------------------------------------------------
# Families


@dataclasses.dataclass(frozen=True)
class Family:
    """A published line of ConvNeXt models: its paper, its code and its weights' licence."""

    name: str
    #: How the paper writes the name ("ConvNeXt", "ConvNeXt V2").
    title: str
    paper: str
    #: The citation, as a model card prints it.
    citation: str
    #: The original code (and weights) repository.
    original: str
    #: SPDX identifier of the weights' licence, and where to read it.
    licence: str
    licence_url: str


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "convnext",
            "ConvNeXt",
            "https://arxiv.org/abs/2201.03545",
            "Zhuang Liu, Hanzi Mao, Chao-Yuan Wu, Christoph Feichtenhofer, Trevor Darrell, "
            'Saining Xie. "A ConvNet for the 2020s." CVPR 2022. arXiv:2201.03545',
            "https://github.com/facebookresearch/ConvNeXt",
            "MIT",
            "https://github.com/facebookresearch/ConvNeXt/blob/main/LICENSE",
        ),
        Family(
            "convnextv2",
            "ConvNeXt V2",
            "https://arxiv.org/abs/2301.00808",
            "Sanghyun Woo, Shoubhik Debnath, Ronghang Hu, Xinlei Chen, Zhuang Liu, In So Kweon, "
            'Saining Xie. "ConvNeXt V2: Co-designing and Scaling ConvNets with Masked '
            'Autoencoders." CVPR 2023. arXiv:2301.00808',
            "https://github.com/facebookresearch/ConvNeXt-V2",
            # README "License": the code is MIT, the ImageNet pre-trained and fine-tuned weights
            # are CC BY-NC 4.0.
            "CC-BY-NC-4.0",
            "https://creativecommons.org/licenses/by-nc/4.0/",
        ),
        Family(
            "dinov3",
            "DINOv3 ConvNeXt",
            "https://arxiv.org/abs/2508.10104",
            "Oriane Simeoni, Huy V. Vo, Maximilian Seitzer, Federico Baldassarre, Maxime Oquab, "
            'et al. "DINOv3." arXiv:2508.10104, 2025',
            "https://github.com/facebookresearch/dinov3",
            # README "License": code and weights under the DINOv3 License (not an SPDX licence;
            # the Hub repositories are gated behind accepting it).
            "LicenseRef-DINOv3",
            "https://github.com/facebookresearch/dinov3/blob/main/LICENSE.md",
        ),
        Family(
            "timm",
            "ConvNeXt",
            "https://arxiv.org/abs/2201.03545",
            "Zhuang Liu, Hanzi Mao, Chao-Yuan Wu, Christoph Feichtenhofer, Trevor Darrell, "
            'Saining Xie. "A ConvNet for the 2020s." CVPR 2022. arXiv:2201.03545; weights '
            "trained by Ross Wightman, PyTorch Image Models (timm)",
            "https://github.com/huggingface/pytorch-image-models",
            # timm/models/convnext.py, _cfg(): 'license': 'apache-2.0'
            "Apache-2.0",
            "https://www.apache.org/licenses/LICENSE-2.0",
        ),
        Family(
            "upernet_convnext",
            "UperNet-ConvNeXt",
            "https://arxiv.org/abs/2201.03545",
            "Zhuang Liu, Hanzi Mao, Chao-Yuan Wu, Christoph Feichtenhofer, Trevor Darrell, "
            'Saining Xie. "A ConvNet for the 2020s." CVPR 2022. arXiv:2201.03545; Tete Xiao, '
            'Yingcheng Liu, Bolei Zhou, Yuning Jiang, Jian Sun. "Unified Perceptual Parsing for '
            'Scene Understanding." ECCV 2018. arXiv:1807.10221',
            "https://github.com/facebookresearch/ConvNeXt/tree/main/semantic_segmentation",
            "MIT",
            "https://github.com/facebookresearch/ConvNeXt/blob/main/LICENSE",
        ),
    )
}

# ---------------------------------------------------------------------------------------------
# Architectures

#: Block types: ``"layer_scale"`` (ConvNeXt: dwconv, LN, MLP, per-channel layer scale),
#: ``"grn"`` (ConvNeXt V2: the same block with Global Response Normalization after the GELU
#: and no layer scale) and ``"plain"`` (the ConvNeXt block without layer scale: the isotropic
#: small and base, trained with ``--layer_scale_init_value 0``).
BLOCKS = ("layer_scale", "grn", "plain")
#: Patch size (and stride) of the isotropic ConvNeXt's stem (``convnext_isotropic.py``).
ISOTROPIC_PATCH = 16


@dataclasses.dataclass(frozen=True)
class Variant:
    """An architecture: blocks per stage, channel width per stage and the block type.

    ``name`` is the registry key.  ConvNeXt's keep their bare size names (``"tiny"``); the
    sizes of later families are qualified by the family (``"convnextv2_tiny"``), since V1 and
    V2 share size names and widths but not blocks.

    The hierarchical networks have four stages, a 4x4 stem with LayerNorm and a 2x2
    downsampling between stages.  An isotropic ConvNeXt (paper section 3.3) has one stage of
    identical blocks at one width behind a ``patch_size`` x ``patch_size`` stem without
    LayerNorm, and no downsampling: ``depths`` and ``dims`` of length one.
    """

    name: str
    depths: tuple[int, ...]
    dims: tuple[int, ...]
    family: str = "convnext"
    block: str = "layer_scale"
    #: Kernel size and stride of the stem convolution.
    patch_size: int = STEM_PATCH
    #: Whether a LayerNorm follows the stem convolution (not in the isotropic ConvNeXt).
    stem_norm: bool = True

    def __post_init__(self):
        if self.block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {self.block!r}.")
        if len(self.depths) != len(self.dims) or len(self.depths) not in (1, 4):
            raise ValueError(
                f"{self.name}: depths and dims must both have 4 stages (hierarchical) or 1 "
                f"(isotropic), got {self.depths} and {self.dims}."
            )

    @property
    def isotropic(self) -> bool:
        """One stage at one resolution (stride ``patch_size``): no feature pyramid."""
        return len(self.depths) == 1

    @property
    def num_blocks(self) -> int:
        return sum(self.depths)

    @property
    def num_features(self) -> int:
        return self.dims[-1]

    @property
    def size(self) -> str:
        """The size name without the family: ``"tiny"``."""
        return self.name.removeprefix(f"{self.family}_")

    @property
    def arch_name(self) -> str:
        """The architecture's model name (no weights): ``convnext_tiny``, ``convnextv2_tiny``."""
        return f"{self.family}_{self.size}"

    @property
    def title(self) -> str:
        """For messages and model cards: ``ConvNeXt-tiny``, ``ConvNeXt V2-tiny``,
        ``ConvNeXt-small (isotropic)``."""
        if self.isotropic:
            return f"{FAMILIES[self.family].title}-{self.size.removeprefix('iso_')} (isotropic)"
        return f"{FAMILIES[self.family].title}-{self.size}"

    @property
    def min_input_size(self) -> int:
        """Smallest height and width the network takes: the stem's patch times every stride-2
        downsampling (4 x 2 x 2 x 2 = 32; isotropic: 16).  Below it the last stage has no
        pixels left."""
        return self.patch_size * DOWNSAMPLE_STRIDE ** (len(self.depths) - 1)

    @property
    def strides(self) -> tuple[int, ...]:
        """Stride of each stage's output relative to the input (4, 8, 16, 32; isotropic: 16)."""
        return tuple(self.patch_size * DOWNSAMPLE_STRIDE**i for i in range(len(self.depths)))


# facebookresearch/ConvNeXt models/convnext.py for tiny..xlarge; timm's convnext.py for the
# small edge variants (atto/femto/pico/nano); facebookresearch/ConvNeXt-V2 models/convnextv2.py
# for every V2 size.
_V1_SIZES = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
}
_V2_SIZES = ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge")
_V2_ONLY = {"huge": ((3, 3, 27, 3), (352, 704, 1408, 2816))}
# facebookresearch/ConvNeXt models/convnext_isotropic.py (depth, width) and TRAINING.md: small
# and base are trained with --layer_scale_init_value 0 (no layer scale), large with the default
# 1e-6 (main.py).
_ISOTROPIC_SIZES = {
    "small": (18, 384, "plain"),
    "base": (18, 768, "plain"),
    "large": (36, 1024, "layer_scale"),
}

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        *(Variant(size, *shape) for size, shape in _V1_SIZES.items()),
        *(
            Variant(
                f"convnextv2_{size}", *(_V1_SIZES.get(size) or _V2_ONLY[size]), "convnextv2", "grn"
            )
            for size in _V2_SIZES
        ),
        *(
            Variant(
                f"iso_{size}",
                (depth,),
                (dim,),
                block=block,
                patch_size=ISOTROPIC_PATCH,
                stem_norm=False,
            )
            for size, (depth, dim, block) in _ISOTROPIC_SIZES.items()
        ),
    )
}


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


# ---------------------------------------------------------------------------------------------
# Checkpoints


#: The Hugging Face Hub's address (``huggingface_hub`` itself reads ``HF_ENDPOINT``).
HUB_URL = "https://huggingface.co"


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a checkpoint file is published.

    ``repo`` None: ``path`` is relative to the official server (:data:`OFFICIAL_BASE_URL`, or
    ``$CONVNEXT_BASE_URL`` for a mirror that keeps the official paths).  Otherwise ``path`` is a
    file of the Hugging Face Hub repository ``repo`` at ``revision`` (a commit or branch; None:
    ``main``), downloaded with ``huggingface_hub`` (``HF_ENDPOINT``, ``HF_HOME``, ``HF_TOKEN``).
    """

    path: str
    repo: str | None = None
    revision: str | None = None

    @property
    def filename(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def official_url(self) -> str:
        """The publisher's URL, whatever ``$CONVNEXT_BASE_URL`` says."""
        if self.repo is not None:
            return self.url
        return OFFICIAL_BASE_URL + self.path

    @property
    def is_hub(self) -> bool:
        return self.repo is not None

    @property
    def page(self) -> str:
        """Where a person reads about the file: the Hub repository's page, or the file's URL."""
        return f"{HUB_URL}/{self.repo}" if self.repo is not None else self.official_url

    @property
    def url(self) -> str:
        if self.repo is not None:
            return f"{HUB_URL}/{self.repo}/resolve/{self.revision or 'main'}/{self.path}"
        base = os.environ.get("CONVNEXT_BASE_URL") or OFFICIAL_BASE_URL
        return base.rstrip("/") + "/" + self.path

    @property
    def cache_name(self) -> str:
        """Relative path of the downloaded file in the cache (unique across sources)."""
        if self.repo is None:
            return self.path
        return f"hf/{self.repo}/{self.revision or 'main'}/{self.path}"


CROP_MODES = ("center", "squash")


def squashes(resolution: int, crop_mode: str | None = None) -> bool:
    """Whether an evaluation transform warps the image to ``resolution`` square (no crop):
    ``crop_mode`` says so, or (None) the official rule, at :data:`SQUASH_RESOLUTION` and above.
    """
    if crop_mode is None:
        return resolution >= SQUASH_RESOLUTION
    if crop_mode not in CROP_MODES:
        raise ValueError(f"crop_mode must be one of {CROP_MODES} or None, got {crop_mode!r}.")
    return crop_mode == "squash"


def official_crop_pct(resolution: int) -> float:
    """The official evaluation's crop (ConvNeXt and ConvNeXt V2 ``build_transform``): resize the
    shorter side to ``res / 0.875`` and centre-crop below 384; at 384 and above it warps the
    image to ``res x res`` (no crop: 1.0)."""
    return 1.0 if resolution >= SQUASH_RESOLUTION else EVAL_CROP_PCT


#: The smallest height/width any variant takes (``Variant.min_input_size``): option checks.
MIN_INPUT_SIZE = min(v.min_input_size for v in VARIANTS.values())


# Semantic segmentation (UperNet on ADE20K).  Sources: facebookresearch/ConvNeXt
# semantic_segmentation/configs/_base_/models/upernet_convnext.py (decoder) and
# configs/convnext/upernet_convnext_*_160k_ade20k_{ss,ms}.py (backbone, test_cfg); the dataset
# configs they inherit, microsoft/unilm beit/semantic_segmentation/configs/_base_/datasets/
# ade20k.py and ade20k_640x640.py (test pipeline); mmsegmentation's EncoderDecoder, UPerHead and
# tools/test.py --aug-test (multi-scale + flip).

#: ADE20K's SceneParsing benchmark: 150 classes (annotation 0 = "other", ignored).
NUM_CLASSES_ADE20K = 150
#: BatchNorm epsilon of the decoder (mmseg's SyncBN, torch.nn.BatchNorm2d's default).
BATCH_NORM_EPSILON = 1e-5
#: Test-time ratios of ``--aug-test`` (mmseg tools/test.py), on the config's image scale.
MULTI_SCALE_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
#: Inference modes of mmseg's EncoderDecoder (``test_cfg.mode``).
SEGMENTATION_MODES = ("slide", "whole")


@dataclasses.dataclass(frozen=True)
class UperNetHead:
    """UperNet's decode head (mmseg ``UPerHead``): pyramid pooling on the last stage at
    ``pool_scales``, 1x1 lateral and 3x3 FPN convolutions of ``channels`` (conv + BatchNorm +
    ReLU), their fusion (3x3) and a 1x1 classifier; bilinear resizing with
    ``align_corners=False``.  The training-only auxiliary FCN head is not part of it."""

    channels: int = 512
    pool_scales: tuple[int, ...] = (1, 2, 3, 6)


@dataclasses.dataclass(frozen=True)
class SegmentationEval:
    """The test-time procedure of a segmentation checkpoint (its config's test pipeline and
    ``test_cfg``).

    Single scale (the reported mIoU): resize the image keeping its aspect ratio so that it fits
    ``image_scale`` (long side at most ``image_scale[0]``, short side at most
    ``image_scale[1]``, the smaller factor wins: mmcv ``imrescale``), normalise with the
    ImageNet mean/std on 0-255 pixels, then ``mode``: ``"slide"`` windows of ``crop`` x
    ``crop`` every ``stride`` pixels, overlapping logits averaged, or ``"whole"`` (the image in
    one pass); logits resized back to the image's own size.  Multi-scale + flip (the reported
    ``ms+flip`` mIoU, ``--aug-test``): the same at ``MULTI_SCALE_RATIOS`` times
    ``image_scale``, each also flipped left-right, in ``multi_scale_mode``, the softmax
    probabilities averaged.
    """

    #: mmseg's ``img_scale``: (long-side limit, short side), in pixels.
    image_scale: tuple[int, int]
    crop: int
    stride: int
    mode: str = "slide"
    #: The ``_ms`` configs keep the base config's ``test_cfg=dict(mode='whole')``.
    multi_scale_mode: str = "whole"
    multi_scale_ratios: tuple[float, ...] = MULTI_SCALE_RATIOS

    def __post_init__(self):
        for mode in (self.mode, self.multi_scale_mode):
            if mode not in SEGMENTATION_MODES:
                raise ValueError(f"mode must be one of {SEGMENTATION_MODES}, got {mode!r}.")


@dataclasses.dataclass(frozen=True)
class Segmentation:
    """What a semantic-segmentation checkpoint adds to its backbone's row: the decoder, the
    test-time procedure and the mIoU (%) the original reports on ADE20K val."""

    head: UperNetHead
    eval: SegmentationEval
    reported_miou: float
    #: Multi-scale + flip.
    reported_miou_ms: float
    #: The label set (``convnext_keras.data.ade20k`` ships ADE20K's names and palette).
    labels: str = "ade20k"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One released checkpoint and everything needed to use it faithfully."""

    name: str
    #: Registry key of the architecture (``VARIANTS``).
    variant: str
    #: Size of the classification head; None for an encoder without head (FCMAE).
    num_classes: int | None
    resolution: int
    #: Training data, e.g. ``"imagenet-1k"``, ``"imagenet-21k -> imagenet-1k"``,
    #: ``"fcmae imagenet-1k"`` (self-supervised), ``"fcmae -> imagenet-1k"``.
    dataset: str
    source: Source
    #: Top-1 accuracy on ImageNet-1k val as the original reports it (None: no 1k head).
    reported_acc1: float | None
    #: The evaluation transform: centre-crop fraction and resampling filter.
    crop_pct: float
    interpolation: str = DEFAULT_INTERPOLATION
    family: str = "convnext"
    #: SPDX identifier of the weights' licence.
    licence: str = "MIT"
    #: Expected SHA-256 (hex) of the published file, checked at download and when the cache is
    #: read.  The official host publishes none, so the rows leave it None; users pin one with
    #: ``CONVNEXT_SHA256_<NAME>`` or ``CONVNEXT_SHA256SUMS`` (convnext_keras.weights.cache).
    sha256: str | None = None
    #: How the evaluation transform fits the image to ``resolution``: ``"center"`` (resize the
    #: shorter side to ``resolution / crop_pct``, centre crop) or ``"squash"`` (resize to
    #: ``resolution x resolution``, no crop); None: the official rule, squash at
    #: :data:`SQUASH_RESOLUTION` and above (:func:`squashes`).
    crop_mode: str | None = None
    #: A semantic-segmentation checkpoint's decoder and test-time settings (None: an image
    #: classifier or encoder).  ``num_classes`` is then the number of segmentation classes and
    #: ``resolution`` the crop size.
    segmentation: Segmentation | None = None

    @property
    def filename(self) -> str:
        """The published file name (``convnext_tiny_1k_224_ema.pth``)."""
        return self.source.filename

    @property
    def url(self) -> str:
        return self.source.url

    @property
    def spec(self) -> Variant:
        return VARIANTS[self.variant]

    @property
    def has_head(self) -> bool:
        return self.num_classes is not None

    @property
    def task(self) -> str:
        """``"segmentation"`` or ``"classification"`` (classifiers and encoders)."""
        return "classification" if self.segmentation is None else "segmentation"

    @property
    def aliases(self) -> tuple[str, ...]:
        """Other accepted spellings: the file's stem, with and without ``_ema``; for a Hub
        file, the repository's name (``convnext_atto.d2_in1k``,
        ``dinov3_convnext_tiny_pretrain_lvd1689m``)."""
        if self.source.is_hub:
            stem = canonical_name(self.source.repo.rsplit("/", 1)[-1])
        else:
            stem = canonical_name(self.filename.split(".", 1)[0])
        return tuple(a for a in dict.fromkeys((stem, stem.removesuffix("_ema"))) if a != self.name)


def _v1_checkpoints() -> list[Checkpoint]:
    def row(name, size, classes, res, dataset, filename, acc):
        return Checkpoint(
            name,
            size,
            classes,
            res,
            dataset,
            Source(filename),
            acc,
            official_crop_pct(res),
        )

    table = []
    # ImageNet-1k trained (filename, reported acc@1 at 224 / 384).
    acc_1k_224 = {"tiny": 82.1, "small": 83.1, "base": 83.8, "large": 84.3}
    acc_1k_384 = {"base": 85.1, "large": 85.5}
    # ImageNet-22k trained, ImageNet-1k fine-tuned.
    acc_22k_1k_224 = {"tiny": 82.9, "small": 84.6, "base": 85.8, "large": 86.6, "xlarge": 87.0}
    acc_22k_1k_384 = {"tiny": 84.1, "small": 85.8, "base": 86.8, "large": 87.5, "xlarge": 87.8}
    for size, acc in acc_1k_224.items():
        table.append(
            row(
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
            row(
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
            row(
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
                row(
                    f"convnext_{size}_21k_1k_{res}",
                    size,
                    NUM_CLASSES_1K,
                    res,
                    "imagenet-21k -> imagenet-1k",
                    f"convnext_{size}_22k_1k_{res}{ema}.pth",
                    acc,
                )
            )
    return table


def _v2_checkpoints() -> list[Checkpoint]:
    """facebookresearch/ConvNeXt-V2 README, "Results and Pre-trained Models" (acc@1 as listed
    there; the eval transform is ``datasets.py``'s, the same as ConvNeXt's)."""
    family = FAMILIES["convnextv2"]

    def row(name, size, classes, res, dataset, path, acc):
        return Checkpoint(
            name,
            f"convnextv2_{size}",
            classes,
            res,
            dataset,
            Source(f"convnextv2/{path}"),
            acc,
            official_crop_pct(res),
            family=family.name,
            licence=family.licence,
        )

    acc_1k = {
        "atto": 76.7,
        "femto": 78.5,
        "pico": 80.3,
        "nano": 81.9,
        "tiny": 83.0,
        "base": 84.9,
        "large": 85.8,
        "huge": 86.3,
    }
    acc_22k = {
        ("nano", 224): 82.1,
        ("nano", 384): 83.4,
        ("tiny", 224): 83.9,
        ("tiny", 384): 85.1,
        ("base", 224): 86.8,
        ("base", 384): 87.7,
        ("large", 224): 87.3,
        ("large", 384): 88.2,
        ("huge", 384): 88.7,
        ("huge", 512): 88.9,
    }
    table = [
        row(
            f"convnextv2_{size}_fcmae",
            size,
            None,
            224,
            "fcmae imagenet-1k",
            f"pt_only/convnextv2_{size}_1k_224_fcmae.pt",
            None,
        )
        for size in _V2_SIZES
    ]
    table += [
        row(
            f"convnextv2_{size}_1k_224",
            size,
            NUM_CLASSES_1K,
            224,
            "fcmae -> imagenet-1k",
            f"im1k/convnextv2_{size}_1k_224_ema.pt",
            acc,
        )
        for size, acc in acc_1k.items()
    ]
    table += [
        row(
            f"convnextv2_{size}_21k_1k_{res}",
            size,
            NUM_CLASSES_1K,
            res,
            "fcmae -> imagenet-21k -> imagenet-1k",
            f"im22k/convnextv2_{size}_22k_{res}_ema.pt",
            acc,
        )
        for (size, res), acc in acc_22k.items()
    ]
    return table


def _isotropic_checkpoints() -> list[Checkpoint]:
    """facebookresearch/ConvNeXt README, "ImageNet-1K trained models (isotropic)": 224x224,
    acc@1 as listed there; the evaluation transform is ``main.py``'s (the same as ConvNeXt's)."""
    acc = {"small": 78.7, "base": 82.0, "large": 82.6}
    return [
        Checkpoint(
            f"convnext_iso_{size}_1k_224",
            f"iso_{size}",
            NUM_CLASSES_1K,
            224,
            "imagenet-1k",
            Source(f"convnext_iso_{size}_1k_224_ema.pth"),
            top1,
            official_crop_pct(224),
        )
        for size, top1 in acc.items()
    ]


#: The DINOv3 ConvNeXt backbones' sizes (facebookresearch/dinov3 ``models/convnext.py``,
#: ``convnext_sizes``): ConvNeXt's tiny/small/base/large, layer scale 1e-6, no classifier.
DINOV3_SIZES = ("tiny", "small", "base", "large")


def _dinov3_checkpoints() -> list[Checkpoint]:
    """The Hugging Face Hub's copies (gated: the DINOv3 License must be accepted on the Hub) of
    the backbones distilled from DINOv3 on LVD-1689M.  Evaluation transform: the Hub's image
    processor (transformers ``DINOv3ViTImageProcessor``: resize to 224x224, bilinear, no crop;
    the README's ``make_transform`` is the same warp at 256)."""
    family = FAMILIES["dinov3"]
    return [
        Checkpoint(
            f"dinov3_convnext_{size}_lvd1689m",
            size,
            None,
            224,
            "dinov3 lvd-1689m",
            Source("model.safetensors", repo=f"facebook/dinov3-convnext-{size}-pretrain-lvd1689m"),
            None,
            1.0,
            "bilinear",
            family=family.name,
            licence=family.licence,
            crop_mode="squash",
        )
        for size in DINOV3_SIZES
    ]


def _timm_checkpoints() -> list[Checkpoint]:
    """timm's ImageNet-1k-head weights of its small ConvNeXts (timm ``models/convnext.py``,
    ``default_cfgs``: input size, crop_pct, interpolation; every file is ``model.safetensors``
    of the Hub repository ``timm/<architecture>.<tag>``).  acc@1: timm's
    ``results/results-imagenet.csv`` at the configuration's input size and crop (timm's
    ``test_input_size`` of 288 scores higher; the rows keep the pretrained configuration)."""
    family = FAMILIES["timm"]
    # (name, size, timm tag, dataset, resolution, crop_pct, crop mode, acc@1)
    table = [
        ("convnext_atto_1k_224", "atto", "d2_in1k", "imagenet-1k", 224, 0.875, None, 75.672),
        ("convnext_femto_1k_224", "femto", "d1_in1k", "imagenet-1k", 224, 0.875, None, 77.498),
        ("convnext_pico_1k_224", "pico", "d1_in1k", "imagenet-1k", 224, 0.875, None, 79.516),
        ("convnext_nano_1k_224", "nano", "d1h_in1k", "imagenet-1k", 224, 0.95, None, 80.762),
        (
            "convnext_nano_12k_1k_224",
            "nano",
            "in12k_ft_in1k",
            "imagenet-12k -> imagenet-1k",
            224,
            0.95,
            None,
            82.306,
        ),
        # timm's default crop_mode is "center": at 384 it centre-crops (crop_pct 1.0) where the
        # official transform squashes.
        (
            "convnext_nano_12k_1k_384",
            "nano",
            "r384_in12k_ft_in1k",
            "imagenet-12k -> imagenet-1k",
            384,
            1.0,
            "center",
            83.334,
        ),
    ]
    return [
        Checkpoint(
            name,
            size,
            NUM_CLASSES_1K,
            res,
            dataset,
            Source("model.safetensors", repo=f"timm/convnext_{size}.{tag}"),
            acc,
            crop_pct,
            "bicubic",
            family=family.name,
            licence=family.licence,
            crop_mode=crop_mode,
        )
        for name, size, tag, dataset, res, crop_pct, crop_mode, acc in table
    ]


def _segmentation_checkpoints() -> list[Checkpoint]:
    """facebookresearch/ConvNeXt ``semantic_segmentation/README.md`` ("Results and Fine-tuned
    Models": file, crop, mIoU and mIoU ms+flip) and the configs named above."""
    family = FAMILIES["upernet_convnext"]
    # (size, pre-training, crop): (mIoU, mIoU ms+flip)
    table = {
        ("tiny", "1k", 512): (46.0, 46.7),
        ("small", "1k", 512): (48.7, 49.6),
        ("base", "1k", 512): (49.1, 49.9),
        ("base", "22k", 640): (52.6, 53.1),
        ("large", "22k", 640): (53.2, 53.7),
        ("xlarge", "22k", 640): (53.6, 54.0),
    }
    # ade20k.py / ade20k_640x640.py img_scale; test_cfg slide crop and stride of the _ss configs.
    settings = {
        512: SegmentationEval(image_scale=(2048, 512), crop=512, stride=341),
        640: SegmentationEval(image_scale=(2560, 640), crop=640, stride=426),
    }
    pretraining = {"1k": "imagenet-1k", "22k": "imagenet-21k"}
    return [
        Checkpoint(
            f"upernet_convnext_{size}_ade20k_{crop}",
            size,
            NUM_CLASSES_ADE20K,
            crop,
            f"{pretraining[data]} -> ade20k",
            Source(f"ade20k/upernet_convnext_{size}_{data}_{crop}x{crop}.pth"),
            None,
            1.0,  # no centre crop: the image is resized whole (keep ratio), then windowed
            "bilinear",
            family=family.name,
            licence=family.licence,
            segmentation=Segmentation(UperNetHead(), settings[crop], *miou),
        )
        for (size, data, crop), miou in table.items()
    ]


CHECKPOINTS: dict[str, Checkpoint] = {
    c.name: c
    for c in _v1_checkpoints()
    + _v2_checkpoints()
    + _isotropic_checkpoints()
    + _dinov3_checkpoints()
    + _timm_checkpoints()
    + _segmentation_checkpoints()
}


#: Suffix that turns a checkpoint name into its feature-extractor twin (TF-Hub convention).
FEATURE_EXTRACTOR_SUFFIX = "_fe"


def families(family: str | None = None) -> list[str]:
    """Checkpoint names of one family (all when None), in registry order."""
    return [c.name for c in CHECKPOINTS.values() if family in (None, c.family)]


# ---------------------------------------------------------------------------------------------
# Fine-tuning settings


@dataclasses.dataclass(frozen=True)
class FinetuneDefaults:
    """A variant's published fine-tuning settings; None fields keep the library's defaults
    (ConvNeXt's ImageNet-22k -> 1k recipe, ``finetune.Recipe``)."""

    drop_path: float
    #: ``"group"``: 12 groups of blocks, the last of them the head's neighbours (ConvNeXt's
    #: ``optim_factory.py``; ConvNeXt V2's for base and larger); ``"single"``: one group per
    #: block (ConvNeXt V2's for atto..tiny).
    layer_decay_type: str = "group"
    layer_decay: float | None = None
    #: Learning rate per 256 images (the original's ``--blr``): ``lr = base_lr * batch / 256``.
    base_lr: float | None = None
    weight_decay: float | None = None
    #: Where the numbers come from.
    source: str = ""


_V1_TRAINING = "facebookresearch/ConvNeXt TRAINING.md, ImageNet-22K -> 1K fine-tuning"
_V2_TRAINING = "facebookresearch/ConvNeXt-V2 TRAINING.md, ImageNet-1K fine-tuning"
_V2_ATTO = FinetuneDefaults(0.1, "single", 0.9, 2e-4, 0.3, f"{_V2_TRAINING}, ConvNeXt V2-Atto")
_V2_TINY = FinetuneDefaults(0.2, "single", 0.9, 8e-4, 0.05, f"{_V2_TRAINING}, ConvNeXt V2-Tiny")
_V2_BASE = FinetuneDefaults(0.1, "group", 0.6, 6.25e-4, 0.05, f"{_V2_TRAINING}, ConvNeXt V2-Base")


def _carried(defaults: FinetuneDefaults, from_size: str) -> FinetuneDefaults:
    return dataclasses.replace(
        defaults,
        source=f"{from_size}'s ({_V2_TRAINING} publishes no command for this size)",
    )


#: Variants with published (or, for the V2 sizes TRAINING.md leaves out, the nearest published)
#: fine-tuning settings.  ConvNeXt: stochastic depth of the 22k -> 1k commands (the same at 224
#: and 384).  ConvNeXt V2: the atto, tiny and base commands; femto/pico/nano take atto's, large
#: and huge base's (the layer-decay scheme the paper gives for those sizes).
FINETUNE: dict[str, FinetuneDefaults] = {
    "base": FinetuneDefaults(0.2, source=_V1_TRAINING),
    "large": FinetuneDefaults(0.3, source=_V1_TRAINING),
    "xlarge": FinetuneDefaults(0.4, source=_V1_TRAINING),
    "convnextv2_atto": _V2_ATTO,
    "convnextv2_femto": _carried(_V2_ATTO, "atto"),
    "convnextv2_pico": _carried(_V2_ATTO, "atto"),
    "convnextv2_nano": _carried(_V2_ATTO, "atto"),
    "convnextv2_tiny": _V2_TINY,
    "convnextv2_base": _V2_BASE,
    "convnextv2_large": _carried(_V2_BASE, "base"),
    "convnextv2_huge": _carried(_V2_BASE, "base"),
}

# ---------------------------------------------------------------------------------------------
# Names


@dataclasses.dataclass(frozen=True)
class ResolvedName:
    """What a user-facing model name means."""

    #: The checkpoint entry, or None for an architecture-only name such as ``convnext_atto``.
    checkpoint: Checkpoint | None
    variant: Variant
    #: "classifier", "pooled" (``_fe`` names), "pyramid" (an encoder without head, FCMAE) or
    #: "segmentation" (a UperNet checkpoint: per-pixel logits).
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


def canonical_name(name: str) -> str:
    """Lower-case, ``-`` -> ``_`` and the file names' ``22k`` -> the collection's ``21k``."""
    key = name.strip().lower().replace("-", "_")
    return re.sub(r"_22k(?=_|$)", "_21k", key)


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
        if ckpt.segmentation is not None:
            if head is not None:
                raise UnknownModelError(
                    f"{name!r}: {key} is a semantic-segmentation model (per-pixel logits), "
                    f"which has no '{FEATURE_EXTRACTOR_SUFFIX}' feature-extractor twin; use "
                    f"{key}, or a classifier's '{FEATURE_EXTRACTOR_SUFFIX}' name for pooled "
                    "features."
                )
            return ResolvedName(ckpt, ckpt.spec, "segmentation", key)
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
    raise UnknownModelError(
        f"Unknown model name {name!r}.{hint} Run `convnext list` (or "
        f"convnext_keras.list_models()) for the {len(CHECKPOINTS)} checkpoints; add "
        f"'{FEATURE_EXTRACTOR_SUFFIX}' for a feature extractor, or use an architecture name "
        f"({', '.join(_by_arch_name())}) with {fix('weights=None', '--weights none')} or a "
        "local file."
    )


def model_names(include_fe: bool = True, include_variants: bool = False) -> list[str]:
    """Every loadable name: checkpoints, their ``_fe`` twins, optionally bare architectures."""
    names = list(CHECKPOINTS)
    if include_fe:  # segmentation models have no _fe twin
        names += [
            n + FEATURE_EXTRACTOR_SUFFIX for n, c in CHECKPOINTS.items() if not c.segmentation
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
