"""The TensorFlow-backend child processes: export under JAX or PyTorch, and the TF-Hub
fine-tuning check.

SavedModel, TFLite (and tf2onnx) need the TensorFlow backend; under another backend
:func:`_export_via_tensorflow` saves the model as a ``.keras`` file with the outputs of the
caller's own model on a reference input, and runs ``python -m
convnext_keras.export.child export REQUEST.json``: the child exports with
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
from pathlib import Path

import numpy as np

from convnext_keras.export import verify
from convnext_keras.export.planning import ExportError, ExportResult, VerificationError, _Plan
from convnext_keras.weights.cache import temporary_dir

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
    with temporary_dir(path) as d:
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
                "convnext_keras.export.child",
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
        [sys.executable, "-m", "convnext_keras.export.child", "hub-check", *args],
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
