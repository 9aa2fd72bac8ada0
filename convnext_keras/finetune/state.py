"""Crash-safe training state: one safetensors file, replaced atomically, verified on load.

The file holds every variable a run needs to continue bit-for-bit: the model's (weights and
stochastic-depth seed-generator states), the optimizer's (step counter, Adam moments, EMA,
gradient accumulators, loss scale) and the running train metrics of the current epoch, plus a
JSON header with the data position (epoch, batch), the recipe, the classes and the history.

It is written to a temporary file beside the destination and renamed over it only when
complete (:func:`convnext_keras.weights.cache.atomic_path`), so a ``kill -9`` at any moment
leaves the previous complete state in place; temporary files are never read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import keras
import numpy as np

from convnext_keras.weights.cache import atomic_path

FORMAT = 1
_META_KEY = "convnext_keras.finetune"


class StateError(ValueError):
    """A training-state file that cannot be resumed from; the message says why."""


def _numpy(variable) -> np.ndarray:
    return np.array(keras.ops.convert_to_numpy(variable))


def collect(model: keras.Model, optimizer, metrics: bool = True) -> dict[str, np.ndarray]:
    """Host copies of the model, optimizer and (optionally) metric variables."""
    if hasattr(model, "jax_state_sync"):
        # Inside fit() the JAX trainer keeps the state outside the variables until synced.
        model.jax_state_sync()
    arrays = {f"model/{i}": _numpy(v) for i, v in enumerate(model.variables)}
    arrays.update({f"optimizer/{i}": _numpy(v) for i, v in enumerate(optimizer.variables)})
    if metrics:
        arrays.update({f"metrics/{i}": _numpy(v) for i, v in enumerate(model.metrics_variables)})
    return arrays


def non_finite(arrays: dict[str, np.ndarray]) -> list[str]:
    """Names of floating-point arrays holding NaN or inf."""
    return [
        k
        for k, a in arrays.items()
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a))
    ]


def save(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write the state atomically (temp file beside ``path``, then rename): the bytes of
    ``safetensors.numpy.save`` through the library's writer (``save_file`` would stage them in a
    temporary file of its own naming, which a ``kill -9`` would leave in the run folder)."""
    from safetensors.numpy import save as serialize

    header = {"format": FORMAT, **meta}
    data = serialize(
        # (np.ascontiguousarray would turn 0-d scalars such as the step counter into 1-d)
        {k: np.array(a, order="C", copy=True) for k, a in arrays.items()},
        metadata={_META_KEY: json.dumps(header)},
    )
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(data)


def read_meta(path: Path) -> dict | None:
    """The JSON header of a state file (cheap: the tensors are not read); None if unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = (f.metadata() or {}).get(_META_KEY)
        return json.loads(meta) if meta else None
    except Exception:
        return None


def load(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Arrays and header of a state file, or :class:`StateError` naming what is wrong."""
    from safetensors.numpy import load_file

    path = Path(path)
    meta = read_meta(path)
    if meta is None:
        raise StateError(
            f"{path} is not a readable fine-tuning state (damaged or not written by "
            "convnext finetune). Start a new run with another --out."
        )
    if meta.get("format") != FORMAT:
        raise StateError(
            f"{path} has state format {meta.get('format')}; this version reads format {FORMAT}."
        )
    return load_file(str(path)), meta


_NUMBERED = re.compile(r"^(seed_generator)_\d+(?=/|$)")


def variable_paths(model: keras.Model) -> list[str]:
    """The model's variable paths, with Keras' per-process seed-generator numbers removed."""
    return [_NUMBERED.sub(r"\1", v.path) for v in model.variables]


def restore(model: keras.Model, optimizer, arrays: dict, meta: dict, source: Path) -> list:
    """Assign saved model and optimizer variables; returns the saved metric values."""
    paths = variable_paths(model)
    saved_paths = meta.get("model_paths", [])
    if saved_paths != paths:
        first = next(
            (i for i, (a, b) in enumerate(zip(saved_paths, paths)) if a != b),
            min(len(saved_paths), len(paths)),
        )
        raise StateError(
            f"{source} was written for a different model: {len(saved_paths)} variables vs "
            f"{len(paths)} here, first difference at #{first} "
            f"({saved_paths[first] if first < len(saved_paths) else '-'} vs "
            f"{paths[first] if first < len(paths) else '-'}); resume with the run's own settings."
        )
    groups = (("model", model.variables), ("optimizer", optimizer.variables))
    for prefix, variables in groups:
        saved = sorted(
            (k for k in arrays if k.startswith(prefix + "/")), key=lambda k: int(k.split("/")[1])
        )
        if len(saved) != len(variables):
            raise StateError(
                f"{source} holds {len(saved)} {prefix} variables, the run has {len(variables)}; "
                "resume with the run's own settings (precision, EMA, accumulation)."
            )
        for key, v in zip(saved, variables):
            if tuple(arrays[key].shape) != tuple(v.shape):
                raise StateError(
                    f"{source}: {prefix} variable {key} has shape {arrays[key].shape}, the run "
                    f"expects {tuple(v.shape)}."
                )
            v.assign(arrays[key])
    metric_keys = sorted(
        (k for k in arrays if k.startswith("metrics/")), key=lambda k: int(k.split("/")[1])
    )
    return [arrays[k] for k in metric_keys]
