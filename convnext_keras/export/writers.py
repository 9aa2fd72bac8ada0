"""Writing an export in each format: the Keras model that is exported, a SavedModel (with its
TF-Hub reusable object and metadata), ONNX (this library's graph of a ConvNeXt or UperNet, or
tf2onnx) and TFLite; a ``.keras`` export is Keras' own ``model.save``.  TensorFlow is imported
only inside the writers that need it.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from convnext_keras import registry
from convnext_keras.errors import check_installed, require
from convnext_keras.export import planning
from convnext_keras.export.planning import INPUT_NAME, _Plan

#: ONNX opset the export targets.
ONNX_OPSET = 17
#: Where a SavedModel export keeps its human-readable metadata (TF Serving ignores the folder).
METADATA_FILE = "assets.extra/convnext_keras.json"


# ----------------------------------------------------------------------------------------------
# The Keras model that is exported


def _with_preprocessing(model, plan: _Plan):
    """uint8 RGB images of any size -> the official eval resize/crop + normalisation -> model.

    The preprocessing is :class:`convnext_keras.preprocess.EvalPreprocessing` (Keras ops,
    antialiased resize; close to, not bit-equal with, the PIL pipeline).
    """
    import keras

    from convnext_keras import preprocess

    inputs = keras.Input((None, None, 3), dtype="uint8", name=INPUT_NAME)
    x = preprocess.preprocessing_layer(plan.transform, name="preprocess")(inputs)
    return keras.Model(inputs, model(x), name=model.name)


# ----------------------------------------------------------------------------------------------
# Writers (TensorFlow backend)


def _tensor_spec(plan: _Plan):
    """The input's ``tf.TensorSpec``; a detector's: a dict of its three
    (:data:`~convnext_keras.export.planning.DETECTION_INPUTS`)."""
    import tensorflow as tf

    if plan.detection:
        images, sizes, scales = planning.DETECTION_INPUTS
        return {
            images: tf.TensorSpec((None, None, None, 3), tf.float32, name=images),
            sizes: tf.TensorSpec((None, 2), tf.int32, name=sizes),
            scales: tf.TensorSpec((None, 2), tf.float32, name=scales),
        }
    return tf.TensorSpec(plan.input_shape, tf.as_dtype(plan.input_dtype), name=INPUT_NAME)


def _describe_weights(name: str, weights) -> str:
    """Provenance of a named model's weights, for the metadata and model cards."""
    if weights is None:
        return "random initialisation"
    if isinstance(weights, str) and weights == "official":
        ckpt = registry.resolve(name).checkpoint
        return ckpt.url if ckpt else "official"
    return str(Path(weights).expanduser())


def _metadata(model, plan: _Plan, source: str | None) -> dict:
    import keras

    from convnext_keras import __version__

    try:
        resolved = registry.resolve(model.name)
    except registry.UnknownModelError:
        resolved = None
    ckpt = resolved.checkpoint if resolved else None
    # A model name the registry does not know is a ConvNeXt built by this library (the only
    # models exported); its family defaults to ConvNeXt's.  A checkpoint's own family (DINOv3,
    # timm) comes before its architecture's.
    family_name = ckpt.family if ckpt else resolved.variant.family if resolved else "convnext"
    family = registry.FAMILIES[family_name]
    task = "segmentation" if planning._segmentation(model) else "classification"
    detection = ckpt.detection if ckpt else None
    if plan.detection:
        task = "detection"
    return {
        "model": model.name,
        "outputs": plan.outputs,
        "input": {
            "name": INPUT_NAME,
            "dtype": plan.input_dtype,
            "shape": list(plan.input_shape),
            "layout": "NHWC",
            "channels": "RGB",
            "resolution": plan.image_size,
            "contract": plan.contract(),
            "mean": list(registry.IMAGENET_MEAN),
            "std": list(registry.IMAGENET_STD),
            "preprocessing_included": plan.preprocessing,
        },
        "dataset": ckpt.dataset if ckpt else None,
        "reported_acc1": ckpt.reported_acc1 if ckpt else None,
        "task": task,
        "reported_miou": ckpt.segmentation.reported_miou if ckpt and ckpt.segmentation else None,
        "reported_box_ap": detection.reported_box_ap if detection else None,
        "reported_mask_ap": detection.reported_mask_ap if detection else None,
        "weights": source,
        "family": family.name,
        # The official weights' licence (None: other weights, whose licence is their owner's).
        "licence": ckpt.licence if ckpt and source == ckpt.url else None,
        "references": [family.paper, family.original],
        "convnext_keras": __version__,
        "keras": keras.__version__,
    }


