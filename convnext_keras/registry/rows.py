"""The registry's row types and the architecture's constants (the rows are in the family files).

:class:`Family` (a published line of models), :class:`Variant` (an architecture),
:class:`Checkpoint` (one released file, with its :class:`Source` and, for a segmentation
checkpoint, its :class:`Segmentation`; for a detection checkpoint, its :class:`Detection`) and
:class:`FinetuneDefaults`.  The tables the rows
belong to, :data:`FAMILIES` and :data:`VARIANTS`, are declared here (rows look them up) and
filled by :mod:`convnext_keras.registry` from the family files.  Imports no Keras.
"""

from __future__ import annotations

import dataclasses
import os
import re

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


#: Every family, by name (filled by :mod:`convnext_keras.registry` from the family files).
FAMILIES: dict[str, Family] = {}

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


#: Every architecture, by registry key (filled by :mod:`convnext_keras.registry`).
VARIANTS: dict[str, Variant] = {}


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


# Object detection and instance segmentation (Mask R-CNN and Cascade Mask R-CNN on COCO).
# Sources: facebookresearch/ConvNeXt object_detection/configs/_base_/models/
# {mask_rcnn,cascade_mask_rcnn}_convnext_fpn.py (network, test_cfg) and configs/convnext/*.py
# (backbone, the cascade's box heads); the dataset config they inherit,
# SwinTransformer/Swin-Transformer-Object-Detection@6a979e2 configs/_base_/datasets/
# coco_instance.py (test pipeline); mmdetection 2.11 (that repository's mmdet/) and mmcv 1.3 for
# the modules the configs name.

#: COCO's 80 "thing" classes (mmdetection ``CocoDataset.CLASSES``); the box heads add a
#: background score after them (index 80, mmdetection 2.x's position).
NUM_CLASSES_COCO = 80
#: ``DeltaXYWHBBoxCoder.decode``'s ``wh_ratio_clip``: log-width/height deltas are clamped to
#: ``+-|log(16 / 1000)|`` (a box grows or shrinks at most 62.5 times per decoding).
DELTA_WH_RATIO_CLIP = 16 / 1000
#: The methods a detection row can be (mmdetection ``MaskRCNN`` / ``CascadeRCNN``).
DETECTION_METHODS = ("mask_rcnn", "cascade_mask_rcnn")


@dataclasses.dataclass(frozen=True)
class BoxHead:
    """One R-CNN box head (mmdetection ``ConvFCBBoxHead``): ``num_convs`` 3x3 convolutions of
    ``conv_channels`` (each conv -> BatchNorm -> ReLU when ``conv_norm``, else conv with bias
    -> ReLU), flattened, ``num_fcs`` fully connected layers of ``fc_channels`` + ReLU, then the
    class scores (``NUM_CLASSES_COCO + 1`` logits, background last) and the box deltas (4 per
    class, or 4 shared when ``class_agnostic``), decoded with ``target_means`` /
    ``target_stds`` (``DeltaXYWHBBoxCoder``).  ``Shared2FCBBoxHead`` is ``num_convs=0,
    num_fcs=2``; the cascade configs' ``ConvFCBBoxHead`` is ``num_convs=4, num_fcs=1`` with
    SyncBN ("4conv1f")."""

    target_stds: tuple[float, float, float, float]
    num_convs: int = 0
    num_fcs: int = 2
    conv_channels: int = 256
    fc_channels: int = 1024
    conv_norm: bool = False
    class_agnostic: bool = False
    target_means: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)


