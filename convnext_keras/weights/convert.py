"""Official names -> Keras weights: map a state dict onto the layers of this library's
networks, and assign them to a built model.

Conversion is a chain of pure functions on ``{name: numpy array}`` dictionaries:

    read_state_dict(path)            file -> state dict (never executes pickled code): .read
    to_official_layout(sd)           any known layout -> the official names: .layouts
    convert_state_dict(sd, variant)  official names -> {keras layer name: [weights]}: here
    assign_weights(model, weights)   set them on a built model, checking every layer: here

Every tensor is accounted for: missing, unexpected or wrongly shaped tensors raise a
``CheckpointError`` naming the key, both shapes and what to do about it.  A ConvNeXt checkpoint
given to a ConvNeXt V2 name (or the reverse) is an error naming the model it fits.  The
segmentation files (mmsegmentation's UperNet) convert with :func:`convert_mmseg_state_dict`, the
detection files (mmdetection's Mask R-CNN) with :mod:`.convert_detection`.
"""

from __future__ import annotations

import logging
import re

import numpy as np

from convnext_keras import registry
from convnext_keras.interface import fix
from convnext_keras.weights.layouts import mmdet, mmseg, models_for, to_official_layout
from convnext_keras.weights.read import CheckpointError

_LOG = logging.getLogger(__name__)


def _conv(w):  # torch (out, in, kh, kw) -> keras (kh, kw, in, out)
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _dwconv(w):  # torch (C, 1, kh, kw) -> keras (kh, kw, C, 1)
    return np.ascontiguousarray(w.transpose(2, 3, 0, 1))


def _linear(w):  # torch (out, in) -> keras (in, out)
    return np.ascontiguousarray(w.T)


def _identity(w):
    return w


def _grn(w):  # official (1, 1, 1, C) -> keras (C,)
    return np.ascontiguousarray(w.reshape(-1))


def _official_plan(spec: registry.Variant):
    """Yield (keras layer, [(official key, expected torch shape, transform), ...])."""
    d0 = spec.dims[0]
    k, p, s = registry.DWCONV_KERNEL, spec.patch_size, registry.DOWNSAMPLE_STRIDE
    yield (
        "stem_conv",
        [
            ("downsample_layers.0.0.weight", (d0, 3, p, p), _conv),
            ("downsample_layers.0.0.bias", (d0,), _identity),
        ],
    )
    if spec.stem_norm:
        yield (
            "stem_norm",
            [
                ("downsample_layers.0.1.weight", (d0,), _identity),
                ("downsample_layers.0.1.bias", (d0,), _identity),
            ],
        )
    for i, (depth, dim) in enumerate(zip(spec.depths, spec.dims)):
        if i > 0:
            prev = spec.dims[i - 1]
            yield (
                f"stage{i}_downsample_norm",
                [
                    (f"downsample_layers.{i}.0.weight", (prev,), _identity),
                    (f"downsample_layers.{i}.0.bias", (prev,), _identity),
                ],
            )
            yield (
                f"stage{i}_downsample_conv",
                [
                    (f"downsample_layers.{i}.1.weight", (dim, prev, s, s), _conv),
                    (f"downsample_layers.{i}.1.bias", (dim,), _identity),
                ],
            )
        hidden = registry.MLP_RATIO * dim
        for j in range(depth):
            src, dst = f"stages.{i}.{j}", f"stage{i}_block{j}"
            yield (
                f"{dst}_dwconv",
                [
                    (f"{src}.dwconv.weight", (dim, 1, k, k), _dwconv),
                    (f"{src}.dwconv.bias", (dim,), _identity),
                ],
            )
            yield (
                f"{dst}_norm",
                [
                    (f"{src}.norm.weight", (dim,), _identity),
                    (f"{src}.norm.bias", (dim,), _identity),
                ],
            )
            yield (
                f"{dst}_pwconv1",
                [
                    (f"{src}.pwconv1.weight", (hidden, dim), _linear),
                    (f"{src}.pwconv1.bias", (hidden,), _identity),
                ],
            )
            if spec.block == "grn":
                yield (
                    f"{dst}_grn",
                    [
                        (f"{src}.grn.gamma", (1, 1, 1, hidden), _grn),
                        (f"{src}.grn.beta", (1, 1, 1, hidden), _grn),
                    ],
                )
            yield (
                f"{dst}_pwconv2",
                [
                    (f"{src}.pwconv2.weight", (dim, hidden), _linear),
                    (f"{src}.pwconv2.bias", (dim,), _identity),
                ],
            )
            if spec.block == "layer_scale":
                yield f"{dst}_layer_scale", [(f"{src}.gamma", (dim,), _identity)]
    c = spec.num_features
    yield "head_norm", [("norm.weight", (c,), _identity), ("norm.bias", (c,), _identity)]


