"""The ConvNeXt network as a Keras 3 functional model, built from ``keras.layers`` only.

Layer names are deterministic (``stage2_block5_pwconv1`` ...) so that checkpoint conversion,
layer-wise learning-rate decay and weight caching can address every weight by name; see
:func:`layer_names` for the full scheme.

Inputs are NHWC float RGB, already normalised with the ImageNet mean/std (as in the TF-Hub
collection's SavedModels); :mod:`convnext_keras.preprocess` does the normalisation.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Sequence

import keras
import numpy as np

from convnext_keras import registry
from convnext_keras.nets.layers import (
    DepthwiseConv2D,
    GlobalResponseNormalization,
    LayerScale,
    MinimumInputSize,
    StochasticDepth,
    gelu,
)

HEADS = ("classifier", "pooled", "pyramid", "dense", "all")
#: ``precision=`` / ``--precision`` values -> Keras dtype policies.  ``bf16`` / ``fp16`` are
#: Keras mixed precision: float32 weights (so checkpoints load unchanged), bfloat16 / float16
#: compute, float32 logits and features.
PRECISIONS = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
#: The CPU engines' opt-in int8 precision (:mod:`convnext_keras.engines.quantization`): not a Keras
#: dtype policy, but a ``precision=`` value predict / eval / bench accept.
INT8 = "int8"
#: Layers that compute in float32 under every policy (:func:`build_model` pins them), so that
#: pooled features and logits come out in float32 (the input-size check computes nothing).
FLOAT32_LAYERS = frozenset({"input_size_check", "head_norm", "head_fc"})
#: Names of the pyramid outputs; strides 4, 8, 16, 32.
PYRAMID_OUTPUTS = ("stage1", "stage2", "stage3", "stage4")

# torch.nn.init.trunc_normal_(std=.02) in the original truncates at +-2 *absolute*, i.e. it is a
# plain normal with std 0.02.  Keras' TruncatedNormal cuts at 2 standard deviations, which
# shrinks the std by this factor; dividing by it gives std 0.02 with bounded tails.
_TRUNCATED_STD_FACTOR = 0.8796256610342398


def policy_name(precision: str) -> str:
    """The Keras dtype policy of a :data:`PRECISIONS` key; ``ValueError`` for anything else."""
    if precision == INT8:
        raise ValueError(
            f"precision {INT8!r} is not a Keras dtype policy but the onnxruntime engine's opt-in "
            "path: build or load the model in fp32 and pass precision='int8' to predict_files / "
            "evaluate / tasks.bench.benchmark or engines.runners.OnnxRunner "
            "(CLI: --precision int8)."
        )
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    return PRECISIONS[precision]


def non_float32_layer(model) -> tuple[str, str] | None:
    """``(layer name, compute dtype)`` of the first layer of ``model`` (or the model itself)
    that does not compute in float32, else None.  Checks every layer, not only the model's own
    policy: a model copied with another policy (``predict.with_precision``) keeps a float32
    model policy over mixed-precision layers."""
    for layer in [model, *model.layers]:
        compute = getattr(layer.dtype_policy, "compute_dtype", "float32")
        if compute != "float32":
            return layer.name, compute
    return None


def precision_of(model) -> str:
    """The :data:`PRECISIONS` key ``model`` computes in (from its weight-carrying layers other
    than :data:`FLOAT32_LAYERS`), or the compute dtype itself when it is none of them."""
    by_compute = {keras.DTypePolicy(p).compute_dtype: k for k, p in PRECISIONS.items()}
    for layer in model.layers:
        if layer.weights and layer.name not in FLOAT32_LAYERS:
            compute = layer.dtype_policy.compute_dtype
            return by_compute.get(compute, compute)
    return "fp32"


@contextlib.contextmanager
def dtype_policy(precision: str):
    """Build layers under ``precision``'s Keras dtype policy (a :data:`PRECISIONS` key), then
    restore the global policy that was set before."""
    policy = policy_name(precision)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


#: True while :func:`build_for_loading` builds: kernels start as zeros instead of draws.
_UNDRAWN = contextvars.ContextVar("convnext_keras_undrawn_kernels", default=False)


class _Undrawn(keras.initializers.Zeros):
    """Marks a kernel :func:`build_for_loading` leaves undrawn (replaced before it returns)."""


def _truncated_normal():
    return keras.initializers.TruncatedNormal(
        stddev=registry.KERNEL_INIT_STD / _TRUNCATED_STD_FACTOR
    )


def _kernel_init():
    if _UNDRAWN.get():
        return _Undrawn()
    return _truncated_normal()


def _numpy_truncated_normal(shape, stddev: float, mean: float, rng) -> np.ndarray:
    """Keras' ``TruncatedNormal``: normal draws, those beyond 2 standard deviations redrawn."""
    x = rng.standard_normal(shape)
    outside = np.abs(x) > 2.0
    while outside.any():
        x[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(x) > 2.0
    return x * stddev + mean


@contextlib.contextmanager
def kernels_drawn_in_numpy():
    """Build layers whose truncated-normal kernels are drawn in numpy instead of by Keras.

    Keras' initialisers compile a random op per kernel shape on JAX: the first build of a new
    architecture spends tens of seconds there (ConvNeXt-atto: 40 s of a loaded 2-core machine;
    then 0.2 s).  Inside the block kernels start as zeros (as in :func:`build_for_loading`);
    the block yields ``draw(layers)``, which gives those layers their truncated-normal
    initialiser back and draws their kernels from it in numpy (same distribution; seeded from
    numpy's global generator, which ``keras.utils.set_random_seed`` seeds).  Inside
    :func:`build_for_loading` (weights assigned right after) nothing is drawn.

        with kernels_drawn_in_numpy() as draw:
            model = build_model("atto")
        draw(model.layers)
    """
    outer = _UNDRAWN.get()
    token = _UNDRAWN.set(True)

    def draw(layers) -> None:
        rng = np.random.default_rng(np.random.randint(0, 2**31 - 1))
        for layer in layers:
            for attr in ("kernel_initializer", "depthwise_initializer"):
                if not isinstance(getattr(layer, attr, None), _Undrawn):
                    continue
                init = _truncated_normal()
                setattr(layer, attr, init)
                if not outer:
                    kernel = layer.kernel
                    values = _numpy_truncated_normal(
                        tuple(kernel.shape), init.stddev, init.mean, rng
                    )
                    kernel.assign(values.astype(kernel.dtype))

    try:
        yield draw
    finally:
        _UNDRAWN.reset(token)


def build_for_loading(variant, *, builder=None, **kwargs) -> keras.Model:
    """:func:`build_model` for a model whose weights are all assigned right after (what
    ``load_model`` does with a checkpoint): kernels start as zeros instead of truncated-normal
    draws, which cost seconds per model on JAX and PyTorch (ConvNeXt V2-atto: 10 s of its
    14 s build on JAX; ConvNeXt V2-B: 15 s on PyTorch).  The layers keep the truncated normal
    as their initialiser (their config, a clone, and :func:`draw_kernel` use it).  ``builder``:
    another function building on this module's layers (default :func:`build_model`; e.g.
    :func:`convnext_keras.nets.upernet.build_upernet`)."""
    token = _UNDRAWN.set(True)
    try:
        model = (builder or build_model)(variant, **kwargs)
    finally:
        _UNDRAWN.reset(token)
    for layer in model.layers:
        for attr in ("kernel_initializer", "depthwise_initializer"):
            if isinstance(getattr(layer, attr, None), _Undrawn):
                setattr(layer, attr, _truncated_normal())
    return model


def draw_kernel(layer, scale: float = 1.0) -> None:
    """(Re)initialise a Dense layer as :func:`build_model` does: kernel from its initialiser
    (times ``scale``), bias zero."""
    kernel = layer.kernel_initializer(tuple(layer.kernel.shape), dtype=layer.kernel.dtype)
    layer.kernel.assign(kernel * scale)
    layer.bias.assign(keras.ops.zeros(tuple(layer.bias.shape), dtype=layer.bias.dtype))


def _norm(name):
    return keras.layers.LayerNormalization(epsilon=registry.LAYER_NORM_EPSILON, name=name)


def _block(x, dim, prefix, drop_path, layer_scale_init, grn=False):
    """One ConvNeXt block: ``x + drop_path(scale(pwconv2(grn(gelu(pwconv1(LN(dwconv(x))))))))``.

    ConvNeXt: no GRN, per-channel layer scale; ConvNeXt V2: GRN after the GELU, no layer scale
    (``layer_scale_init`` None)."""
    shortcut = x
    x = DepthwiseConv2D(
        registry.DWCONV_KERNEL,
        padding="same",
        depthwise_initializer=_kernel_init(),
        bias_initializer="zeros",
        name=f"{prefix}_dwconv",
    )(x)
    x = _norm(f"{prefix}_norm")(x)
    # Exact (erf) GELU, as torch.nn.GELU's default (see layers.gelu for the JAX form).
    x = keras.layers.Dense(
        registry.MLP_RATIO * dim,
        activation=gelu,
        kernel_initializer=_kernel_init(),
        name=f"{prefix}_pwconv1",
    )(x)
    if grn:
        x = GlobalResponseNormalization(registry.GRN_EPSILON, name=f"{prefix}_grn")(x)
    x = keras.layers.Dense(dim, kernel_initializer=_kernel_init(), name=f"{prefix}_pwconv2")(x)
    if layer_scale_init is not None and layer_scale_init > 0:
        x = LayerScale(layer_scale_init, name=f"{prefix}_layer_scale")(x)
    if drop_path > 0:
        x = StochasticDepth(drop_path, name=f"{prefix}_drop_path")(x)
    return keras.layers.Add(name=f"{prefix}_add")([shortcut, x])


def check_head(variant: str | registry.Variant, head: str) -> None:
    """``ValueError`` for a head the variant cannot have (not in :data:`HEADS`; a pyramid of an
    isotropic ConvNeXt, which has one stage)."""
    spec = registry.variant(variant)
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}.")
    if head == "pyramid" and spec.isotropic:
        raise ValueError(
            f"{spec.title} has no feature pyramid: it is one stage at stride "
            f"{spec.patch_size} without downsampling. Use the features 'dense' (its "
            f"{spec.num_features}-channel map at stride {spec.patch_size}, layer-normalised), "
            "'pooled', 'classifier' or 'all' (which holds the stage output as 'stage1')."
        )


