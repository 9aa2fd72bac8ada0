"""Verifying an export: reload it with the runtime a user would load it with
(``tf.saved_model.load`` and its ``serving_default`` signature, onnxruntime, the TFLite
interpreter, ``keras.saving.load_model``) and compare its outputs with the Keras model's.

``_RUNNERS`` maps each format to its loader; :func:`_verify` runs it on every verification
input and raises :class:`~convnext_keras.export.planning.VerificationError` past the tolerance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from convnext_keras.export.planning import INPUT_NAME, ExportError, VerificationError, _Plan

# ----------------------------------------------------------------------------------------------
# The Keras model's outputs, and how far an export's are from them


def _keras_outputs(model, x, names) -> dict[str, np.ndarray]:
    import keras

    out = model(x, training=False)
    if not isinstance(out, dict):
        out = {names[0]: out}
    return {k: np.asarray(keras.ops.convert_to_numpy(v)) for k, v in out.items()}


def _max_diff(got: dict, expected: dict) -> float:
    if set(got) != set(expected):
        raise ExportError(f"Export outputs {sorted(got)} instead of {sorted(expected)}.")
    worst = 0.0
    for k, v in expected.items():
        g = np.asarray(got[k])
        if g.shape != v.shape:
            raise ExportError(f"Export output {k!r} has shape {g.shape}, expected {v.shape}.")
        worst = max(worst, float(np.max(np.abs(g.astype(np.float64) - v.astype(np.float64)))))
    return worst


# ----------------------------------------------------------------------------------------------
# Loaders used for verification: each yields (loader description, input index, {name: array})


def _run_savedmodel(path: Path, plan: _Plan, inputs):
    import tensorflow as tf

    obj = tf.saved_model.load(str(path))
    signature = obj.signatures["serving_default"]
    if plan.detection:  # {"images", "image_sizes", "scale_factors"} -> the model's dict
        for i, x in enumerate(inputs):
            feed = {k: tf.constant(v) for k, v in x.items()}
            yield "tf.saved_model.load(path)(inputs)", i, dict(obj(feed, training=False))
            yield "serving_default signature", i, signature(**feed)
        return
    for i, x in enumerate(inputs):
        out = obj(tf.constant(x), training=False)
        out = dict(out) if isinstance(out, dict) else {plan.outputs[0]: out}
        yield "tf.saved_model.load(path)(images)", i, out
        yield "serving_default signature", i, signature(**{INPUT_NAME: tf.constant(x)})


def _run_onnx(path: Path, plan: _Plan, inputs):
    from convnext_keras.errors import require

    ort = require("onnxruntime", extra="export", purpose="ONNX export's verification")
    # A graph saved with external data (NAME.onnx.data) is read from beside ``path``.
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    for i, x in enumerate(inputs):
        yield "onnxruntime", i, dict(zip(names, session.run(None, {INPUT_NAME: x})))


def _tflite_interpreter(path: Path):
    import tensorflow as tf

    if hasattr(tf, "lite") and hasattr(tf.lite, "Interpreter"):
        import warnings

        with warnings.catch_warnings():  # "deprecated, use ai_edge_litert": still works
            warnings.simplefilter("ignore", UserWarning)
            return tf.lite.Interpreter(model_path=str(path))
    from ai_edge_litert.interpreter import Interpreter  # TensorFlow without tf.lite

    return Interpreter(model_path=str(path))


def _run_tflite(path: Path, plan: _Plan, inputs):
    runner = _tflite_interpreter(path).get_signature_runner()
    for i, x in enumerate(inputs):
        yield "TFLite interpreter", i, runner(**{INPUT_NAME: x})


def _run_keras(path: Path, plan: _Plan, inputs):
    import keras

    from convnext_keras.nets import layers  # noqa: F401  (registers LayerScale / StochasticDepth)

    if plan.detection:  # registers the detector's layers
        from convnext_keras.nets.detection import layers as _detection  # noqa: F401

    reloaded = keras.saving.load_model(str(path), compile=False)
    for i, x in enumerate(inputs):
        yield "keras.saving.load_model(path)", i, _keras_outputs(reloaded, x, plan.outputs)


_RUNNERS = {
    "savedmodel": _run_savedmodel,
    "onnx": _run_onnx,
    "tflite": _run_tflite,
    "keras": _run_keras,
}


def _compare(what: str, got: dict, expected: dict, x, tolerance: float) -> tuple:
    got = {k: np.asarray(v) for k, v in got.items()}
    diff = _max_diff(got, expected)
    if isinstance(x, dict):  # a detector's inputs: the images tell the size
        x = x[INPUT_NAME]
    line = f"{what} on {x.dtype.name}{list(x.shape)}: max |diff| = {diff:.3g}"
    if not diff <= tolerance:  # `not <=` also catches NaN
        raise VerificationError(
            f"{line} > tolerance {tolerance:g}; the export was discarded, nothing was written.",
            diff,
            tolerance,
        )
    return diff, line


def _verify(path: Path, plan: _Plan, inputs, expected, tolerance: float) -> tuple[float, list]:
    worst, checks = 0.0, []
    for what, i, got in _RUNNERS[plan.fmt](path, plan, inputs):
        diff, line = _compare(what, got, expected[i], inputs[i], tolerance)
        worst, checks = max(worst, diff), checks + [line]
    return worst, checks
