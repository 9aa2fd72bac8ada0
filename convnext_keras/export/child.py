"""The child side of :mod:`.tf_subprocess`: what ``python -m convnext_keras.export.child`` runs
in a TensorFlow-backend process - ``export REQUEST.json`` (the export and its verification
against the caller's reference outputs) or ``hub-check PATH N BATCH SEED`` (a TF-Hub fine-tuning
check) - printing one result line the parent reads.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from convnext_keras.export.planning import ExportError, VerificationError
from convnext_keras.export.tf_subprocess import _RESULT_MARK


def _child_export(request_file: str) -> dict:
    import keras

    from convnext_keras.export import exporter
    from convnext_keras.nets import layers  # noqa: F401

    req = json.loads(Path(request_file).read_text())
    ref = np.load(req["reference"])
    expected = {k: ref[k] for k in ref.files if k != "x"}
    expected["backend"] = req["backend"]
    model = keras.saving.load_model(req["model"], compile=False)
    result = exporter.export(
        model,
        req["path"],
        req["format"],
        image_size=req["image_size"],
        dynamic_size=req["dynamic_size"],
        include_preprocessing=req["include_preprocessing"],
        overwrite=req["overwrite"],
        verify_batch=req["verify_batch"],
        seed=req["seed"],
        _transfer=(ref["x"], expected),
        _source=req["source"],
    )
    return result.to_dict()


# ----------------------------------------------------------------------------------------------
# TF-Hub fine-tuning check (tf-keras, in a subprocess)


def _child_hub_check(path: str, num_classes: int, batch: int, seed: int) -> dict:
    import warnings

    import tensorflow as tf
    import tensorflow_hub as hub
    import tf_keras

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer = hub.KerasLayer(path, trainable=True)
        meta = json.loads(tf.saved_model.load(path).metadata().numpy().decode())
        shape = meta["input"]["shape"][1:]
        size = meta["input"]["resolution"]
        shape = [size if d is None else d for d in shape]
        model = tf_keras.Sequential(
            [tf_keras.Input(shape, dtype=meta["input"]["dtype"]), layer]
            + [tf_keras.layers.Dense(num_classes)]
        )
        rng = np.random.default_rng(seed)
        if meta["input"]["dtype"] == "uint8":
            x = rng.integers(0, 256, (batch, *shape)).astype("uint8")
        else:
            x = rng.standard_normal((batch, *shape)).astype("float32")
        y = np.arange(batch) % num_classes
        loss_fn = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        backbone = list(layer.trainable_weights)
        before = [v.numpy().copy() for v in backbone]
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = loss_fn(y, logits) + tf.add_n([0.0] + list(model.losses))
        grads = tape.gradient(loss, model.trainable_weights)
        tf_keras.optimizers.SGD(0.1).apply_gradients(zip(grads, model.trainable_weights))
        backbone_grads = grads[: len(backbone)]
    return {
        "backbone_variables": len(backbone),
        "none_gradients": sum(g is None for g in backbone_grads),
        "zero_gradients": sum(g is not None and not np.any(g.numpy()) for g in backbone_grads),
        "changed": sum(not np.array_equal(b, v.numpy()) for b, v in zip(before, backbone)),
        "regularization_losses": len(model.losses),
        "loss": float(loss),
        "output_shape": list(logits.shape),
        "warnings": [str(w.message) for w in caught if "variable" in str(w.message).lower()],
    }


def _main(argv: list[str]) -> int:
    """``python -m convnext_keras.export.child export REQUEST.json``, or
    ``... hub-check PATH N BATCH SEED``."""
    command, *args = argv
    try:
        if command == "export":
            reply = _child_export(*args)
        elif command == "hub-check":
            path, classes, batch, seed = args
            reply = _child_hub_check(path, int(classes), int(batch), int(seed))
        else:
            raise ValueError(f"unknown command {command!r}")
    except (ExportError, ValueError, OSError) as e:
        from convnext_keras.errors import WriteError

        reply = {"error": type(e).__name__, "message": str(e)}
        if isinstance(e, VerificationError):
            reply.update(max_abs_diff=e.max_abs_diff, tolerance=e.tolerance)
        if isinstance(e, WriteError):
            reply["errno"] = e.errno
    print(_RESULT_MARK + json.dumps(reply), flush=True)
    return 1 if "error" in reply else 0


if __name__ == "__main__":
    # Run the package's copy of this module, so its exception classes are the ones raised.
    from convnext_keras.export.child import _main as main

    sys.exit(main(sys.argv[1:]))