def build_model(
    variant: str | registry.Variant = "tiny",
    *,
    num_classes: int = registry.NUM_CLASSES_1K,
    head: str = "classifier",
    input_shape: tuple = (None, None, 3),
    drop_path_rate: float = 0.0,
    layer_scale_init: float | None = registry.LAYER_SCALE_INIT,
    name: str | None = None,
    stage_norms: bool | Sequence[int] = False,
) -> keras.Model:
    """Build a randomly initialised ConvNeXt (V1 or V2: the variant's block type decides).

    Args:
        variant: a registry key (``"tiny"``, ``"convnextv2_tiny"``, ... see
            ``registry.VARIANTS``), an architecture name (``"convnextv2_tiny"``) or a
            ``Variant``.
        num_classes: size of the classification head (``head="classifier"`` only).
        head: ``"classifier"`` (logits), ``"pooled"`` (features after the head LayerNorm, as
            the TF-Hub ``_fe`` models), ``"pyramid"`` (dict of the 4 stage outputs,
            strides 4/8/16/32; not for an isotropic ConvNeXt, which has one stage),
            ``"dense"`` (the head LayerNorm applied at every position of the last stage:
            ``(batch, H/32, W/32, C)``, isotropic ``H/16``; DINOv3's normalised patch
            features) or ``"all"`` (dict of logits, pooled features and every stage output
            in one pass; what Grad-CAM and multi-task users need).
        input_shape: NHWC shape without the batch axis; ``(None, None, 3)`` takes any size
            from ``spec.min_input_size`` (32; isotropic 16) up: a smaller image is refused
            with a ``ValueError`` (an assertion error inside a TensorFlow graph), never NaN.
        drop_path_rate: stochastic-depth rate of the last block; rates rise linearly from 0.
        layer_scale_init: initial layer-scale value of ConvNeXt blocks; ``None`` or 0
            disables layer scale.  ConvNeXt V2 blocks (GRN) and the isotropic small/base
            (``"plain"`` blocks) have none: another value than the default raises
            ``ValueError`` for them.
        name: model name (default the architecture name, ``convnext_tiny`` /
            ``convnextv2_tiny``).
        stage_norms: ``head="pyramid"`` only: a LayerNorm on each stage output
            (``stage{i}_output_norm``), as the backbone of the official segmentation models
            (facebookresearch/ConvNeXt ``semantic_segmentation/backbone/convnext.py``,
            ``norm0`` ... ``norm3``) has; or the indices of the stages that have one (a
            transformers ``ConvNextBackbone`` normalises only its ``out_features``).

    Logits and pooled features are float32 under any mixed-precision policy; pyramid outputs
    keep the compute dtype.
    """
    spec = registry.variant(variant)
    grn = spec.block == "grn"
    if spec.block != "layer_scale":
        if layer_scale_init not in (None, 0, registry.LAYER_SCALE_INIT):
            what = "use Global Response Normalization" if grn else "were trained without it"
            raise ValueError(
                f"{spec.title} blocks {what} and have no layer scale; drop "
                f"layer_scale_init={layer_scale_init!r}."
            )
        layer_scale_init = None
    check_head(spec, head)
    if head == "classifier" and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}.")
    if stage_norms is True:
        normed = set(range(len(spec.depths)))
    else:
        normed = set(stage_norms or ())
    if normed and head != "pyramid":
        raise ValueError(f"stage_norms={stage_norms!r} needs head='pyramid', got head={head!r}.")
    if not normed <= set(range(len(spec.depths))):
        raise ValueError(
            f"stage_norms: {spec.title} has stages 0..{len(spec.depths) - 1}, got {sorted(normed)}."
        )
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise ValueError(f"input_shape must be (height, width, 3) NHWC RGB, got {input_shape}.")

    rates = np.linspace(0.0, drop_path_rate, spec.num_blocks).tolist()
    inputs = keras.Input(shape=input_shape, name="images")
    # Every spatial layer is pinned to NHWC: the network is the same whatever the global
    # keras.config.image_data_format() (channels_first) says.
    x = MinimumInputSize(spec.min_input_size, dtype="float32", name="input_size_check")(inputs)
    x = keras.layers.Conv2D(
        spec.dims[0],
        spec.patch_size,
        strides=spec.patch_size,
        kernel_initializer=_kernel_init(),
        data_format="channels_last",
        name="stem_conv",
    )(x)
    if spec.stem_norm:
        x = _norm("stem_norm")(x)
    stage_outputs = {}
    block_index = 0
    for stage, (depth, dim) in enumerate(zip(spec.depths, spec.dims)):
        if stage > 0:
            x = _norm(f"stage{stage}_downsample_norm")(x)
            x = keras.layers.Conv2D(
                dim,
                registry.DOWNSAMPLE_STRIDE,
                strides=registry.DOWNSAMPLE_STRIDE,
                kernel_initializer=_kernel_init(),
                data_format="channels_last",
                name=f"stage{stage}_downsample_conv",
            )(x)
        for b in range(depth):
            x = _block(x, dim, f"stage{stage}_block{b}", rates[block_index], layer_scale_init, grn)
            block_index += 1
        stage_outputs[PYRAMID_OUTPUTS[stage]] = (
            _norm(f"stage{stage}_output_norm")(x) if stage in normed else x
        )

    model_name = name or spec.arch_name
    if head == "pyramid":
        return keras.Model(inputs, stage_outputs, name=model_name)
    head_norm = keras.layers.LayerNormalization(
        epsilon=registry.LAYER_NORM_EPSILON, dtype="float32", name="head_norm"
    )
    if head == "dense":
        # One LayerNorm for the pooled vector and every position, as DINOv3 normalises its
        # "[CLS]" (pooled) and patch tokens together (dinov3 models/convnext.py).
        return keras.Model(inputs, head_norm(x), name=model_name)
    x = keras.layers.GlobalAveragePooling2D(data_format="channels_last", name="head_pool")(x)
    pooled = head_norm(x)
    if head == "pooled":
        return keras.Model(inputs, pooled, name=model_name)
    logits = keras.layers.Dense(
        num_classes, kernel_initializer=_kernel_init(), dtype="float32", name="head_fc"
    )(pooled)
    if head == "all":
        return keras.Model(
            inputs, {"logits": logits, "pooled": pooled, **stage_outputs}, name=model_name
        )
    return keras.Model(inputs, logits, name=model_name)


