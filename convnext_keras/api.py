"""The user-facing entry points: list, load and convert models by name."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from convnext_keras import registry
from convnext_keras.interface import fix
from convnext_keras.weights import convert, convert_detection, hfhub, read, store

#: ``weights=`` value meaning "the official checkpoint of this name" (downloaded and cached).
OFFICIAL = "official"
_FEATURES = {
    None: None,
    "classifier": "classifier",
    "logits": "classifier",
    "pooled": "pooled",
    "fe": "pooled",
    "features": "pooled",
    "pyramid": "pyramid",
    "dense": "dense",
    "all": "all",
}


def list_models(pattern: str | None = None, *, include_fe: bool = True) -> list[str]:
    """Names of the collection's models (checkpoints and their ``_fe`` twins).

    ``pattern`` is a shell-style filter such as ``"*base*384*"``; without wildcards it matches
    as a substring (``"base"``).
    """
    import fnmatch

    names = registry.model_names(include_fe=include_fe)
    if pattern:
        pattern = registry.canonical_name(pattern)
        if not any(c in pattern for c in "*?["):
            pattern = f"*{pattern}*"
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return names


def model_table(pattern: str | None = None) -> list[dict]:
    """One row per checkpoint: name, family, params, resolution, classes (None: an encoder
    without head), dataset, acc1, miou (segmentation models: ADE20K val, single scale),
    box_ap and mask_ap (detection models: COCO val2017), reported (the one of those the row
    has, with its unit: :func:`reported_score`), licence (SPDX), cached, cached_from
    (None, ``"official"``, the mirror's URL or ``"unknown"``:
    :func:`convnext_keras.weights.store.cached_from`), url, source (``"official"`` or the Hub
    address ``hf://org/repo[@revision][/file]``, which ``weights=`` takes)."""
    rows = []
    for name in list_models(pattern, include_fe=False):
        c = registry.CHECKPOINTS[name]
        params = checkpoint_params(c)
        rows.append(
            {
                "name": name,
                "family": c.family,
                "params": params,
                "resolution": c.resolution,
                "classes": c.num_classes,
                "dataset": c.dataset,
                "acc1": c.reported_acc1,
                "miou": c.segmentation.reported_miou if c.segmentation else None,
                "box_ap": c.detection.reported_box_ap if c.detection else None,
                "mask_ap": c.detection.reported_mask_ap if c.detection else None,
                "reported": reported_score(c),
                "licence": c.licence,
                "cached": store.is_cached(c),
                "cached_from": store.cached_from(c),
                "url": c.url,
                "source": _source_text(c.source),
            }
        )
    return rows


def reported_score(c: registry.Checkpoint) -> str:
    """What the original reports for a checkpoint, with its unit: ``"82.1 acc@1"`` (ImageNet-1k
    top-1, %), ``"46.0 mIoU"`` (ADE20K val, single scale), ``"46.2 box / 41.7 mask AP"`` (COCO
    val2017), or ``"-"`` where nothing is reported (a pre-training or an encoder)."""
    if c.detection is not None:
        d = c.detection
        return f"{d.reported_box_ap:.1f} box / {d.reported_mask_ap:.1f} mask AP"
    if c.segmentation is not None:
        return f"{c.segmentation.reported_miou:.1f} mIoU"
    return "-" if c.reported_acc1 is None else f"{c.reported_acc1:.1f} acc@1"


def _source_text(source: registry.Source) -> str:
    if not source.is_hub:
        return "official"
    at = f"@{source.revision}" if source.revision else ""
    # The address of the repository alone means its model.safetensors (hfhub.resolve_hub_address).
    file = "" if source.path == hfhub.HUB_DEFAULT_FILES[0] else f"/{source.path}"
    return f"{hfhub.HF_SCHEME}{source.repo}{at}{file}"


def count_params(variant: str | registry.Variant, num_classes: int | None = None) -> int:
    """Parameter count of a variant with an optional ``num_classes`` head, without building it."""
    spec = registry.variant(variant)
    p = spec.patch_size
    total = 3 * p * p * spec.dims[0] + spec.dims[0]  # stem conv
    total += 2 * spec.dims[0] if spec.stem_norm else 0
    for i, (depth, dim) in enumerate(zip(spec.depths, spec.dims)):
        if i > 0:
            prev, s = spec.dims[i - 1], registry.DOWNSAMPLE_STRIDE
            total += 2 * prev + prev * dim * s * s + dim
        hidden = registry.MLP_RATIO * dim
        k = registry.DWCONV_KERNEL
        # dwconv, norm, pwconv1, pwconv2, then layer scale (dim), GRN (gamma, beta: 2 * hidden)
        # or nothing (plain blocks)
        per_block = (k * k * dim + dim) + 2 * dim + (dim * hidden + hidden) + (hidden * dim + dim)
        per_block += {"grn": 2 * hidden, "layer_scale": dim, "plain": 0}[spec.block]
        total += depth * per_block
    total += 2 * spec.num_features
    if num_classes:
        total += spec.num_features * num_classes + num_classes
    return total


def checkpoint_params(c: registry.Checkpoint) -> int:
    """The parameter count of a registry row's model, as Keras counts it, without building it."""
    if c.detection is not None:
        return count_detection_params(c.variant, c.detection.head, c.num_classes)
    if c.segmentation is not None:
        return count_segmentation_params(c.variant, c.segmentation.head, c.num_classes)
    return count_params(c.variant, c.num_classes)


def count_detection_params(
    variant: str | registry.Variant, head: registry.DetectorHead, num_classes: int
) -> int:
    """Parameter count of a Mask R-CNN / Cascade Mask R-CNN
    (:func:`convnext_keras.nets.detection.model.build_detector`) without building it, as Keras
    counts it: BatchNorm's moving mean and variance included."""
    spec = registry.variant(variant)
    c = head.fpn_channels
    backbone = count_params(spec) - 2 * spec.num_features + 2 * sum(spec.dims)  # stage norms
    fpn = sum(dim * c + c for dim in spec.dims) + len(spec.dims) * (9 * c * c + c)
    a = head.anchors_per_position
    rpn = (9 * c * c + c) + (c * a + a) + (c * 4 * a + 4 * a)
    boxes = 0
    for box in head.box_heads:
        width = c
        for _ in range(box.num_convs):
            boxes += 9 * width * box.conv_channels + (
                4 * box.conv_channels if box.conv_norm else box.conv_channels
            )
            width = box.conv_channels
        inputs = width * head.box_roi_size**2
        for _ in range(box.num_fcs):
            boxes += inputs * box.fc_channels + box.fc_channels
            inputs = box.fc_channels
        deltas = 4 if box.class_agnostic else 4 * num_classes
        boxes += inputs * (num_classes + 1) + (num_classes + 1) + inputs * deltas + deltas
    m = head.mask_channels
    mask = 9 * c * m + m + (head.mask_convs - 1) * (9 * m * m + m)  # 3x3 convs
    mask += 4 * m * m + m + m * num_classes + num_classes  # 2x2 transposed conv, 1x1 logits
    return backbone + fpn + rpn + boxes + head.num_stages * mask


def count_segmentation_params(
    variant: str | registry.Variant, head: registry.UperNetHead, num_classes: int
) -> int:
    """Parameter count of a UperNet-ConvNeXt (:func:`convnext_keras.nets.upernet.build_upernet`)
    without building it, as Keras counts it: BatchNorm's moving mean and variance included;
    the training-only auxiliary head, which the model leaves out, excluded."""
    spec = registry.variant(variant)
    c, scales = head.channels, len(head.pool_scales)
    batch_norm = 4 * c  # scale, shift, moving mean, moving variance

    def module(inputs: int, kernel: int) -> int:  # conv without bias + BatchNorm
        return inputs * c * kernel * kernel + batch_norm

    backbone = count_params(spec) - 2 * spec.num_features + 2 * sum(spec.dims)  # stage norms
    decoder = scales * module(spec.dims[-1], 1) + module(spec.dims[-1] + scales * c, 3)
    decoder += sum(module(dim, 1) + module(c, 3) for dim in spec.dims[:-1])
    decoder += module(len(spec.dims) * c, 3) + c * num_classes + num_classes
    return backbone + decoder


def load_model(
    name: str,
    *,
    weights: str | os.PathLike | None = OFFICIAL,
    features: str | None = None,
    num_classes: int | None = None,
    input_shape: tuple = (None, None, 3),
    drop_path_rate: float = 0.0,
    head_init_scale: float = 1.0,
    precision: str | None = None,
):
    """Build a ConvNeXt by name and load its weights.

    Args:
        name: a collection name (``convnext_tiny_1k_224``, ``convnextv2_tiny_21k_1k_384``,
            ``convnext_iso_base_1k_224``, ``dinov3_convnext_tiny_lvd1689m``,
            ``convnext_atto_1k_224``; ``22k`` is accepted for ``21k``, and the published file
            and Hub repository names too), its feature-extractor twin (``..._fe``), an
            architecture (``convnext_atto``, ``convnextv2_atto``, ``convnext_iso_small``), or a
            semantic-segmentation model (``upernet_convnext_tiny_ade20k_512``: images ->
            per-pixel logits, see :func:`load_segmentation_model`), or an object-detection model
            (``mask_rcnn_convnext_tiny_coco``, ``cascade_mask_rcnn_convnext_tiny_coco``: boxes,
            classes, scores and masks, see :func:`load_detection_model`).
            Licences differ (ConvNeXt V2: CC BY-NC 4.0, non-commercial; DINOv3: the DINOv3
            License; timm's: Apache-2.0): ``registry.CHECKPOINTS[name].licence`` and
            ``convnext list`` show each.
        weights: ``"official"`` (the name's own source - the official server or its Hub
            repository - downloaded, verified, converted and cached on first use), ``None``
            (random initialisation), a local checkpoint file (``.pth``, ``.bin``,
            ``.safetensors``; official, isotropic, timm, Hugging Face, DINOv3, FCMAE or
            mmsegmentation layout) or a file on the Hugging Face Hub: ``"hf://org/repo"`` (its
            ``model.safetensors``, else ``pytorch_model.bin``), ``"hf://org/repo/file"``,
            ``"hf://org/repo@rev/file"`` (downloaded by ``huggingface_hub``: ``HF_TOKEN`` for
            gated repositories).
        features: ``None`` (as the name says: logits, ``_fe`` pooled features, and for an
            encoder without head - FCMAE, DINOv3 - the pyramid), ``"classifier"``,
            ``"pooled"`` (pooled features after the head LayerNorm; an FCMAE encoder has none,
            its starts at scale 1 / shift 0 as in the original fine-tuning), ``"pyramid"``
            (the 4 stage outputs, strides 4-32; not for an isotropic ConvNeXt), ``"dense"``
            (the head LayerNorm at every position of the last stage, stride 32 - DINOv3's
            patch features; isotropic: stride 16) or ``"all"`` (a dict of logits, pooled
            features and the stage outputs).
        num_classes: head size. Default: the registry entry's (1000 for architecture names;
            none for an FCMAE encoder).  A value other than the checkpoint's head size starts
            a fresh head (fine-tuning) on top of the loaded backbone.
        input_shape: NHWC input shape without batch; any size by default.
        drop_path_rate: stochastic depth for training (0 at inference anyway).
        head_init_scale: factor on a freshly initialised head's weights (the original's
            ``--head_init_scale``; its fine-tuning recipe uses 0.001). A loaded head is kept.
        precision: None (default: the global Keras dtype policy, as for any Keras layer),
            ``"fp32"``, or Keras mixed precision ``"bf16"`` (``mixed_bfloat16``) / ``"fp16"``
            (``mixed_float16``): float32 weights, bfloat16/float16 compute, float32 logits and
            pooled features.  Faster on GPUs; on CPUs without native bfloat16 slower than
            float32 (BENCHMARKS.md).  The global policy is left as it was.
    """
    from convnext_keras.nets.convnext import (
        build_for_loading,
        build_model,
        check_head,
        draw_kernel,
        dtype_policy,
        policy_name,
    )

    # 1. The name -> its registry row, architecture and head.
    resolved = registry.resolve(name)
    if resolved.head == "detection":
        if features is not None or num_classes is not None:
            raise ValueError(
                f"{name!r} is an object-detection model (boxes, classes, scores and masks of "
                f"its {resolved.num_classes} classes): features= and num_classes= are for "
                "classification names."
            )
        return load_detection_model(
            name, weights=weights, input_shape=input_shape, precision=precision
        )
    if resolved.head == "segmentation":
        if features is not None or num_classes is not None:
            raise ValueError(
                f"{name!r} is a semantic-segmentation model (per-pixel logits of its "
                f"{resolved.num_classes} classes): features= and num_classes= are for "
                "classification names."
            )
        return load_segmentation_model(
            name, weights=weights, input_shape=input_shape, precision=precision
        )
    if precision:
        policy_name(precision)  # a bad value fails before any download
    if features not in _FEATURES:
        raise ValueError(
            f"features must be one of {sorted(k for k in _FEATURES if k)} or None, "
            f"got {features!r}."
        )
    head = _FEATURES[features] or resolved.head
    if features is None and num_classes is not None and head == "pyramid":
        head = "classifier"  # an encoder without head, given a new one
    check_head(resolved.variant, head)
    classes = resolved.num_classes if num_classes is None else num_classes
    if classes is None and head in ("classifier", "all"):
        raise ValueError(
            f"{name!r} is an encoder without classification head (self-supervised "
            f"pre-training): pass {fix('num_classes=N', '--num-classes N')} to start a new head "
            "for fine-tuning, or load its features (features='pooled' / 'pyramid', or the name "
            "with '_fe')."
        )
    # 2-5. The weights first (file -> read -> official names -> Keras weights), so that a bad
    # source fails before the build.
    converted, source = _converted_weights(
        name,
        resolved,
        weights,
        lambda state: convert.convert_state_dict(state, resolved.variant),
    )
    normed = _stage_norms(converted, head, resolved, source)
    # 6. The network.  With weights to load, no kernel is drawn only to be overwritten (but a
    # new head is).
    build = build_model if converted is None else build_for_loading
    with dtype_policy(precision) if precision else contextlib.nullcontext():
        model = build(
            resolved.variant,
            num_classes=classes,
            head=head,
            input_shape=input_shape,
            drop_path_rate=drop_path_rate,
            name=resolved.name,
            **({"stage_norms": normed} if normed else {}),
        )
    if converted is None:
        _scale_head(model, head_init_scale)
        return model
    # 7. The weights onto it.  An explicit num_classes other than the checkpoint's head means
    # "start a new head".
    ckpt_classes = converted["head_fc"][1].shape[0] if "head_fc" in converted else None
    load_head = num_classes is None or num_classes == ckpt_classes
    convert.assign_weights(model, converted, load_head=load_head, source=source)
    if not load_head and any(layer.name == "head_fc" for layer in model.layers):
        draw_kernel(model.get_layer("head_fc"), head_init_scale)
    return model


def _stage_norms(converted, head: str, resolved, source) -> list[int]:
    """The stages whose output norms ``converted`` holds (a backbone file with stage-output
    norms, e.g. transformers' ``ConvNextV2Backbone``): they load as a pyramid model with those
    norms; any other head is refused, naming the call that works."""
    normed = sorted(
        int(m.group(1))
        for layer in converted or {}
        if (m := re.fullmatch(r"stage(\d+)_output_norm", layer))
    )
    if normed and head != "pyramid":
        arch = resolved.variant.arch_name
        raise read.CheckpointError(
            f"{source} is a {resolved.variant.title} backbone with stage-output norms (e.g. "
            "transformers' ConvNextBackbone / ConvNextV2Backbone): no final norm and no head, so "
            f"it has no {head} output. It loads as a feature pyramid: "
            + fix(
                f"load_model({arch!r}, weights=FILE, features='pyramid')",
                f"convnext convert FILE --model {arch} --features pyramid --out MODEL.keras",
            )
            + "."
        )
    return normed


def _task_row(name: str, head: str, task: str, article: str) -> registry.Checkpoint:
    """The registry row of a ``head`` model name; for any other name a ``ValueError`` naming
    that task's models (a typo's hint among them alone: an architecture name or a classifier
    is no answer to a task that takes none)."""
    names = [c.name for c in registry.CHECKPOINTS.values() if c.task == head]
    try:
        resolved = registry.resolve(name)
    except registry.UnlistedNameError:
        import difflib

        close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise registry.UnknownModelError(
            f"Unknown {task} model {name!r}.{hint} The {task} models: {', '.join(names)}."
        ) from None
    if resolved.head != head:
        raise ValueError(
            f"{name!r} is not {article} {task} model; the {task} models: {', '.join(names)}."
        )
    return resolved.checkpoint


def segmentation_row(name: str) -> registry.Checkpoint:
    """The registry row of a segmentation model name; ``ValueError`` naming the segmentation
    models for any other name (``registry.UnknownModelError`` for a name not in the
    registry)."""
    return _task_row(name, "segmentation", "segmentation", "a")


def load_segmentation_model(
    name: str,
    *,
    weights="official",
    input_shape: tuple = (None, None, 3),
    precision: str | None = None,
):
    """The UperNet-ConvNeXt of a segmentation name with its weights (what :func:`load_model`
    does for the ``upernet_convnext_*`` names), by the same steps.

    ``weights``: ``"official"`` (download -> verify -> convert -> cache), None (random
    initialisation) or a local mmsegmentation checkpoint file (the official ``.pth``).
    ``precision``: as ``load_model``'s (logits stay float32).
    """
    from convnext_keras.nets.convnext import build_for_loading, dtype_policy, policy_name
    from convnext_keras.nets.upernet import build_upernet

    ckpt = segmentation_row(name)
    if precision:
        policy_name(precision)  # a bad value fails before any download
    resolved = registry.resolve(name)
    converted, source = _converted_weights(
        name,
        resolved,
        weights,
        lambda state: convert.convert_mmseg_state_dict(
            state, ckpt.variant, ckpt.segmentation.head, ckpt.num_classes
        ),
        hub=False,
    )
    options = dict(
        num_classes=ckpt.num_classes,
        head=ckpt.segmentation.head,
        input_shape=input_shape,
        name=ckpt.name,
    )
    with dtype_policy(precision) if precision else contextlib.nullcontext():
        if converted is None:
            return build_upernet(ckpt.variant, **options)
        model = build_for_loading(ckpt.variant, builder=build_upernet, **options)
    convert.assign_weights(model, converted, source=source)
    return model


def detection_row(name: str) -> registry.Checkpoint:
    """The registry row of a detection model name; ``ValueError`` naming the detection models
    for any other name (``registry.UnknownModelError`` for a name not in the registry)."""
    return _task_row(name, "detection", "object-detection", "an")


def load_detection_model(
    name: str,
    *,
    weights="official",
    input_shape: tuple = (None, None, 3),
    precision: str | None = None,
    settings: registry.DetectionEval | None = None,
):
    """The Mask R-CNN / Cascade Mask R-CNN of a detection name with its weights (what
    :func:`load_model` does for the ``*mask_rcnn_convnext_*_coco`` names), by the same steps.

    ``weights``: ``"official"`` (download -> verify -> convert -> cache), None (random
    initialisation) or a local mmdetection checkpoint file (the official ``.pth``).
    ``precision``: as ``load_model``'s (boxes, scores and masks stay float32).  ``settings``:
    other test-time settings than the row's (``registry.DetectionEval``; the score threshold,
    NMS and per-image limits are part of the graph).  ``input_shape`` must keep any height and
    width (the default): the model takes padded images of any size.

    The model: inputs ``images`` (B, H, W, 3) float32 (normalised, padded), ``image_sizes``
    (B, 2) int32, ``scale_factors`` (B, 2) float32; outputs ``boxes``, ``scores``, ``labels``,
    ``masks``, ``num_detections`` (:mod:`convnext_keras.nets.detection.model`).
    """
    from convnext_keras.nets.convnext import build_for_loading, dtype_policy, policy_name
    from convnext_keras.nets.detection.model import build_detector

    ckpt = detection_row(name)
    if precision:
        policy_name(precision)  # a bad value fails before any download
    if tuple(input_shape) != (None, None, 3):
        raise ValueError(
            f"A detector takes images of any size (padded per batch): input_shape must be "
            f"(None, None, 3), got {tuple(input_shape)}."
        )
    resolved = registry.resolve(name)
    converted, source = _converted_weights(
        name,
        resolved,
        weights,
        lambda state: convert_detection.convert_mmdet_state_dict(
            state, ckpt.variant, ckpt.detection.head, ckpt.num_classes
        ),
        hub=False,
    )
    options = dict(
        head=ckpt.detection.head,
        settings=settings or ckpt.detection.eval,
        num_classes=ckpt.num_classes,
        name=ckpt.name,
    )
    with dtype_policy(precision) if precision else contextlib.nullcontext():
        if converted is None:
            return build_detector(ckpt.variant, **options)
        model = build_for_loading(ckpt.variant, builder=build_detector, **options)
    convert.assign_weights(model, converted, source=source)
    return model


def check_weights(name: str, weights, *, hub: bool = True) -> registry.Checkpoint | None:
    """Check ``weights=`` for the model ``name`` without reading anything: ``"official"`` needs
    a name with an official checkpoint (``ValueError`` otherwise, naming the ways out), an
    ``hf://`` address must parse (``hub``: whether the model takes one), a path must exist (a
    checkpoint file, or a folder holding one: ``FileNotFoundError``).  Returns the registry
    row whose official file ``"official"`` means (None for any other ``weights``).  Keras-free:
    the command line checks ``--weights`` with it before a backend loads."""
    if isinstance(weights, str) and weights == OFFICIAL:
        resolved = registry.resolve(name)
        if resolved.checkpoint is None:
            official = registry.checkpoints_for(resolved.variant.name)
            raise ValueError(
                f"{name!r} is an architecture without an official checkpoint: pass "
                f"{fix('weights=None', '--weights none')} for random initialisation or "
                + fix("weights='FILE'", "--weights FILE")
                + " for a local checkpoint."
                + (f" Names with official weights: {', '.join(official)}." if official else "")
            )
        return resolved.checkpoint
    if weights is None:
        return None
    if hub and isinstance(weights, str) and weights.startswith(hfhub.HF_SCHEME):
        hfhub.parse_hf_address(weights)
        return None
    path = Path(weights).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"No such checkpoint file or folder: {path} (given as "
            f"{fix('weights=', '--weights ')}{weights})."
        )
    return None