def infer_architecture(official: dict[str, np.ndarray]) -> tuple[tuple, tuple, int | None]:
    """(depths, dims, num_classes or None) of an official-layout state dict: one entry per
    stage the names mention (4; an isotropic ConvNeXt 1)."""
    named = {
        int(m.group(1))
        for k in official
        if (m := re.match(r"(?:stages|downsample_layers)\.(\d+)\.", k))
    }
    depths, dims = [], []
    for i in range(max(named) + 1 if named else 4):
        blocks = {int(m.group(1)) for k in official if (m := re.match(rf"stages\.{i}\.(\d+)\.", k))}
        depths.append(max(blocks) + 1 if blocks else 0)
        w = official.get(f"stages.{i}.0.dwconv.weight")
        dims.append(int(w.shape[0]) if w is not None else 0)
    head = official.get("head.weight")
    return tuple(depths), tuple(dims), (int(head.shape[0]) if head is not None else None)


def infer_block(official: dict[str, np.ndarray]) -> str | None:
    """The block type of an official-layout state dict: ``"grn"`` (ConvNeXt V2),
    ``"layer_scale"`` (ConvNeXt), or None when it has neither (a ConvNeXt without layer
    scale)."""
    if any(re.match(r"stages\.\d+\.\d+\.grn\.", k) for k in official):
        return "grn"
    if any(re.match(r"stages\.\d+\.\d+\.gamma$", k) for k in official):
        return "layer_scale"
    return None


_BLOCK_WORDS = {
    "grn": "GRN blocks",
    "layer_scale": "layer-scale blocks",
    "plain": "blocks without layer scale",
}


def stage_norms(official: dict[str, np.ndarray]) -> list[int]:
    """The stages whose output has a LayerNorm in an official-named state dict (``norm{i}.*``:
    the official segmentation backbone's ``norm0`` ... ``norm3``, transformers' Backbone's
    ``hidden_states_norms.stage{i+1}``), sorted."""
    return sorted({int(m.group(1)) for k in official if (m := re.match(r"norm(\d+)\.", k))})


def _backbone_hint(v: registry.Variant) -> str:
    """How to load a backbone file with stage-output norms of variant ``v``: as a pyramid."""
    how = fix(
        f"load_model({v.arch_name!r}, weights=FILE, features='pyramid')",
        f"convnext convert FILE --model {v.arch_name} --features pyramid --out MODEL.keras",
    )
    return f"it loads as a feature pyramid with its stage norms: {how}"


def _describe_architecture(official) -> str:
    depths, dims, classes = infer_architecture(official)
    block = infer_block(official)
    for v in registry.VARIANTS.values():
        if v.depths == depths and v.dims == dims and block in (None, v.block):
            if stage_norms(official):
                return (
                    f"it is a {v.title} backbone ({_BLOCK_WORDS[v.block]}, depths "
                    f"{list(depths)}, dims {list(dims)}, stage-output norms, e.g. transformers' "
                    f"ConvNextBackbone / ConvNextV2Backbone): {_backbone_hint(v)}"
                )
            names = registry.checkpoints_for(v.name, classes) or [v.arch_name]
            return (
                f"it is a {v.title} ({_BLOCK_WORDS[v.block]}, depths {list(depths)}, dims "
                f"{list(dims)}{f', {classes} classes' if classes else ', no head'}): use "
                f"{' or '.join(names)}"
            )
    return f"it has depths {list(depths)} and dims {list(dims)}, which no known variant has"


