"""Opt-in int8: onnxruntime's static post-training quantization of the float graph.


Opt-in int8 (``OnnxRunner(model, precision="int8")``, ``--precision int8``): the same float
graph quantized by onnxruntime's own static post-training quantizer (:func:`quantize_int8`):
int8 weights per output channel and uint8 activations with ranges calibrated on real photos
through the official transform, for the matrix products only (stem, downsampling and every
block's two pointwise layers); LayerNorm, GELU, the depthwise convolution and the head stay
float32.  How close it stays to float32 on a model that learned something, and how much faster
it is, is measured in BENCHMARKS.md.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from convnext_keras.engines.onnx_graph import (
    build_onnx_graph,
    check_input_size,
    save_graph,
    unsupported_reason,
)
from convnext_keras.errors import missing_dependency, require
from convnext_keras.interface import fix
from convnext_keras.nets.convnext import INT8, variant_of

#: What the onnxruntime engine computes in.
PRECISIONS = ("fp32", INT8)

#: At most this many calibration photos are read (evenly spaced over the files given).
MAX_CALIBRATION_IMAGES = 64
#: Images per calibration call (onnxruntime keeps every intermediate tensor of a call).
_CALIBRATION_BATCH = 4
#: Real photos that ship inside scikit-image and scikit-learn (public domain / CC0, see
#: examples/images/README.md): the default calibration set.
_SAMPLE_PHOTOS = {
    ("skimage", "data"): (
        "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
        "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "camera.png", "brick.png",
        "grass.png", "gravel.png",
    ),
    ("sklearn", "datasets/images"): ("china.jpg", "flower.jpg"),
}  # fmt: skip


def sample_photos() -> list[Path]:
    """The real photos shipped inside scikit-image and scikit-learn, where those are installed
    (found without importing them): the default int8 calibration set."""
    import importlib.util

    found = []
    for (package, folder), names in _SAMPLE_PHOTOS.items():
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(list(spec.submodule_search_locations)[0]) / folder
        found += [root / name for name in names if (root / name).is_file()]
    return found


def calibration_files(source=None) -> list[Path]:
    """The image files int8 calibration reads.

    ``source``: None (:func:`sample_photos`), a folder (its image files, sub-folders included,
    sorted; hidden files and files whose extension Pillow does not know are left out), one
    image file, or a list of files.  Raises ``ValueError`` when that gives no image, and
    ``FileNotFoundError`` for a path that does not exist.
    """
    from PIL import Image

    from convnext_keras.data import files as files_lib

    if source is None:
        files = sample_photos()
        if not files:
            raise missing_dependency(
                "skimage",
                extra="int8",
                purpose="int8 calibration on the default sample photos",
                alternative=f"or pass {fix('calibration=FOLDER', '--calibration DIR')} with "
                "photos like the ones you will classify",
            )
        return files
    paths = [Path(source)] if isinstance(source, (str, os.PathLike)) else [Path(p) for p in source]
    known = set(Image.registered_extensions())
    files = []
    for path in paths:
        if path.is_dir():  # each real folder once; FIFOs and other non-files left out
            found = files_lib.image_files(path, suffixes={k.lower() for k in known}).files
            files += sorted(found, key=lambda p: p.relative_to(path).as_posix())
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"No such calibration image or folder: {path}")
    if not files:
        raise ValueError(
            f"No image files in {', '.join(map(str, paths)) or 'the empty list'}; int8 "
            "calibration needs photos like the ones you will classify."
        )
    return files


def calibration_images(
    source=None, config="convnext_tiny_1k_224", *, limit: int = MAX_CALIBRATION_IMAGES
) -> np.ndarray:
    """Calibration photos through the official evaluation transform: ``(n, res, res, 3)``
    float32, normalised as the model takes them.

    ``source``: see :func:`calibration_files`; ``config``: the transform's settings (a model
    name or a :class:`convnext_keras.preprocess.PreprocessConfig`); at most ``limit`` files,
    evenly spaced over the list.  An unreadable file raises
    :class:`convnext_keras.preprocess.ImageError` (a ``ValueError`` naming it).
    """
    from convnext_keras import preprocess

    if not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}.")
    files = calibration_files(source)
    if len(files) > limit:
        files = [files[i] for i in np.linspace(0, len(files) - 1, limit).round().astype(int)]
    config = preprocess.as_config(config)
    return np.stack([preprocess.transform_file(f, config) for f in files])


def as_calibration(images) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(images), dtype=np.float32)
    if x.ndim != 4 or x.shape[-1] != 3 or len(x) == 0:
        raise ValueError(
            "calibration must be preprocessed images (n, height, width, 3) as the model takes "
            "them (quantization.calibration_images(files, config) makes them), got shape "
            f"{x.shape}."
        )
    if not np.isfinite(x).all():
        raise ValueError("calibration images contain NaN or infinite values.")
    return x


def cpu_has_vnni() -> bool:
    """Whether the CPU has 8-bit dot-product instructions (AVX512-VNNI or AVX-VNNI), from
    ``/proc/cpuinfo``; False where that cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_vnni", "avx_vnni"})
    except OSError:
        pass
    return False