def _converted_weights(
    name: str, resolved: registry.ResolvedName, weights, convert_state, *, hub: bool = True
) -> tuple[dict | None, str | None]:
    """``(Keras weights or None, where they came from)`` for ``weights=``: the registry row's
    own file (``"official"``: the converted cache, else download or Hub -> read -> convert ->
    cache, :func:`convnext_keras.weights.store.official_weights`), None (random
    initialisation), or a local file, a folder holding one (transformers' ``save_pretrained``)
    or an ``hf://`` address, read and converted by ``convert_state(state_dict)``."""
    row = check_weights(name, weights, hub=hub)
    if row is not None:
        return store.official_weights(row), row.url
    if weights is None:
        return None, None
    if hub and isinstance(weights, str) and weights.startswith(hfhub.HF_SCHEME):
        path, source = hfhub.resolve_hub_address(weights), weights
    else:
        path = Path(weights).expanduser()
        source = str(path)
    return convert_state(read.read_state_dict(path)), source


def classifier_row(name: str) -> registry.ResolvedName:
    """The resolved name of a classifier (what predict and evaluate take); ``ValueError``
    naming the right command or name for a segmentation model, a feature extractor or an
    encoder.  Keras-free (the command line checks ``--model`` with it first).  A name not in
    the registry is a ``registry.UnknownModelError`` whose hint is among the classifiers and the
    architecture names alone (what predict and evaluate can run)."""
    try:
        resolved = registry.resolve(name)
    except registry.UnlistedNameError:
        import difflib

        classifiers = [
            n for n, c in registry.CHECKPOINTS.items() if c.task == "classification" and c.has_head
        ]
        architectures = [
            n for n in registry.model_names(include_fe=False, include_variants=True)
            if n not in registry.CHECKPOINTS
        ]  # fmt: skip
        close = difflib.get_close_matches(str(name), classifiers, n=2, cutoff=0.6)
        close += difflib.get_close_matches(str(name), architectures, n=1, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        others = {"segmentation": "a semantic-segmentation model: convnext segment",
                  "detection": "an object-detection model: convnext detect"}  # fmt: skip
        tasks = [n for n, c in registry.CHECKPOINTS.items() if c.task in others]
        for other in difflib.get_close_matches(str(name), tasks, n=1, cutoff=0.9):
            hint += f" ({other} is {others[registry.CHECKPOINTS[other].task]})"
        raise registry.UnknownModelError(
            f"Unknown classifier {name!r}.{hint} `convnext list` shows the classifiers; an "
            f"architecture name (e.g. convnext_tiny) takes "
            f"{fix('weights=None', '--weights none')} or a local file."
        ) from None
    if resolved.head == "segmentation":
        raise ValueError(
            f"{name!r} is a semantic-segmentation model: label images with "
            f"{fix('convnext_keras.segment_files', 'convnext segment')} and evaluate it with "
            + fix("convnext_keras.tasks.segment_eval.evaluate_segmentation", "convnext eval-seg")
            + "."
        )
    if resolved.head != "classifier":
        what = "a feature extractor" if resolved.head == "pooled" else "an encoder"
        classifiers = registry.checkpoints_for(resolved.variant.name, 1000)
        raise ValueError(
            f"{name!r} is {what} without a classification head; predict and evaluate need "
            f"a classifier name (e.g. {(classifiers or ['convnext_tiny_1k_224'])[0]}), or "
            "fine-tune it first (convnext finetune)."
        )
    return resolved


class ModelFileError(ValueError):
    """A ``.keras`` file that cannot be loaded (damaged, not a model, or refused as unsafe)."""


def load_keras_file(path: str | os.PathLike, *, compile: bool = False):
    """``keras.saving.load_model(path)`` in Keras' safe mode, with errors for people.

    A file that is not a readable ``.keras`` archive, or whose configuration names code Keras
    will not run (a ``Lambda`` layer calling ``os.system``, ``builtins.exec``...; safe mode
    refuses it), raises :class:`ModelFileError` naming the file and Keras' reason.

    Raises:
        FileNotFoundError: no such file.  ModelFileError: it cannot be loaded.
    """
    import keras

    from convnext_keras.errors import plain
    from convnext_keras.nets import layers  # noqa: F401  (registers this library's layers)

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"No such model file: {path}")
    try:
        return keras.saving.load_model(path, compile=compile, safe_mode=True)
    except Exception as e:
        root = e
        while root.__cause__ is not None or root.__context__ is not None:
            root = root.__cause__ or root.__context__
        # Keras' innermost message, first sentence ("Could not locate function 'system'").
        lines = plain(str(root)).strip().splitlines() or ["no reason given"]
        reason = lines[0].split(". ")[0].rstrip(".")
        raise ModelFileError(
            f"{path} could not be loaded as a Keras model ({type(root).__name__}: {reason}). "
            "Keras' safe mode never runs code "
            "stored in a file; load only .keras files written by this library or a source you "
            "trust, or rebuild the model with convnext_keras.load_model."
        ) from e


def _scale_head(model, scale: float) -> None:
    if scale != 1.0 and any(layer.name == "head_fc" for layer in model.layers):
        head = model.get_layer("head_fc")
        head.set_weights([w * scale for w in head.get_weights()])


def convert_checkpoint(
    checkpoint: str | os.PathLike,
    name: str,
    out: str | os.PathLike,
    *,
    features: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a checkpoint file (any supported layout) to a ``.keras`` model file.

    The file is written to a temporary name and renamed only when complete; an existing
    ``out`` is refused unless ``overwrite=True``.
    """
    out = Path(out)
    if out.suffix != ".keras":
        raise ValueError(f"Output must end in .keras (Keras 3's model format), got {out}.")
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"{out} exists; pass {fix('overwrite=True', '--overwrite')} to replace it."
        )
    from convnext_keras.weights.cache import atomic_path

    model = load_model(name, weights=checkpoint, features=features)
    with atomic_path(out, suffix=".keras") as tmp:  # Keras insists on the suffix
        model.save(tmp)
    return out