def _take(official, entries, used: set, missing: list, wrong: list) -> list[np.ndarray] | None:
    """The Keras weights of one layer's plan ``entries`` ``[(key, torch shape, transform)]``,
    or None when one is missing (listed in ``missing``) or of another shape (in ``wrong``)."""
    arrays = []
    for key, shape, transform in entries:
        if key not in official:
            missing.append(key)
            continue
        used.add(key)
        value = official[key]
        if tuple(value.shape) != shape:
            wrong.append(f"{key}: checkpoint {tuple(value.shape)}, model expects {shape}")
            continue
        arrays.append(transform(value).astype(np.float32, copy=False))
    return arrays if len(arrays) == len(entries) else None


def _misfit(title: str, missing: list, wrong: list, unexpected: list, hint: str) -> CheckpointError:
    """The error listing what does not fit (six of each kind at most), then ``hint``."""
    lines = [title]
    for what, items in (("missing", missing), ("wrong shape", wrong), ("unexpected", unexpected)):
        if items:
            shown = "; ".join(items[:6]) + (
                f"; ... ({len(items)} in all)" if len(items) > 6 else ""
            )
            lines.append(f"  {what}: {shown}")
    lines.append(f"  Hint: {hint}.")
    return CheckpointError("\n".join(lines))


def convert_state_dict(
    state_dict: dict[str, np.ndarray],
    variant: str | registry.Variant,
    *,
    final_norm: bool = True,
) -> dict[str, list[np.ndarray]]:
    """Map a state dict in any supported layout to ``{keras layer name: [weights]}``.

    The classification head (``head_fc``) is included when the checkpoint has one; its size is
    whatever the checkpoint holds (checked against the model by :func:`assign_weights`).  A
    ConvNeXt V2 encoder without final norm and head (FCMAE pre-training) gets the final
    LayerNorm (``head_norm``) at its initialisation, scale 1 and shift 0, as the original
    fine-tuning starts from it.  ``final_norm=False``: a backbone without final LayerNorm (the
    segmentation backbone, :func:`convert_mmseg_state_dict`), whose ``norm.*`` would be
    unexpected.  A backbone with stage-output norms (``norm{i}.*``: transformers'
    ``ConvNextBackbone`` / ``ConvNextV2Backbone``, whose ``hidden_states_norms`` the layout
    renames so) has no final norm either; its norms become ``stage{i}_output_norm``, the layers
    of a pyramid model built with ``stage_norms`` (:func:`convnext_keras.load_model` with
    ``features="pyramid"``).
    """
    spec = registry.variant(variant)
    official = to_official_layout(state_dict)
    depths, dims, _ = infer_architecture(official)
    block = infer_block(official)
    same_shape = (depths, dims) == (spec.depths, spec.dims)
    if (not same_shape and all(depths) and all(dims)) or (block and block != spec.block):
        raise CheckpointError(
            f"The checkpoint is not a {spec.title} ({_BLOCK_WORDS[spec.block]}, depths "
            f"{list(spec.depths)}, dims {list(spec.dims)}): {_describe_architecture(official)}."
        )
    weights: dict[str, list[np.ndarray]] = {}
    missing, wrong = [], []
    used = set()
    normed = stage_norms(official)
    final = {"norm.weight", "norm.bias", "head.weight", "head.bias"} & set(official)
    if normed and not final:
        final_norm = False  # a backbone with stage-output norms: no final norm, no head
    encoder = final_norm and spec.block == "grn" and not final
    if encoder:
        c = spec.num_features
        weights["head_norm"] = [np.ones(c, np.float32), np.zeros(c, np.float32)]
        _LOG.debug(
            "%s encoder without final norm: head_norm starts at scale 1, shift 0", spec.title
        )
    for layer, entries in _official_plan(spec):
        if layer == "head_norm" and (encoder or not final_norm):
            continue
        arrays = _take(official, entries, used, missing, wrong)
        if arrays is not None:
            weights[layer] = arrays
    for i in normed if len(spec.dims) > 1 else ():
        if i < len(spec.dims):
            entries = [(f"norm{i}.{p}", (spec.dims[i],), _identity) for p in ("weight", "bias")]
            arrays = _take(official, entries, used, missing, wrong)
            if arrays is not None:
                weights[f"stage{i}_output_norm"] = arrays
    head_keys = {"head.weight", "head.bias"} & set(official)
    if head_keys:
        used |= head_keys
        hw, hb = official.get("head.weight"), official.get("head.bias")
        if hw is None or hb is None:
            missing.append(({"head.weight", "head.bias"} - head_keys).pop())
        elif hw.ndim != 2 or hw.shape[1] != spec.num_features or hb.shape != (hw.shape[0],):
            wrong.append(
                f"head.weight/head.bias: checkpoint {tuple(hw.shape)}/"
                f"{tuple(hb.shape)}, model expects (classes, {spec.num_features})/"
                "(classes,)"
            )
        else:
            weights["head_fc"] = [
                _linear(hw).astype(np.float32, copy=False),
                hb.astype(np.float32, copy=False),
            ]
    unexpected = sorted(set(official) - used)
    _check_finite(official, used)
    if missing or wrong or unexpected:
        raise _misfit(
            f"The checkpoint does not fit {spec.title}:",
            missing,
            wrong,
            unexpected,
            _describe_architecture(official),
        )
    return weights


