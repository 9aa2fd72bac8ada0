"""The CPU engines that run this library's graph: onnxruntime and OpenVINO, and the choice
between them and Keras (:func:`inference_function`).

On the CPUs this project measures on, onnxruntime (MLAS kernels, NCHWc convolutions) runs the
ConvNeXt forward pass faster than Keras' ``predict_on_batch`` on any of the three backends (see
BENCHMARKS.md).  :class:`OnnxRunner` runs :func:`.onnx_graph.build_onnx_graph`'s graph of a built
Keras ConvNeXt (classifier and ``_fe`` models): one graph per input height/width (any batch
size), built once and cached; in int8 on request (:mod:`.quantization`).  The tasks run a
registry name's graph from the graph cache instead, without Keras
(:mod:`convnext_keras.tasks.graph_route`, :mod:`.graph_files`).

The same float32 graph also runs on OpenVINO's CPU plugin (:class:`OpenVinoRunner`, engine
``"openvino"``), compiled with float32 inference precision (OpenVINO would otherwise compute in
bfloat16 on CPUs with ``avx512_bf16`` or AMX).  Where OpenVINO is installed (a base dependency
wherever it has wheels) the ``"auto"`` engine picks it on a CPU: on the AVX-512 CPU
measured (AMD EPYC family 25 model 17) it ran ConvNeXt-T 1.05-1.15x faster than onnxruntime on
either graph at batch 1, 8 and 32, and on the AVX2-only one (family 23 model 1) level with it
(BENCHMARKS.md).

Weights are copied when a runner is made: a runner made before training or a
``load_weights`` call still holds the old weights (make a new one).
"""

from __future__ import annotations

import logging
import threading
import weakref

import numpy as np

from convnext_keras.engines import graph_files
from convnext_keras.engines.onnx_graph import (
    GraphFiles,
    build_onnx_graph,
    check_input_size,
    unsupported_reason,
)
from convnext_keras.engines.quantization import (
    PRECISIONS,
    as_calibration,
    calibration_files,
    calibration_images,
    quantize_int8,
)
from convnext_keras.errors import installed, missing_dependency, plain, require
from convnext_keras.nets.convnext import INT8, variant_of
from convnext_keras.nets.layers import too_small_message

logger = logging.getLogger("convnext_keras")

ENGINES = ("auto", "openvino", "onnxruntime", "keras")
#: Engines that run this library's ONNX graph on the CPU, in the order ``"auto"`` tries them.
GRAPH_ENGINES = graph_files.GRAPH_ENGINES
# Which engines are installed, and which "auto" runs: the light module's (no Keras), named here
# too.  This module calls them through ``graph_files`` (where tests replace them).
onnxruntime_available = graph_files.onnxruntime_available
openvino_available = graph_files.openvino_available
cpu_graph_engine = graph_files.cpu_graph_engine
import_openvino = graph_files.import_openvino


def check_onnxruntime(purpose: str, extra: str = "int8") -> None:
    """:class:`convnext_keras.errors.MissingDependencyError` (one line: ``pip install
    "convnext-keras[int8]"``) unless onnxruntime and onnx are installed; ``purpose`` names what
    needs them."""
    if not graph_files.onnxruntime_available():
        raise missing_dependency("onnxruntime", extra=extra, purpose=purpose)
    if not installed("onnx"):
        raise missing_dependency("onnx", extra=extra, purpose=purpose)


def check_openvino() -> None:
    """:class:`convnext_keras.errors.MissingDependencyError` (one line naming the ``openvino``
    extra) unless OpenVINO is installed."""
    if not graph_files.openvino_available():
        raise missing_dependency(
            "openvino",
            extra="openvino",
            purpose="The openvino engine",
            alternative="engine 'auto' uses onnxruntime without it",
        )


def onnx_session(graph, threads: int | None = None, *, threshold: int | None = None):
    """An onnxruntime CPU session of ``graph`` (an ``onnx.ModelProto`` or its bytes) with the
    engine's settings (:func:`convnext_keras.engines.graph_files.onnx_session`).

    A graph whose weights pass ``threshold`` bytes (default
    :data:`.onnx_graph.EXTERNAL_DATA_THRESHOLD`, protobuf's 2 GiB) is loaded from a temporary
    file with external data (:class:`.onnx_graph.GraphFiles`), kept as long as the session."""
    require("onnxruntime", extra="int8", purpose="The onnxruntime engine")
    files = GraphFiles(graph, threshold)
    try:
        session = graph_files.onnx_session(files.source, threads)
    except BaseException:
        files.close()
        raise
    if files.external:
        session.graph_files = files  # the data file lives as long as the session
        weakref.finalize(session, files.close)
    return session