def layer_names(variant: str | registry.Variant) -> dict[str, list[str]]:
    """The weight-carrying layer names of a variant, grouped by part of the network.

    Returns ``{"stem": [...], "stage0": [...], ..., "stage3": [...], "head": [...]}``; each
    stage lists its downsampling layers (stages 1-3) then its blocks' layers in order.
    """
    spec = registry.variant(variant)
    groups = {"stem": ["stem_conv", "stem_norm"] if spec.stem_norm else ["stem_conv"]}
    for stage, depth in enumerate(spec.depths):
        names = []
        if stage > 0:
            names += [f"stage{stage}_downsample_norm", f"stage{stage}_downsample_conv"]
        for b in range(depth):
            p = f"stage{stage}_block{b}"
            names += [f"{p}_dwconv", f"{p}_norm", f"{p}_pwconv1"]
            if spec.block == "grn":
                names.append(f"{p}_grn")
            names.append(f"{p}_pwconv2")
            if spec.block == "layer_scale":
                names.append(f"{p}_layer_scale")
        groups[f"stage{stage}"] = names
    groups["head"] = ["head_norm", "head_fc"]
    return groups


def variant_of(model: keras.Model) -> registry.Variant | None:
    """The registry variant a built ConvNeXt model has, read off its layers (None if none).

    A ConvNeXt built without layer scale (``layer_scale_init=None``) is its variant too."""
    depths, dims = {}, {}
    found = {"grn": False, "layer_scale": False}
    patch = None
    for layer in model.layers:
        if layer.name == "stem_conv":
            patch = int(layer.kernel.shape[0])
        m = re.fullmatch(r"stage\d_block\d+_(grn|layer_scale)", layer.name)
        if m:
            found[m.group(1)] = True
        m = re.fullmatch(r"stage(\d)_block(\d+)_dwconv", layer.name)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            depths[stage] = max(depths.get(stage, 0), block + 1)
            dims[stage] = int(layer.kernel.shape[2])
    stages = range(max(depths) + 1) if depths else range(0)
    shape = (tuple(depths.get(i, 0) for i in stages), tuple(dims.get(i, 0) for i in stages))
    block_type = "grn" if found["grn"] else "layer_scale" if found["layer_scale"] else "plain"
    # A ConvNeXt built without layer scale is its layer-scale variant (no other fits).
    blocks = {"plain": ("plain", "layer_scale")}.get(block_type, (block_type,))
    for wanted in blocks:
        for spec in registry.VARIANTS.values():
            if (spec.depths, spec.dims) == shape and spec.block == wanted:
                if patch in (None, spec.patch_size):
                    return spec
    return None