def _check_finite(state: dict[str, np.ndarray], keys) -> None:
    """``CheckpointError`` naming the tensors of ``keys`` that hold NaN or infinity."""
    bad = []
    for key in sorted(keys):
        value = state[key]
        if np.issubdtype(value.dtype, np.floating):
            count = value.size - int(np.count_nonzero(np.isfinite(value)))
            if count:
                bad.append(f"{key} ({count} of {value.size} values)")
    if bad:
        shown = "; ".join(bad[:5]) + (f"; ... ({len(bad)} tensors in all)" if len(bad) > 5 else "")
        raise CheckpointError(
            f"The checkpoint holds NaN or infinite weights: {shown}. A trained ConvNeXt has "
            "none; the file is damaged or was saved from a diverged run. Use another copy."
        )


# ---------------------------------------------------------------------------------------------
# mmsegmentation's UperNet checkpoints (the official ADE20K segmentation files)
# ---------------------------------------------------------------------------------------------

#: mmcv's BatchNorm tensors -> Keras' BatchNormalization weights, in Keras' order.
_BATCH_NORM = ("weight", "bias", "running_mean", "running_var")


def _upernet_plan(spec: registry.Variant, head: registry.UperNetHead, num_classes: int):
    """Yield (keras layer, [(mmseg key, torch shape, transform)]) for the stage norms and the
    decoder (mmseg ``UPerHead``: each ``ConvModule`` is ``<name>.conv`` + ``<name>.bn``)."""
    for i, dim in enumerate(spec.dims):
        yield (
            f"stage{i}_output_norm",
            [(f"{mmseg.BACKBONE}norm{i}.{p}", (dim,), _identity) for p in ("weight", "bias")],
        )
    c = head.channels

    def module(layer, key, inputs, kernel):
        key = mmseg.DECODER + key
        yield f"{layer}_conv", [(f"{key}.conv.weight", (c, inputs, kernel, kernel), _conv)]
        yield f"{layer}_bn", [(f"{key}.bn.{p}", (c,), _identity) for p in _BATCH_NORM]

    top = spec.dims[-1]
    for i in range(len(head.pool_scales)):
        yield from module(f"decode_ppm{i}", f"psp_modules.{i}.1", top, 1)
    yield from module("decode_bottleneck", "bottleneck", top + len(head.pool_scales) * c, 3)
    for i, dim in enumerate(spec.dims[:-1]):
        yield from module(f"decode_lateral{i}", f"lateral_convs.{i}", dim, 1)
        yield from module(f"decode_fpn{i}", f"fpn_convs.{i}", c, 3)
    yield from module("decode_fpn_bottleneck", "fpn_bottleneck", len(spec.dims) * c, 3)
    yield (
        "decode_conv_seg",
        [
            (f"{mmseg.DECODER}conv_seg.weight", (num_classes, c, 1, 1), _conv),
            (f"{mmseg.DECODER}conv_seg.bias", (num_classes,), _identity),
        ],
    )