def nhwc_batch(images, min_size: int) -> np.ndarray:
    """``images`` as the contiguous float32 NHWC batch an onnxruntime session takes.

    Raises ``ValueError`` for another shape than ``(batch, height, width, 3)`` or a height or
    width below ``min_size`` pixels."""
    x = graph_files.nhwc_images(images)
    if min(x.shape[1:3]) < min_size:
        raise ValueError(too_small_message(x.shape[1], x.shape[2], min_size))
    return x


class _GraphRunner:
    """What the graph engines' runners share: input checks, and the way back to Keras.

    ``fallback``: None (an engine failure raises), or the Keras function to run instead when
    the engine cannot run the model (:func:`inference_function` sets it for ``engine="auto"``):
    the first failure is said in one line (``convnext_keras`` logger, a warning) and every
    later call goes to Keras.  Bad inputs (a wrong shape, an image too small) raise either way.
    """

    #: The engine's name (``"onnxruntime"``, ``"openvino"``).
    engine = ""
    fallback = None
    #: Why the engine gave way to Keras (None while it runs the model).
    fell_back: str | None = None

    def _run(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, images) -> np.ndarray:
        x = nhwc_batch(images, self.min_size)
        if self.fell_back is None:
            try:
                return self._run(x)
            except Exception as e:
                if self.fallback is None:
                    raise
                first = (plain(str(e)).strip().splitlines() or [""])[0][:200]
                self.fell_back = f"{type(e).__name__}: {first}" if first else type(e).__name__
                logger.warning(
                    f"convnext_keras: the {self.engine} engine cannot run {self.model.name} "
                    f"({self.fell_back}); running it on Keras instead."
                )
        return np.asarray(self.fallback(x))

    predict_on_batch = __call__


class OnnxRunner(_GraphRunner):
    """Inference of a float32 ConvNeXt Keras model with onnxruntime (CPU), in float32 or int8.

    ``runner(images)`` takes an NHWC float batch (numpy or anything ``np.asarray`` accepts)
    and returns a numpy array: logits for a classifier, pooled features for an ``_fe`` model -
    the same as ``model.predict_on_batch(images)`` (in int8: close to it, see
    :func:`quantize_int8`).

    Args:
        model: a classifier or pooled-feature model from :func:`convnext_keras.load_model` or
            :func:`convnext_keras.build_model`, in float32.
        threads: onnxruntime intra-op threads (default: onnxruntime's, one per physical core;
            ``$CONVNEXT_THREADS`` overrides).
        precision: ``"fp32"`` (default) or ``"int8"`` (opt-in static quantization; the graph is
            quantized once, on the first call, and serves every input size).
        calibration: int8 only: the real images whose activation ranges set the quantization,
            preprocessed as the model takes them, ``(n, height, width, 3)`` float32 (see
            :func:`calibration_images`); default: the sample photos of scikit-image and
            scikit-learn through the official 224 transform.

    Raises ``ValueError`` for models it cannot run (:func:`unsupported_reason`) and a
    ``precision`` other than ``"fp32"``/``"int8"``,
    :class:`convnext_keras.errors.MissingDependencyError` (an ``ImportError``) without
    onnxruntime.  A graph over protobuf's 2 GiB (ConvNeXt V2-H) is loaded with external data
    (:func:`onnx_session`).
    """

    engine = "onnxruntime"

    def __init__(
        self,
        model,
        *,
        threads: int | None = None,
        precision: str = "fp32",
        calibration=None,
    ):
        if precision not in PRECISIONS:
            raise ValueError(
                f"The onnxruntime engine computes in {' or '.join(PRECISIONS)}, got precision "
                f"{precision!r} (bf16 / fp16 run on Keras: load_model(..., precision=...))."
            )
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"OnnxRunner cannot run {model.name!r}: {reason}.")
        check_onnxruntime(
            "The int8 precision" if precision == INT8 else "The onnxruntime engine",
            "int8" if precision == INT8 else "export",
        )
        self.model = model
        self.min_size = variant_of(model).min_input_size
        self.precision = precision
        self.threads = graph_files.threads_setting(threads)
        self.calibration = None
        if precision == INT8:
            self.calibration = (
                calibration_images() if calibration is None else as_calibration(calibration)
            )
        #: The int8 graph's quantization settings (``quantize_int8``'s metadata), once made.
        self.quantization: dict[str, str] | None = None
        self._sessions = {}
        self._lock = threading.Lock()

    def session(self, height: int, width: int):
        """The onnxruntime session for inputs of this size (built once, then cached)."""
        key = (int(height), int(width))
        with self._lock:
            if self.precision == INT8:
                # One quantized graph with a dynamic height/width serves every size.
                check_input_size(variant_of(self.model), *key)
                key = None
            if key not in self._sessions:
                if key is None:
                    graph = quantize_int8(self.model, self.calibration)
                    self.quantization = {p.key: p.value for p in graph.metadata_props}
                else:
                    graph = build_onnx_graph(self.model, *key)
                self._sessions[key] = onnx_session(graph, self.threads)
            return self._sessions[key]

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session(x.shape[1], x.shape[2]).run(None, {"images": x})[0]


