"""Run a saved ONNX graph on a CPU engine - OpenVINO or onnxruntime - with no Keras at all.

The light half of the engines: this module imports numpy and nothing heavier at module level,
and OpenVINO or onnxruntime only when a runner is made.  It is what a warm ``convnext predict``
(``eval``, ``embed``, ``segment``) runs on: this library's graph of the model
(:func:`convnext_keras.engines.onnx_graph.build_onnx_graph`,
:func:`convnext_keras.engines.upernet_graph.build_onnx_graph`), read from the graph cache
(:mod:`convnext_keras.weights.graphs`) and run by :class:`GraphRunner`, so that no Keras, no
TensorFlow and no network build is needed once the graph is cached.

* :func:`openvino_available`, :func:`onnxruntime_available`, :func:`cpu_graph_engine`: which
  engines are installed (found without importing them) and the one ``"auto"`` runs;
  :func:`engine_version`: the installed version (part of the graph cache's key).
* :func:`accelerator_visible`: whether the machine shows a GPU or TPU that a Keras backend
  could compute on, without importing a backend (where one is visible, ``"auto"`` lets the
  backend decide, as before: Keras on the accelerator).
* :class:`GraphRunner`: one graph (a file or bytes) on one engine.  OpenVINO compiles the file
  once per process with float32 inference precision and the latency hint; given a
  ``compile_cache`` folder it keeps its compiled blob there (OpenVINO's own model cache,
  ``CACHE_DIR``): a later process imports the blob instead of compiling again.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
from pathlib import Path

import numpy as np

#: Engines that run this library's ONNX graph on the CPU, in the order ``"auto"`` tries them.
GRAPH_ENGINES = ("openvino", "onnxruntime")
#: The order ``"auto"`` tries them in for the UperNet graph (segmentation), measured apart
#: (BENCHMARKS.md, "CPU: segmentation").
SEGMENTATION_ENGINES = ("onnxruntime", "openvino")


def openvino_available() -> bool:
    """Whether OpenVINO is installed (a base dependency where its wheels exist); found
    without importing it."""
    return importlib.util.find_spec("openvino") is not None


def onnxruntime_available() -> bool:
    """Whether ``import onnxruntime`` works (the fallback engine where OpenVINO has no
    wheels; the ``export`` and ``int8`` extras install it everywhere)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def import_openvino():
    """``import openvino``, without the usage telemetry its model converter sends.

    ``import openvino`` imports its converter (``openvino.tools.ovc``), which starts
    ``openvino_telemetry``: unless the user opted out, it sends a usage event to Google
    Analytics from a forked process (JAX then warns that ``os.fork()`` was called in its
    multithreaded process; offline the child waits for its timeout).  This library never asked
    its users for that consent, so it imports OpenVINO as OpenVINO does where
    ``openvino_telemetry`` is not installed: with the converter's own stand-in
    (``openvino.tools.ovc.telemetry_stub``).  Nothing else changes; the user's own use of
    OpenVINO's tools in another process is untouched.
    """
    if "openvino" in sys.modules:
        return sys.modules["openvino"]
    hidden = [
        m for m in ("openvino_telemetry", "openvino_telemetry.backend") if m not in sys.modules
    ]
    for name in hidden:
        sys.modules[name] = None  # an ImportError for `import openvino_telemetry`
    try:
        from convnext_keras.errors import require

        return require("openvino", extra="openvino", purpose="The openvino engine")
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


def cpu_graph_engine(segmentation: bool = False) -> str | None:
    """The engine ``"auto"`` runs this library's graph with on a CPU: the first installed of
    :data:`GRAPH_ENGINES` (``segmentation``: :data:`SEGMENTATION_ENGINES`), else None (Keras)."""
    available = {"openvino": openvino_available, "onnxruntime": onnxruntime_available}
    order = SEGMENTATION_ENGINES if segmentation else GRAPH_ENGINES
    return next((e for e in order if available[e]()), None)


#: The distributions each engine may be installed from (the first found gives the version).
_DISTRIBUTIONS = {
    "openvino": ("openvino", "openvino-nightly"),
    "onnxruntime": (
        "onnxruntime",
        "onnxruntime-gpu",
        "onnxruntime-openvino",
        "onnxruntime-directml",
    ),
}


def engine_version(engine: str) -> str:
    """The installed version of a graph engine (``"openvino"``: ``"2026.4.1"``), from the
    package's metadata (without importing the engine), else from the engine itself;
    ``ImportError`` when it is not installed."""
    from importlib import metadata

    if engine not in _DISTRIBUTIONS:
        raise ValueError(f"Not a graph engine: {engine!r} (one of {', '.join(GRAPH_ENGINES)}).")
    for distribution in _DISTRIBUTIONS[engine]:
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    module = importlib.import_module(engine)
    return str(getattr(module, "__version__", "unknown"))


def preload(engine: str) -> None:
    """Start importing ``engine`` in a background thread (OpenVINO takes 0.15-0.3 s to import),
    so that the import overlaps the work that comes before the engine is needed; the import
    that needs it waits for this one.  Errors are left to that import."""

    def load():
        try:
            importlib.import_module(engine)
        except Exception:  # noqa: BLE001 - the import that needs the engine reports it
            pass

    if engine in GRAPH_ENGINES and engine not in sys.modules:
        threading.Thread(target=load, name=f"import {engine}", daemon=True).start()


def _hidden(variable: str) -> bool:
    """True when a ``*_VISIBLE_DEVICES`` variable hides every device (set to "" or -1)."""
    value = os.environ.get(variable)
    return value is not None and value.strip() in ("", "-1")