def _save_context(options):
    """Trace inside TensorFlow's save context, so that saving reuses the traces.

    ``tf.saved_model.save`` retraces every function traced outside it (the variable policy is
    part of the trace key), which doubles the export time of a ConvNeXt.  The context manager
    is TensorFlow-internal; without it the export is the same, only slower.
    """
    try:
        from tensorflow.python.saved_model import save_context

        return save_context.save_context(options)
    except (ImportError, AttributeError):
        return contextlib.nullcontext()


def _write_savedmodel(model, path: Path, plan: _Plan, metadata: dict) -> None:
    """A reusable SavedModel (TF Hub) with a ``serving_default`` signature (TF Serving).

    The root object is tracked with TensorFlow's AutoTrackable, as Keras' own ExportArchive
    does, so the Keras variables are saved once and shared by every function:

    * ``__call__(images, training=False)``: traced for both values of ``training``, returns
      the output tensor; what ``hub.KerasLayer(path, trainable=True)`` calls.
    * ``variables`` / ``trainable_variables`` / ``regularization_losses`` (none: ConvNeXt is
      trained with weight decay in the optimiser, not with regularisation losses).
    * ``serving_default``: ``images`` -> ``{"logits"|"features": ...}``.
    * ``metadata()``: the input contract and provenance as a JSON string.

    A detector (``plan.detection``): ``__call__(inputs, training=False)`` takes the dict
    ``{"images", "image_sizes", "scale_factors"}`` and returns the model's dict; its
    ``serving_default`` takes the three as named inputs, ``images`` (B, H, W, 3) float32,
    ``image_sizes`` (B, 2) int32, ``scale_factors`` (B, 2) float32, and returns ``boxes``,
    ``scores``, ``labels``, ``masks`` and ``num_detections``.
    """
    import tensorflow as tf

    if plan.detection:
        return _write_detector_savedmodel(model, path, plan, metadata)
    spec = _tensor_spec(plan)
    names = plan.outputs
    root = tf.__internal__.tracking.AutoTrackable()
    root.variables = list(model.variables)
    root.trainable_variables = list(model.trainable_variables)
    root.non_trainable_variables = list(model.non_trainable_variables)
    root.regularization_losses = []

    def call(images, training=False):
        return model(images, training=training)

    def serve(images):
        out = root.__call__(images, training=False)
        return dict(out) if isinstance(out, dict) else {names[0]: out}

    root.__call__ = tf.function(call, autograph=False)
    root.serve = tf.function(serve, input_signature=[spec], autograph=False)
    text = json.dumps(metadata, indent=2)
    root.metadata = tf.function(lambda: tf.constant(text), input_signature=[])
    options = tf.saved_model.SaveOptions()
    with _save_context(options):
        for training in (False, True):
            root.__call__.get_concrete_function(spec, training=training)
        root.serve.get_concrete_function()
    tf.saved_model.save(
        root, str(path), signatures={"serving_default": root.serve}, options=options
    )
    extra = path / METADATA_FILE
    extra.parent.mkdir(parents=True, exist_ok=True)
    extra.write_text(text + "\n")


def _write_detector_savedmodel(model, path: Path, plan: _Plan, metadata: dict) -> None:
    """:func:`_write_savedmodel` for a detector: three inputs, a dict of five outputs."""
    import tensorflow as tf

    specs = _tensor_spec(plan)
    root = tf.__internal__.tracking.AutoTrackable()
    root.variables = list(model.variables)
    root.trainable_variables = list(model.trainable_variables)
    root.non_trainable_variables = list(model.non_trainable_variables)
    root.regularization_losses = []

    def call(inputs, training=False):
        return dict(model(dict(inputs), training=training))

    def serve(images, image_sizes, scale_factors):
        inputs = dict(zip(planning.DETECTION_INPUTS, (images, image_sizes, scale_factors)))
        return root.__call__(inputs, training=False)

    root.__call__ = tf.function(call, autograph=False)
    root.serve = tf.function(
        serve, input_signature=[specs[k] for k in planning.DETECTION_INPUTS], autograph=False
    )
    text = json.dumps(metadata, indent=2)
    root.metadata = tf.function(lambda: tf.constant(text), input_signature=[])
    options = tf.saved_model.SaveOptions()
    with _save_context(options):
        root.__call__.get_concrete_function(specs, training=False)
        root.serve.get_concrete_function()
    tf.saved_model.save(
        root, str(path), signatures={"serving_default": root.serve}, options=options
    )
    extra = path / METADATA_FILE
    extra.parent.mkdir(parents=True, exist_ok=True)
    extra.write_text(text + "\n")


def _named(model, plan: _Plan):
    """The model with a named input and a dict of named outputs (names survive ONNX/TFLite)."""
    import keras

    if isinstance(model.output, dict):
        return model
    inputs = keras.Input(plan.input_shape[1:], dtype=plan.input_dtype, name=INPUT_NAME)
    return keras.Model(inputs, {plan.outputs[0]: model(inputs)}, name=model.name)