class OpenVinoRunner(_GraphRunner):
    """Inference of a float32 ConvNeXt Keras model with OpenVINO's CPU plugin.

    ``runner(images)`` takes an NHWC float batch and returns a numpy array: logits for a
    classifier, pooled features for an ``_fe`` model - the same as
    ``model.predict_on_batch(images)`` in float32.  It compiles this library's ONNX graph
    (:func:`build_onnx_graph`, the one :class:`OnnxRunner` runs) once per input shape (batch,
    height, width: a static shape ran 5-10 % faster than a dynamic batch on the CPU measured;
    a new shape costs about 0.2 s), with ``INFERENCE_PRECISION_HINT`` f32 (no silent bfloat16
    on CPUs that have it), the latency hint and ``threads`` inference threads (default:
    OpenVINO's, one per physical core; ``$CONVNEXT_THREADS`` overrides).  Calls are serialised
    (one infer request per compiled graph) and every output is copied out of OpenVINO's
    buffers.

    A graph over protobuf's 2 GiB (ConvNeXt V2-H) is read from a temporary file with external
    data (:class:`.onnx_graph.GraphFiles`).

    Raises ``ValueError`` for models it cannot run (:func:`unsupported_reason`),
    :class:`convnext_keras.errors.MissingDependencyError` (an ``ImportError``) without OpenVINO
    (``pip install "convnext-keras[openvino]"``).
    """

    engine = "openvino"

    #: Shapes whose compiled graphs are kept (a run's batch size, its last smaller batch, ...).
    CACHED_SHAPES = 4

    def __init__(self, model, *, threads: int | None = None):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"OpenVinoRunner cannot run {model.name!r}: {reason}.")
        check_openvino()
        self.model = model
        self.min_size = variant_of(model).min_input_size
        self.threads = graph_files.threads_setting(threads)
        self._requests: dict[tuple[int, int], object] = {}
        self._lock = threading.Lock()

    def _request(self, shape: tuple[int, ...]):
        if shape not in self._requests:
            ov = import_openvino()

            if len(self._requests) >= self.CACHED_SHAPES:
                self._requests.pop(next(iter(self._requests)))
            core = ov.Core()
            files = GraphFiles(build_onnx_graph(self.model, *shape[1:3]))
            try:
                source = files.source
                graph = core.read_model(source) if files.external else core.read_model(source, b"")
                graph.reshape({graph.inputs[0].get_any_name(): list(shape)})
                config = graph_files.openvino_config(self.threads)
                request = core.compile_model(graph, "CPU", config).create_infer_request()
            except BaseException:
                files.close()
                raise
            # The data file of a graph over 2 GiB lives as long as its compiled graph.
            self._requests[shape] = (request, files)
        return self._requests[shape][0]

    def _run(self, x: np.ndarray) -> np.ndarray:
        with self._lock:
            request = self._request(x.shape)
            request.infer({0: x})
            return np.array(request.get_output_tensor(0).data, copy=True)