def accelerator_visible(dev: Path = Path("/dev")) -> bool:
    """Whether this machine shows an accelerator a Keras backend may compute on, decided
    without importing a backend: an NVIDIA device node (``/dev/nvidia0``...) unless
    ``CUDA_VISIBLE_DEVICES`` hides them, AMD's ROCm (``/dev/kfd``) unless
    ``HIP_VISIBLE_DEVICES`` does, a TPU (``/dev/accel*``, ``/dev/vfio/<n>``), or Apple's Metal
    plugins for TensorFlow / JAX.  Errs towards True: a visible device only means the cached
    graph is not used without asking the backend first
    (:func:`convnext_keras.engines.runners.accelerator` then decides).  ``dev``: the device
    folder to look in."""
    if not _hidden("CUDA_VISIBLE_DEVICES") and any(dev.glob("nvidia[0-9]*")):
        return True
    if not _hidden("HIP_VISIBLE_DEVICES") and (dev / "kfd").exists():
        return True
    if any(dev.glob("accel[0-9]*")) or any(dev.glob("vfio/[0-9]*")):
        return True
    if sys.platform == "darwin":
        return any(importlib.util.find_spec(m) for m in ("tensorflow_metal", "jax_metal"))
    return False


def threads_setting(threads: int | None) -> int | None:
    """An engine's thread count: ``threads``, else ``$CONVNEXT_THREADS``, else None (the
    engine's default, one per physical core)."""
    env = os.environ.get("CONVNEXT_THREADS")
    return threads if threads is not None else (int(env) if env else None)


def onnx_session(graph, threads: int | None = None):
    """An onnxruntime CPU session of ``graph`` (a file path, an ``onnx.ModelProto`` or its
    bytes) with the engine's settings: every graph optimisation, ``threads`` intra-op threads
    (None: onnxruntime's default, one per physical core) and sequential execution."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if isinstance(graph, (str, os.PathLike)):
        data = str(graph)
    else:
        data = graph if isinstance(graph, bytes) else graph.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def openvino_config(threads: int | None = None, compile_cache: Path | None = None) -> dict:
    """The OpenVINO CPU settings of every runner: float32 inference precision (OpenVINO would
    otherwise compute in bfloat16 on CPUs with ``avx512_bf16`` or AMX), the latency hint,
    ``threads`` inference threads (None: OpenVINO's, one per physical core) and, given a
    folder, OpenVINO's model cache there (``CACHE_DIR``)."""
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if compile_cache is not None:
        config["CACHE_DIR"] = str(compile_cache)
    return config


def nhwc_images(images) -> np.ndarray:
    """``images`` as the contiguous float32 NHWC batch the engines take; ``ValueError`` for
    another shape than ``(batch, height, width, 3)``."""
    x = np.ascontiguousarray(np.asarray(images), dtype=np.float32)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(
            f"Expected an NHWC batch of RGB images (batch, height, width, 3), got shape "
            f"{x.shape}; add a batch axis with x[None] for a single image."
        )
    return x


class GraphRunner:
    """One ONNX graph on one CPU engine: ``runner(images)`` takes an NHWC float batch and
    returns the graph's first output as a numpy array of its own (not a view of the engine's
    buffers).

    Args:
        graph: the graph, as a file (a cached graph: read by the engine itself, no copy in
            Python) or as serialized bytes.
        engine: ``"openvino"`` or ``"onnxruntime"``.
        threads: inference threads (default: the engine's, one per physical core;
            ``$CONVNEXT_THREADS`` overrides).
        compile_cache: OpenVINO only, with a file: the folder of OpenVINO's model cache
            (``CACHE_DIR``), where the first process leaves the compiled blob and later ones
            import it (0.1-0.2 s for ConvNeXt-T instead of 0.5-0.8 s of compiling).

    OpenVINO compiles the graph as it is: the batch axis dynamic, height and width as the
    graph fixes them (the cached graphs fix them: one per input size).  Calls are serialised
    (one infer request).  Raises ``ImportError`` when the engine is not installed and
    ``ValueError`` for an unknown engine.
    """

    def __init__(
        self,
        graph: str | os.PathLike | bytes,
        engine: str,
        *,
        threads: int | None = None,
        compile_cache: str | os.PathLike | None = None,
    ):
        if engine not in GRAPH_ENGINES:
            raise ValueError(f"engine must be one of {', '.join(GRAPH_ENGINES)}, got {engine!r}.")
        self.engine = engine
        self.threads = threads_setting(threads)
        self._lock = threading.Lock()
        self._session = self._request = None
        if engine == "onnxruntime":
            self._session = onnx_session(graph, self.threads)
            return
        ov = import_openvino()
        core = ov.Core()
        if isinstance(graph, (str, os.PathLike)):
            cache = Path(compile_cache) if compile_cache is not None else None
            compiled = core.compile_model(str(graph), "CPU", openvino_config(self.threads, cache))
        else:
            compiled = core.compile_model(
                core.read_model(graph, b""), "CPU", openvino_config(self.threads)
            )
        self._request = compiled.create_infer_request()

    def __call__(self, images) -> np.ndarray:
        x = nhwc_images(images)
        if self._session is not None:
            return self._session.run(None, {"images": x})[0]
        with self._lock:
            self._request.infer({0: x})
            return np.array(self._request.get_output_tensor(0).data, copy=True)

    predict_on_batch = __call__