def _register_onnx_erfc() -> None:
    """Teach tf2onnx TensorFlow's ``Erfc`` (exact GELU uses it): ``erfc(x) = 1 - erf(x)``.

    tf2onnx 1.17 converts ``Erf`` but not ``Erfc``; this registers the missing handler through
    tf2onnx's own ``tf_op`` extension decorator (once per process).
    """
    require("tf2onnx", extra="export", purpose="ONNX export of a model with layers of its own")
    from tf2onnx import handler, utils

    if "Erfc" in handler.tf_op.get_opsets().get("", [{}])[-1]:
        return

    @handler.tf_op("Erfc")
    class _Erfc:
        @classmethod
        def version_9(cls, ctx, node, **kwargs):
            dtype = ctx.get_dtype(node.input[0])
            one = ctx.make_const(
                utils.make_name("erfc_one"), np.ones((), utils.map_onnx_to_numpy_type(dtype))
            )
            node.type = "Erf"
            sub = ctx.insert_new_node_on_output(
                "Sub",
                node.output[0],
                name=utils.make_name(node.name),
                inputs=[one.output[0], node.output[0]],
            )
            ctx.copy_shape(node.output[0], sub.output[0])
            ctx.set_dtype(sub.output[0], dtype)

    handler.tf_op._MAPPING = None  # rebuild the cached op mapping with the new handler


def _write_onnx(model, path: Path, plan: _Plan) -> None:
    import logging
    import warnings

    _register_onnx_erfc()
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():  # Keras' numpy-2 shim for tf2onnx touches np.object
        warnings.simplefilter("ignore", FutureWarning)
        _named(model, plan).export(
            str(path),
            format="onnx",
            verbose=False,
            input_signature=[_tensor_spec(plan)],
            opset_version=ONNX_OPSET,
        )


def _onnx_graph_builder(model):
    """The function writing ``model``'s ONNX graph from its weights (a ConvNeXt:
    :func:`onnx_graph.build_onnx_graph`; a UperNet: :func:`upernet_graph.build_onnx_graph`), or
    None for a model with layers of its own (tf2onnx then)."""
    from convnext_keras.engines import onnx_graph, upernet_graph

    if planning._segmentation(model):
        return (
            upernet_graph.build_onnx_graph if not upernet_graph.unsupported_reason(model) else None
        )
    if onnx_graph.graph_unsupported_reason(model) is None:
        return onnx_graph.build_onnx_graph
    return None


def _write_onnx_graph(model, path: Path, plan: _Plan) -> None:
    """The ONNX graph built from the weights
    (:func:`convnext_keras.engines.onnx_graph.build_onnx_graph`): the same operators the CPU engine
    runs, opset ``ONNX_OPSET``, dynamic batch.  Over protobuf's 2 GiB (ConvNeXt V2-H) the graph
    is written in ONNX's external-data format: ``NAME.onnx`` and its weights in
    ``NAME.onnx.data`` beside it (:func:`convnext_keras.engines.onnx_graph.save_graph`)."""
    from convnext_keras.engines.onnx_graph import save_graph
    from convnext_keras.nets.convnext import variant_of

    onnx = require("onnx", extra="export", purpose="ONNX export")

    side = None if plan.dynamic_size else plan.image_size
    build = _onnx_graph_builder(model)
    proto = build(model, side, side, opset=ONNX_OPSET, output_names=plan.outputs)
    props = {"convnext_keras.nets.convnext": model.name, "convnext_keras.input": plan.contract()}
    # A dynamic-size graph cannot refuse small images itself (ONNX has no assertion): say it.
    props["convnext_keras.min_input_size"] = str(variant_of(model).min_input_size)
    onnx.helper.set_model_props(proto, props)
    save_graph(proto, path)


#: What each format needs beyond Keras and TensorFlow: ``[(module, extra, what needs it)]``.
_NEEDS = {
    "onnx": [
        ("onnx", "export", "ONNX export"),
        ("onnxruntime", "export", "ONNX export's verification"),
    ],
}


def check_dependencies(fmt: str, *, check_hub: bool = False) -> None:
    """:class:`convnext_keras.errors.MissingDependencyError` (one line naming the extra) when
    what format ``fmt`` needs is not installed - found before any model is loaded;
    ``check_hub``: also tensorflow_hub and tf_keras (the TF-Hub fine-tuning check)."""
    needs = list(_NEEDS.get(fmt, []))
    if check_hub and fmt == "savedmodel":
        needs += [
            ("tensorflow_hub", "export", "--check-hub"),
            ("tf_keras", "export", "--check-hub"),
        ]
    for module, extra, purpose in needs:
        check_installed(module, extra=extra, purpose=purpose)


def _write_tflite(model, path: Path, plan: _Plan) -> None:
    _named(model, plan).export(
        str(path), format="litert", verbose=False, input_signature=[_tensor_spec(plan)]
    )