def quantize_int8(model, calibration, *, reduce_range: bool | None = None):
    """The model's float graph (:func:`build_onnx_graph`, dynamic height/width) quantized to
    int8 by onnxruntime's static post-training quantizer (``onnxruntime.quantization``).

    * What is quantized: the matrix products with constant weights - the stem and downsampling
      patch products and every block's two pointwise layers, about 97 % of ConvNeXt-T's
      FLOPs - as QuantizeLinear/DequantizeLinear pairs that onnxruntime runs as integer
      products (``MatMulIntegerToFloat``).  Weights: int8, one scale per output channel (symmetric);
      activations: uint8 with a scale and zero point per tensor from the min/max over the
      calibration images; each product's output stays float32.
    * What stays float32: LayerNorm, GELU, the depthwise 7x7 convolution, the residual adds
      and the head (pooling, its LayerNorm and the classifier).
    * ``reduce_range`` (7-bit weights) is onnxruntime's advice for x86 CPUs without VNNI, whose
      8-bit multiply-adds can saturate; default: on exactly when :func:`cpu_has_vnni` is False.

    Args:
        model: a float32 classifier or pooled-feature ConvNeXt (see :func:`unsupported_reason`).
        calibration: real images, preprocessed as the model takes them, ``(n, h, w, 3)``
            float32 (:func:`calibration_images`); their size need not be the one run later.

    Returns the quantized ``onnx.ModelProto``; its ``metadata_props`` record the settings.
    """
    onnx = require("onnx", extra="int8", purpose="The int8 precision")
    q = require("onnxruntime.quantization", extra="int8", purpose="The int8 precision")

    reason = unsupported_reason(model)
    if reason:
        raise ValueError(f"Cannot quantize {model.name!r}: {reason}.")
    images = as_calibration(calibration)
    check_input_size(variant_of(model), images.shape[1], images.shape[2])
    if reduce_range is None:
        reduce_range = not cpu_has_vnni()

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self._batches = iter(
                {"images": images[i : i + _CALIBRATION_BATCH]}
                for i in range(0, len(images), _CALIBRATION_BATCH)
            )

        def get_next(self):
            return next(self._batches, None)

    with tempfile.TemporaryDirectory(prefix="convnext_int8_") as tmp:
        source, prepared, out = (Path(tmp, n) for n in ("float.onnx", "pre.onnx", "int8.onnx"))
        # A graph over protobuf's 2 GiB (ConvNeXt V2-H) goes through with external data.
        external = len(save_graph(build_onnx_graph(model, None, None), source)) > 1
        q.quant_pre_process(  # as onnxruntime advises
            source, prepared, skip_symbolic_shape=True, save_as_external_data=external
        )
        graph = onnx.load(prepared, load_external_data=False)
        head = [n.name for n in graph.graph.node if n.name.startswith("head")]
        q.quantize_static(
            prepared,
            out,
            Reader(),
            quant_format=q.QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8,
            nodes_to_exclude=head,
            calibrate_method=q.CalibrationMethod.MinMax,
            use_external_data_format=external,
            extra_options={
                "MatMulConstBOnly": True,
                "OpTypesToExcludeOutputQuantization": ["MatMul"],
            },
        )
        quantized = onnx.load(out)
    onnx.helper.set_model_props(
        quantized,
        {
            "convnext_keras.precision": INT8,
            "convnext_keras.calibration_images": str(len(images)),
            "convnext_keras.calibration_size": f"{images.shape[1]}x{images.shape[2]}",
            "convnext_keras.reduce_range": str(bool(reduce_range)),
        },
    )
    return quantized
