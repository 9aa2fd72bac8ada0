"""The TensorFlow-backend child processes: export under JAX or PyTorch, and the TF-Hub
fine-tuning check.

SavedModel, TFLite (and tf2onnx) need the TensorFlow backend; under another backend
:func:`_export_via_tensorflow` saves the model as a ``.keras`` file with the outputs of the
caller's own model on a reference input, and runs ``python -m
convnext_keras.export.tf_subprocess export REQUEST.json``: the child exports with
:func:`convnext_keras.export.exporter.export`, first checking that the model it reloaded gives
those outputs.  :func:`hub_finetune_check` runs one ``hub.KerasLayer(trainable=True)``
fine-tuning step in a tf-keras child (``... hub-check``).  Each child prints one JSON reply.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from convnext_keras.export import verify
from convnext_keras.export.planning import ExportError, ExportResult, VerificationError, _Plan

# ----------------------------------------------------------------------------------------------
# Other backends: export in a TensorFlow-backend subprocess

_RESULT_MARK = "CONVNEXT_EXPORT_RESULT "
_ERRORS = {
    "VerificationError": VerificationError,
    "ExportError": ExportError,
    "ValueError": ValueError,
    "FileExistsError": FileExistsError,
    "FileNotFoundError": FileNotFoundError,
}
#: The child reports a failed write as ``WriteError`` with its errno; the parent re-raises it.


def _tensorflow_env() -> dict:
    env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _parse_child(proc: subprocess.CompletedProcess, what: str) -> dict:
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_MARK):
            return json.loads(line[len(_RESULT_MARK) :])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    raise ExportError(f"{what} failed (exit status {proc.returncode}):\n{tail}")


def _export_via_tensorflow(model, path: Path, plan: _Plan, overwrite: bool, source) -> ExportResult:
    import importlib.util

    import keras

    backend = keras.backend.backend()
    try:
        has_tensorflow = importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):
        has_tensorflow = False
    if not has_tensorflow:
        raise ExportError(
            f"{plan.fmt} export needs TensorFlow, which is not installed here (Keras backend: "
            f"{backend}). Install it (pip install tensorflow-cpu) or export to .keras "
            "(format='keras') and convert on a machine with TensorFlow."
        )
    rng = np.random.default_rng(plan.seed + 1)
    x = rng.standard_normal((1, plan.image_size, plan.image_size, 3)).astype("float32")
    expected = verify._keras_outputs(model, x, plan.outputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.", suffix=".part") as d:
        d = Path(d)
        model.save(d / "model.keras")
        np.savez(d / "reference.npz", x=x, **expected)
        request = {
            "model": str(d / "model.keras"),
            "reference": str(d / "reference.npz"),
            "backend": backend,
            "path": str(path),
            "format": plan.fmt,
            "image_size": plan.image_size,
            "dynamic_size": plan.dynamic_size,
            "include_preprocessing": plan.preprocessing,
            "overwrite": overwrite,
            "verify_batch": plan.verify_batch,
            "seed": plan.seed,
            "source": source,
        }
        (d / "request.json").write_text(json.dumps(request))
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "convnext_keras.export.tf_subprocess",
                "export",
                str(d / "request.json"),
            ],
            env=_tensorflow_env(),
            capture_output=True,
            text=True,
        )
    reply = _parse_child(proc, f"{plan.fmt} export in a TensorFlow subprocess")
    if reply.get("error") == "WriteError":
        from convnext_keras.errors import WriteError

        raise WriteError(reply["errno"], path, "the export")
    if "error" in reply:
        cls = _ERRORS.get(reply["error"], ExportError)
        if cls is VerificationError:
            raise VerificationError(reply["message"], reply["max_abs_diff"], reply["tolerance"])
        raise cls(reply["message"])
    return ExportResult.from_dict(reply)


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


def hub_finetune_check(
    path: str | os.PathLike, *, num_classes: int = 3, batch: int = 2, seed: int = 0
) -> dict:
    """Fine-tune a SavedModel export one step the TF-Hub way and report what happened.

    Runs, in a subprocess with ``TF_USE_LEGACY_KERAS=1`` (tf-keras, as TF-Hub requires):
    ``hub.KerasLayer(path, trainable=True)`` + a new ``Dense(num_classes)`` head, one
    ``GradientTape`` SGD step on random images.  Needs the ``export`` extra (tensorflow-hub,
    tf-keras).

    Returns a dict: ``backbone_variables`` (trainable variables of the hub layer),
    ``none_gradients`` / ``zero_gradients`` (backbone variables whose gradient is None / all
    zero), ``changed`` (backbone variables the step changed), ``regularization_losses``,
    ``loss``, ``output_shape`` and ``warnings`` (log lines about variables or checkpoints).
    """
    env = _tensorflow_env()
    env["TF_USE_LEGACY_KERAS"] = "1"
    env["TF_CPP_MIN_LOG_LEVEL"] = "1"  # keep TensorFlow's warnings: the check looks at them
    args = [str(path), str(num_classes), str(batch), str(seed)]
    proc = subprocess.run(
        [sys.executable, "-m", "convnext_keras.export.tf_subprocess", "hub-check", *args],
        env=env,
        capture_output=True,
        text=True,
    )
    reply = _parse_child(proc, "hub.KerasLayer fine-tuning check")
    if "error" in reply:
        raise ExportError(f"hub.KerasLayer fine-tuning check failed: {reply['message']}")
    suspicious = ("variable", "checkpoint", "unresolved", "not found", "zero trainable")
    # absl INFO lines ("I0000 00:00:... port.cc:153] oneDNN ... environment variable ...") are
    # start-up notes that TensorFlow >= 2.16 prints whatever TF_CPP_MIN_LOG_LEVEL says.
    info = re.compile(r"I\d{4} [\d:.]+ +\d+ \S+:\d+\] ")
    reply["warnings"] += [
        line
        for line in proc.stderr.splitlines()
        if any(word in line.lower() for word in suspicious) and not info.match(line)
    ]
    return reply


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
    """``python -m convnext_keras.export.tf_subprocess export REQUEST.json``, or
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
    from convnext_keras.export.tf_subprocess import _main as main

    sys.exit(main(sys.argv[1:]))