def _segmentation_models(official_backbone: dict) -> str:
    """What backbone an official-named state dict has, and the segmentation names that fit."""
    depths, dims, _ = infer_architecture(official_backbone)
    for v in registry.VARIANTS.values():
        if (v.depths, v.dims) == (depths, dims):
            names = [
                c.name
                for c in registry.CHECKPOINTS.values()
                if c.segmentation is not None and c.variant == v.name
            ]
            use = f": use {' or '.join(names)}" if names else ""
            return f"its backbone is a {v.title} (depths {list(depths)}, dims {list(dims)}){use}"
    return f"its backbone has depths {list(depths)} and dims {list(dims)}, which no variant has"


def convert_mmseg_state_dict(
    state_dict: dict[str, np.ndarray],
    variant: str | registry.Variant,
    head: registry.UperNetHead | None = None,
    num_classes: int | None = None,
) -> dict[str, list[np.ndarray]]:
    """An mmsegmentation UperNet-ConvNeXt state dict -> ``{keras layer name: [weights]}`` for
    :func:`convnext_keras.nets.upernet.build_upernet`.

    The layout of the official ADE20K files (facebookresearch/ConvNeXt
    ``semantic_segmentation``; mmseg ``EncoderDecoder``): ``backbone.*`` in the official
    ConvNeXt names plus the stage-output norms ``backbone.norm0`` ... ``norm3``,
    ``decode_head.*`` (``psp_modules.{i}.1``, ``bottleneck``, ``lateral_convs.{i}``,
    ``fpn_convs.{i}``, ``fpn_bottleneck``, each ``.conv.weight`` + ``.bn.*``, and ``conv_seg``)
    and ``auxiliary_head.*``, the training-only FCN head: dropped, and listed in an INFO
    message of the ``convnext_keras`` logger.  BatchNorm's ``num_batches_tracked`` counters are
    read and not needed.

    Args:
        variant: the backbone variant; head: the decoder's settings (default
            ``registry.UperNetHead()``); num_classes: the classifier's size (default: the
            checkpoint's).

    Raises:
        CheckpointError: not this layout, another backbone, or a missing, unexpected or wrongly
            shaped tensor (each named), or NaN/inf weights.
    """
    spec = registry.variant(variant)
    head = head or registry.UperNetHead()
    if not mmseg.matches(state_dict):
        detector = ""
        if mmdet.matches(state_dict):
            fits = models_for(state_dict, "detection")
            detector = f" It is an mmdetection detection checkpoint: {fits}."
        raise CheckpointError(
            "Not an mmsegmentation segmentation checkpoint (backbone.* and decode_head.* "
            f"tensors); first keys: {list(state_dict)[:5]}. A segmentation model loads the "
            f"official ADE20K files (upernet_convnext_*_512x512.pth / *_640x640.pth).{detector}"
        )
    in_backbone = mmseg.backbone_keys(state_dict)
    backbone = mmseg.backbone(state_dict)
    depths, dims, _ = infer_architecture(backbone)
    if (depths, dims) != (spec.depths, spec.dims):
        raise CheckpointError(
            f"The checkpoint's backbone is not a {spec.title} (depths {list(spec.depths)}, dims "
            f"{list(spec.dims)}): {_segmentation_models(backbone)}."
        )
    weights = convert_state_dict(backbone, spec, final_norm=False)
    if num_classes is None:
        classifier = state_dict.get(f"{mmseg.DECODER}conv_seg.bias")
        num_classes = int(classifier.shape[0]) if classifier is not None else 0
    missing, wrong, used = [], [], set()
    for layer, entries in _upernet_plan(spec, head, num_classes):
        arrays = _take(state_dict, entries, used, missing, wrong)
        if arrays is not None:
            weights[layer] = arrays
    auxiliary = sorted(k for k in state_dict if k.startswith(mmseg.AUXILIARY))
    counters = {k for k in state_dict if k.endswith(".num_batches_tracked")}
    unexpected = sorted(set(state_dict) - used - counters - set(auxiliary) - set(in_backbone))
    _check_finite(state_dict, used)
    if missing or wrong or unexpected:
        raise _misfit(
            f"The checkpoint does not fit UperNet-{spec.title} ({num_classes} classes):",
            missing,
            wrong,
            unexpected,
            f"a UperNet with {head.channels} decoder channels and pool scales "
            f"{list(head.pool_scales)} (the official ADE20K checkpoints)",
        )
    if auxiliary:
        logging.getLogger("convnext_keras").info(
            "mmsegmentation checkpoint: dropped the training-only auxiliary FCN head "
            "(%d tensors: %s)",
            len(auxiliary),
            ", ".join(auxiliary),
        )
    return weights