def accelerator() -> str | None:
    """The accelerator the active Keras backend computes on (``"gpu"``, ``"tpu"``) or None."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        platform = jax.default_backend()
        return None if platform == "cpu" else platform
    if backend == "torch":
        import torch

        return "gpu" if torch.cuda.is_available() else None
    if backend == "tensorflow":
        import tensorflow as tf

        return "gpu" if tf.config.list_physical_devices("GPU") else None
    return None


def split_precision(precision: str | None) -> tuple[str | None, str | None]:
    """A ``precision`` of predict / eval / bench -> ``(Keras precision, engine precision)``.

    The Keras precisions (:data:`convnext_keras.nets.convnext.PRECISIONS`: ``"fp32"``, ``"bf16"``,
    ``"fp16"``) are dtype policies of the model: ``(precision, None)``.  ``"int8"`` is the
    onnxruntime engine's opt-in path on a float32 model: ``("fp32", "int8")``.  None:
    ``(None, None)``.  ``ValueError`` for anything else, listing every choice.
    """
    from convnext_keras.nets.convnext import PRECISIONS as KERAS_PRECISIONS

    if precision is None or precision in KERAS_PRECISIONS:
        return precision, None
    if precision == INT8:
        return "fp32", INT8
    raise ValueError(
        f"precision must be one of {', '.join([*KERAS_PRECISIONS, INT8])}, got {precision!r}."
    )


def engine_precision(precision: str | None, calibration=None) -> str | None:
    """The engine precision of a predict / eval ``precision`` (:func:`split_precision`), after
    checking the calibration photos: ``ValueError`` when they are given without ``"int8"``,
    ``FileNotFoundError`` when they do not exist - before anything is downloaded."""
    engine = split_precision(precision)[1]
    if calibration is not None:
        if engine != INT8:
            raise ValueError(
                f"calibration photos are for precision 'int8' (got precision {precision!r}); "
                "add precision='int8' (CLI: --precision int8) or leave calibration out."
            )
        calibration_files(calibration)
    return engine


def check_engine(engine: str, precision: str | None = None) -> None:
    """``ValueError`` for an ``engine`` not in :data:`ENGINES`, an engine ``precision`` other
    than None or ``"int8"``, and ``"int8"`` on the Keras engine."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}.")
    if precision not in (None, INT8):
        raise ValueError(
            f"precision selects the onnxruntime engine's int8 path: None or {INT8!r}, got "
            f"{precision!r} (float32 / bf16 / fp16 are the model's own: "
            "load_model(..., precision=...))."
        )
    if precision == INT8 and engine not in ("auto", "onnxruntime"):
        raise ValueError(
            "precision 'int8' runs on the onnxruntime engine only (static int8 quantization of "
            f"this library's ONNX graph), not {engine!r}; use engine 'auto' or 'onnxruntime'."
        )


def inference_function(
    model, engine: str = "auto", *, precision: str | None = None, calibration=None
):
    """The fastest correct way to run ``model`` on a batch: ``(fn, engine_name)``.

    ``engine="auto"`` on a CPU, for a model the graph engines can run (float32 classifier or
    pooled features), picks OpenVINO (:class:`OpenVinoRunner`) when it is installed, else
    onnxruntime (:class:`OnnxRunner`) when that is, else Keras' ``predict_on_batch`` (always
    Keras on a GPU/TPU); ``"openvino"`` and ``"onnxruntime"`` insist (and raise if they
    cannot); ``"keras"`` always uses Keras.  ``fn(batch)`` returns numpy outputs either way.

    ``precision="int8"`` (opt-in) runs the model quantized to int8 (:func:`quantize_int8`,
    calibrated on ``calibration``, see :class:`OnnxRunner`) on onnxruntime, on the CPU even
    where a GPU is present; it needs a float32 model and raises ``ValueError`` with
    ``engine="keras"``.  None (default): the model as it computes.

    With ``"auto"``, an engine that cannot run the model after all (its graph cannot be built
    or loaded, the engine fails) gives way to Keras with one line saying why
    (:class:`_GraphRunner`'s ``fallback``); an engine asked for by name raises instead.
    """
    check_engine(engine, precision)
    if precision == INT8:
        return OnnxRunner(model, precision=INT8, calibration=calibration), "onnxruntime"
    chosen = engine
    if engine == "auto":
        chosen = "keras"
        if not unsupported_reason(model) and not accelerator():
            chosen = graph_files.cpu_graph_engine() or "keras"
    if chosen == "keras":
        return model.predict_on_batch, "keras"
    runner = OpenVinoRunner(model) if chosen == "openvino" else OnnxRunner(model)
    if engine == "auto":
        runner.fallback = model.predict_on_batch
    return runner, chosen