@dataclasses.dataclass(frozen=True)
class DetectorHead:
    """The network on the backbone's four stage outputs (each with its LayerNorm, as the
    segmentation backbone): FPN, RPN and the R-CNN heads of a detection checkpoint.

    * FPN (mmdetection ``FPN``): 1x1 lateral convolutions to ``fpn_channels``, the top-down
      path (nearest upsampling, added), a 3x3 output convolution per level, and
      ``fpn_levels - 4`` extra levels by max-pooling the last with kernel 1, stride 2 (P6);
    * RPN (``RPNHead``): a shared 3x3 conv + ReLU, per level one sigmoid objectness and four
      deltas per anchor; anchors (``AnchorGenerator``) of size ``stride x scale`` at each ratio
      (height / width), centred on the grid points ``(x * stride, y * stride)``; deltas decoded
      with ``rpn_target_means`` / ``rpn_target_stds``;
    * R-CNN: RoIAlign (mmcv, ``aligned=True``, ``sampling_ratio`` 0 = adaptive) of
      ``box_roi_size`` / ``mask_roi_size`` on the first four FPN levels, a RoI going to level
      ``floor(log2(sqrt(area) / finest_scale + 1e-6))`` (clamped to 0..3, mmdetection
      ``SingleRoIExtractor``); one :class:`BoxHead` per stage (one for Mask R-CNN, three for
      the cascade); per stage a mask head (``FCNMaskHead``): ``mask_convs`` 3x3 conv + ReLU of
      ``mask_channels``, a 2x2 stride-2 transposed conv + ReLU, a 1x1 conv to 80 mask logits
      (28 x 28).
    """

    method: str
    box_heads: tuple[BoxHead, ...]
    fpn_channels: int = 256
    fpn_levels: int = 5
    anchor_scales: tuple[float, ...] = (8.0,)
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    anchor_strides: tuple[int, ...] = (4, 8, 16, 32, 64)
    rpn_target_means: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    rpn_target_stds: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    roi_strides: tuple[int, ...] = (4, 8, 16, 32)
    box_roi_size: int = 7
    mask_roi_size: int = 14
    sampling_ratio: int = 0
    finest_scale: int = 56
    mask_convs: int = 4
    mask_channels: int = 256

    def __post_init__(self):
        if self.method not in DETECTION_METHODS:
            raise ValueError(f"method must be one of {DETECTION_METHODS}, got {self.method!r}.")
        if len(self.anchor_strides) != self.fpn_levels:
            raise ValueError("one anchor stride per FPN level is needed.")

    @property
    def num_stages(self) -> int:
        return len(self.box_heads)

    @property
    def anchors_per_position(self) -> int:
        return len(self.anchor_scales) * len(self.anchor_ratios)

    @property
    def mask_size(self) -> int:
        """The mask head's output (the transposed conv doubles the RoI size): 28."""
        return 2 * self.mask_roi_size


@dataclasses.dataclass(frozen=True)
class DetectionEval:
    """The test-time procedure of a detection checkpoint (the test pipeline and ``test_cfg``).

    The photo (RGB, 0-255) resized keeping its aspect ratio to fit ``image_scale`` (long side
    at most ``image_scale[0]``, short side at most ``image_scale[1]``; mmcv ``imrescale``,
    bilinear), normalised with the ImageNet mean/std on 0-255 pixels, padded with zeros at the
    bottom and right to a multiple of ``size_divisor``.  RPN: the ``rpn_pre_nms`` best anchors
    of each level, decoded and clipped to the image, NMS at IoU ``rpn_iou`` within each level,
    the ``rpn_max`` best kept (boxes narrower or lower than ``rpn_min_size`` dropped, when it
    is above 0).  R-CNN: class scores (softmax) above ``score_threshold`` per class, their
    boxes decoded, clipped and mapped back to the photo's pixels, NMS at IoU ``iou`` within
    each class, the ``max_detections`` best kept; masks binarised at ``mask_threshold``.
    """

    image_scale: tuple[int, int] = (1333, 800)
    size_divisor: int = 32
    rpn_pre_nms: int = 1000
    rpn_max: int = 1000
    rpn_iou: float = 0.7
    rpn_min_size: float = 0.0
    score_threshold: float = 0.05
    iou: float = 0.5
    max_detections: int = 100
    mask_threshold: float = 0.5


@dataclasses.dataclass(frozen=True)
class Detection:
    """What a detection checkpoint adds to its backbone's row: the detector, the test-time
    procedure and the box / mask AP (%) the original reports on COCO val2017."""

    head: DetectorHead
    eval: DetectionEval
    reported_box_ap: float
    reported_mask_ap: float
    #: The label set (``convnext_keras.data.coco`` ships COCO's names and category ids).
    labels: str = "coco"


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
    #: An object-detection checkpoint's detector and test-time settings (None: not a detector).
    #: ``num_classes`` is then the number of object classes and ``resolution`` the test
    #: scale's short side.
    detection: Detection | None = None

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
        """``"segmentation"``, ``"detection"`` or ``"classification"`` (classifiers and
        encoders)."""
        if self.detection is not None:
            return "detection"
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


def canonical_name(name: str) -> str:
    """Lower-case, ``-`` -> ``_`` and the file names' ``22k`` -> the collection's ``21k``."""
    key = name.strip().lower().replace("-", "_")
    return re.sub(r"_22k(?=_|$)", "_21k", key)