def assign_weights(
    model, weights: dict[str, list[np.ndarray]], *, load_head: bool = True, source: str = ""
) -> None:
    """Set converted weights on every weight-carrying layer of ``model``.

    ``load_head=False`` leaves ``head_fc`` at its fresh initialisation (a new head for
    fine-tuning); layers absent from the model (the head of a feature extractor) are skipped.
    A model layer with no converted weights, or with a different shape, is an error.
    """
    where = f" from {source}" if source else ""
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name == "head_fc" and not load_head:
            continue
        if layer.name not in weights:
            if layer.name == "head_fc":
                raise CheckpointError(
                    f"The checkpoint{where} has no classification head; load it as a feature "
                    f"extractor ('_fe' name / {fix('features=', '--features ')}'pooled') or "
                    f"{fix('pass num_classes=N to start a new head', 'fine-tune a new head')}."
                )
            raise CheckpointError(f"No weights for layer {layer.name!r}{where}.")
        arrays = weights[layer.name]
        expected = [tuple(w.shape) for w in layer.weights]
        got = [tuple(a.shape) for a in arrays]
        if expected != got:
            if layer.name == "head_fc":
                ckpt_classes, model_classes = got[-1][0], expected[-1][0]
                hint = (
                    registry.checkpoints_for(_variant_of(model), ckpt_classes)
                    if _variant_of(model)
                    else []
                )
                raise CheckpointError(
                    f"The checkpoint{where} has a {ckpt_classes}-class head but the model has "
                    f"{model_classes} classes. "
                    + (f"Use {' or '.join(hint)} for this checkpoint, or " if hint else "Use ")
                    + "num_classes=N to start a new head for fine-tuning."
                )
            raise CheckpointError(
                f"Layer {layer.name!r}: checkpoint shapes {got}, model expects {expected}{where}."
            )
        layer.set_weights(arrays)


def _variant_of(model) -> str | None:
    from convnext_keras.nets.convnext import variant_of  # Keras: only once a model exists

    spec = variant_of(model)
    return spec.name if spec else None
