"""What a command checks before a backend loads: names, paths, flags, extras, the weights.

Importing TensorFlow takes 5-30 s; a typo should not wait for it.  Each command calls these
small checks first, in the order a user reads the command line, and imports its task (and with
it Keras and the backend) only after they pass.  Every check is Keras-free: the registry, the
api's name and weights checks, the weights store and ``importlib.util.find_spec`` for the
optional extras (:func:`convnext_keras.errors.check_installed`).  Each raises the library's own
one-line error (``ValueError``, ``FileNotFoundError``, ``DownloadError``...), which the command
line's error boundary prints with exit status 2.
"""

from __future__ import annotations

from pathlib import Path

from convnext_keras import registry
from convnext_keras.errors import check_installed

#: ``--resolution``'s rule, for the help of every command that takes it.
RESOLUTION_RULE = (
    f"at least {min(v.min_input_size for v in registry.VARIANTS.values() if not v.isotropic)}"
    f" pixels ({min(v.min_input_size for v in registry.VARIANTS.values() if v.isotropic)} for "
    "the isotropic ConvNeXts: the network's total stride)"
)


def is_keras_file(model: str) -> bool:
    return str(model).endswith(".keras")


def model_name(name: str, *, keras_file: bool = False) -> registry.ResolvedName | None:
    """``name`` resolved in the registry (``UnknownModelError`` with the close names), or - where
    the command takes one (``keras_file``) - a ``.keras`` file, which must exist (None)."""
    if keras_file and is_keras_file(name):
        if not Path(name).expanduser().is_file():
            raise FileNotFoundError(f"No such model file: {name}")
        return None
    return registry.resolve(name)


def classifier(name: str) -> None:
    """A classifier name (``predict``, ``eval``) or an existing ``.keras`` file."""
    from convnext_keras import api

    if not is_keras_file(name):  # the row's own error: a typo's hint among classifiers alone
        api.classifier_row(name)
    model_name(name, keras_file=True)


def segmentation(name: str) -> None:
    """A segmentation name (``segment``, ``eval-seg``) or an existing ``.keras`` file."""
    from convnext_keras import api

    if not is_keras_file(name):  # the row's own error: a typo's hint among segmenters alone
        api.segmentation_row(name)
    model_name(name, keras_file=True)


def detection(name: str) -> None:
    """A detection name (``detect``, ``eval-det``) or an existing ``.keras`` file."""
    from convnext_keras import api

    if not is_keras_file(name):  # the row's own error: a typo's hint among detectors alone
        api.detection_row(name)
    model_name(name, keras_file=True)


def images(paths) -> None:
    """At least one of the image ``paths`` exists (the missing ones of a batch are reported
    per file later, the others still answered); ``FileNotFoundError`` naming the first when
    none does."""
    paths = [Path(p) for p in paths]
    if paths and not any(p.exists() for p in paths):
        more = f" (nor do the other {len(paths) - 1})" if len(paths) > 1 else ""
        raise FileNotFoundError(f"No such image file: {paths[0]}{more}.")


def folder(path, what: str) -> None:
    """``path`` is an existing folder (``what`` names it: "image folder")."""
    path = Path(path).expanduser()
    if not path.is_dir():
        problem = "is a file, not a folder" if path.is_file() else "does not exist"
        raise FileNotFoundError(f"The {what} {path} {problem}.")


def resolution(name: str | None, value: int | None) -> None:
    """``--resolution`` at least the model's smallest input (32; isotropic 16)."""
    if value is None:
        return
    spec = registry.resolve(name).variant if name and not is_keras_file(name) else None
    smallest = spec.min_input_size if spec else registry.MIN_INPUT_SIZE
    if value < smallest:
        whose = f"{name}'s" if spec else "the"
        raise ValueError(
            f"--resolution {value} is below {whose} smallest input, {smallest} pixels (the "
            "network's total stride); give --resolution "
            f"{smallest} or more."
        )


def engine_flags(precision: str | None, engine: str = "auto", calibration=None) -> None:
    """``--precision`` / ``--engine`` / ``--calibration`` together, and the extras they need:
    int8 runs on onnxruntime only and calibrates on ``--calibration`` or scikit-image's
    sample photos; ``--engine openvino`` / ``onnxruntime`` need theirs."""
    if calibration is not None and precision != "int8":
        raise ValueError(
            "--calibration is for --precision int8 (got --precision "
            f"{precision or 'fp32'}); add --precision int8 or leave --calibration out."
        )
    if precision == "int8":
        if engine not in ("auto", "onnxruntime"):
            raise ValueError(
                "--precision int8 runs on the onnxruntime engine only (static int8 quantization "
                f"of this library's ONNX graph), not {engine!r}; use --engine auto or onnxruntime."
            )
        for module in ("onnxruntime", "onnx"):
            check_installed(module, extra="int8", purpose="--precision int8")
        if calibration is None:
            check_installed(
                "skimage",
                extra="int8",
                purpose="--precision int8 on the default calibration photos",
                alternative="or --calibration DIR with photos like the ones you will classify",
            )
    if engine == "onnxruntime":
        for module in ("onnxruntime", "onnx"):
            check_installed(module, extra="export", purpose="--engine onnxruntime")
    if engine == "openvino":
        for module in ("openvino", "onnx"):
            check_installed(
                module,
                extra="openvino",
                purpose="--engine openvino",
                alternative="--engine auto uses onnxruntime or Keras without it",
            )


def cam(cam_dir) -> None:
    """``--cam`` draws with matplotlib's colour maps."""
    if cam_dir is not None:
        check_installed("matplotlib", extra="viz", purpose="--cam (Grad-CAM pictures)")


def weights(name: str, value, *, hub: bool = True) -> None:
    """``--weights`` for model ``name``: ``official`` needs a name with an official checkpoint,
    a path must exist, an ``hf://`` address must parse (:func:`convnext_keras.api.check_weights`);
    then the official file of a name that is not cached yet is fetched now - downloaded,
    verified, converted and cached - so that an unreachable server or a mirror without the
    file is said at once, not after the backend has loaded (the load then reads the cache)."""
    if is_keras_file(name):
        return
    from convnext_keras import api
    from convnext_keras.weights import store

    row = api.check_weights(name, value, hub=hub)
    if row is not None and not store.is_cached(row):
        store.official_weights(row)
