"""Which way a task runs a named model: its cached graph on a CPU engine, without Keras, when
it can.

``predict``, ``eval``, ``embed`` and ``segment`` ask :func:`graph_route` first.  For a registry
name with its official weights, in float32, on a machine whose engine ``"auto"`` (or the one
asked for) is a graph engine - OpenVINO, else onnxruntime - and no accelerator is visible, it
returns a :class:`GraphRoute`: ``route(images)`` runs the model's graph from the graph cache
(:mod:`convnext_keras.weights.graphs`) with :class:`convnext_keras.engines.graph_files.GraphRunner`.
The first call for a model (or after new weights, another engine version or graph format)
builds the Keras model once, writes its graph into the cache and then runs the cached file
exactly as every later call does, so the answers of the first and the later calls are the
same; a later call imports neither Keras nor a backend.  Anything else - a ``.keras`` file, a
model object, local or random weights, mixed precision or int8, ``engine="keras"``, an
accelerator, no graph engine installed - gets None, and the task loads the Keras model as
before.

The task decides; the graph cache is :mod:`convnext_keras.weights.graphs`' and the engines'
(:mod:`convnext_keras.engines.graph_files`) concern.  This module imports no Keras when
imported, and none while the graphs it needs are cached.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from pathlib import Path

from convnext_keras import registry
from convnext_keras.engines import graph_files
from convnext_keras.weights import graphs

logger = logging.getLogger("convnext_keras")

#: The heads a graph engine runs: this library's ONNX graphs of them.
ROUTED_HEADS = ("classifier", "pooled", "segmentation")
#: Input sizes whose runners a route keeps (segment's windows are all one size).
KEPT_SIZES = 4


def global_policy_float32() -> bool:
    """Whether a model loaded with ``precision=None`` computes in float32: Keras' global dtype
    policy when Keras is imported, else the ``floatx`` of ``keras.json`` (``$KERAS_HOME``,
    else ``~/.keras``; float32 without one), read without importing Keras."""
    if "keras" in sys.modules:
        import keras

        return keras.config.dtype_policy().name == "float32"
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        config = json.loads(Path(home, "keras.json").read_text())
    except (OSError, ValueError):
        return True
    return not isinstance(config, dict) or config.get("floatx", "float32") == "float32"


def accelerator() -> bool:
    """Whether a Keras backend would compute on an accelerator: asked of the backend when
    Keras is already imported, else :func:`graph_files.accelerator_visible` (no import)."""
    if "keras" in sys.modules:
        from convnext_keras.engines.runners import accelerator as backend_accelerator

        return backend_accelerator() is not None
    return graph_files.accelerator_visible()


def route_engine(engine: str, head: str) -> str | None:
    """The graph engine ``engine`` (``"auto"``, ``"openvino"``, ``"onnxruntime"``) means for a
    model with ``head`` on this machine, or None when it is not a graph engine here (Keras
    runs, or the task's own path raises the error an insisted engine that is not installed
    deserves)."""
    if engine == "auto":
        return graph_files.cpu_graph_engine(segmentation=head == "segmentation")
    if engine in graph_files.GRAPH_ENGINES:
        installed = {
            "openvino": graph_files.openvino_available,
            "onnxruntime": graph_files.onnxruntime_available,
        }
        return engine if installed[engine]() else None
    return None


def graph_route(
    model,
    weights,
    *,
    head: str,
    engine: str = "auto",
    precision: str | None = None,
    cached_sizes: tuple[tuple[int, int], ...] | None = None,
) -> GraphRoute | None:
    """A :class:`GraphRoute` for ``model`` when its graph can run it (see the module
    docstring), else None.

    Args:
        model: what the task was given; only a registry name (a ``str`` that is not a
            ``.keras`` file) gets a route.
        weights: only ``"official"`` (the converted cache's weights) gets one.
        head: the head the task runs: ``"classifier"`` (predict, eval), ``"pooled"`` (embed)
            or ``"segmentation"``; the name must resolve to it (``"pooled"``: any name with
            a checkpoint).
        engine: the task's ``engine`` option.
        precision: the task's ``precision``: None (when the global policy is float32) or
            ``"fp32"``.
        cached_sizes: the input sizes ``(height, width)`` whose graphs are cached (default:
            every size); others are built in memory from the Keras model (segment's
            whole-image sizes).
    """
    if not isinstance(model, str) or model.endswith(".keras") or head not in ROUTED_HEADS:
        return None
    if not (isinstance(weights, str) and weights == "official"):
        return None
    if precision not in (None, "fp32") or (precision is None and not global_policy_float32()):
        return None
    try:
        resolved = registry.resolve(model)
    except ValueError:
        return None  # the task's own path says what is wrong with the name
    if resolved.checkpoint is None:
        return None
    if head == "pooled" and resolved.head == "segmentation":
        return None
    if head != "pooled" and resolved.head != head:
        return None
    chosen = route_engine(engine, head)
    if chosen is None or accelerator():
        return None
    return GraphRoute(resolved, head, chosen, cached_sizes=cached_sizes)


class GraphRoute:
    """A registry model's graph on one engine, per input size, from the graph cache.

    ``route(images)`` (NHWC float32, normalised) returns what the Keras model would:
    logits ``(n, classes)``, pooled features ``(n, dim)`` or segmentation logits
    ``(n, h, w, classes)``.  :meth:`runner` gives the runner of one input size: the cached
    graph when it is there and matches its record (OpenVINO importing its compiled blob), else
    the Keras model is loaded (:meth:`keras_model`, once), its graph built, written into the
    cache and run from there.  ``used_keras`` says whether this route needed Keras.
    """

    def __init__(
        self,
        resolved: registry.ResolvedName,
        head: str,
        engine: str,
        *,
        threads: int | None = None,
        cached_sizes: tuple[tuple[int, int], ...] | None = None,
    ):
        self.resolved = resolved
        self.checkpoint = resolved.checkpoint
        self.name = resolved.name
        self.head = head
        self.engine = engine
        self.threads = threads
        self.cached_sizes = None if cached_sizes is None else {tuple(s) for s in cached_sizes}
        self.version = graph_files.engine_version(engine)
        graph_files.preload(engine)  # overlaps the checks of the cached files
        self.used_keras = False
        self._model = None
        self._runners: dict[tuple[int, int], graph_files.GraphRunner] = {}
        self._lock = threading.Lock()

    @property
    def num_classes(self) -> int | None:
        return self.checkpoint.num_classes

    @property
    def num_features(self) -> int:
        return int(self.resolved.variant.num_features)

    def keras_model(self):
        """The Keras model of this head with the official weights (loaded once; the cold
        path only)."""
        if self._model is None:
            from convnext_keras import api

            self.used_keras = True
            if self.head == "segmentation":
                self._model = api.load_segmentation_model(self.name, weights="official")
            else:
                features = "pooled" if self.head == "pooled" else None
                self._model = api.load_model(self.name, weights="official", features=features)
        return self._model

    def graph_bytes(self, height: int, width: int) -> bytes:
        """The serialized graph for ``height x width`` inputs (dynamic batch), built from the
        Keras model (which this loads)."""
        if self.head == "segmentation":
            from convnext_keras.engines.upernet_graph import build_onnx_graph
        else:
            from convnext_keras.engines.onnx_graph import build_onnx_graph
        return build_onnx_graph(self.keras_model(), height, width).SerializeToString()

    def key(self, height: int, width: int) -> graphs.GraphKey | None:
        if self.cached_sizes is not None and (height, width) not in self.cached_sizes:
            return None
        return graphs.graph_key(
            self.checkpoint, self.head, height, width, "fp32", self.engine, self.version
        )

    def runner(self, height: int, width: int) -> graph_files.GraphRunner:
        """The runner for ``height x width`` inputs (made once per size; :data:`KEPT_SIZES`
        kept)."""
        size = (int(height), int(width))
        with self._lock:
            if size not in self._runners:
                if len(self._runners) >= KEPT_SIZES:
                    self._runners.pop(next(iter(self._runners)))
                self._runners[size] = self._make(*size)
            return self._runners[size]

    def _make(self, height: int, width: int) -> graph_files.GraphRunner:
        key = self.key(height, width)
        if key is None and (self.cached_sizes is None or (height, width) in self.cached_sizes):
            # The converted weights are not cached yet: loading the model converts and caches
            # them (downloading the checkpoint first if need be); then the graph has a key.
            self.keras_model()
            key = self.key(height, width)
        if key is None:
            return self._in_memory(height, width)
        with graphs.entry_lock(key):
            compiled = self._compiled(key)
            if compiled is not None and graphs.graph_recorded(key):
                before = graphs.compiled_state(key)
                if before:  # a checked blob: OpenVINO imports it and does not read the graph
                    try:
                        runner = self._runner(key.graph_path, compiled)
                    except Exception as e:  # noqa: BLE001 - compiled again below, or raised
                        logger.warning(f"convnext_keras: OpenVINO could not use its blob ({e}).")
                        runner = None
                    if runner is not None and graphs.compiled_state(key) == before:
                        return runner
                    # OpenVINO compiled the graph after all (it refused its blob): the graph
                    # it read is checked below, and whatever it wrote from it is dropped.
                    del runner
                    graphs.clear_compiled(key)
                    compiled = self._compiled(key)
            path = graphs.cached_graph(key)  # checked against its record before it is read
            if path is None:
                data = self.graph_bytes(height, width)
                try:
                    path = graphs.save_graph(key, data)
                except OSError as e:  # a read-only or full cache: the graph still runs
                    logger.warning(f"convnext_keras: {e} The graph runs from memory.")
                    return graph_files.GraphRunner(data, self.engine, threads=self.threads)
                compiled = self._compiled(key)
            runner = self._runner(path, compiled)
            if compiled is not None:
                graphs.record_compiled(key)
            return runner

    def _compiled(self, key: graphs.GraphKey) -> Path | None:
        """OpenVINO's model cache folder of the entry, its files checked (None for
        onnxruntime, and where the cache cannot be written)."""
        if self.engine != "openvino":
            return None
        try:
            return graphs.check_compiled(key)
        except OSError:
            return None

    def _runner(self, path: Path, compiled: Path | None) -> graph_files.GraphRunner:
        return graph_files.GraphRunner(
            path, self.engine, threads=self.threads, compile_cache=compiled
        )

    def _in_memory(self, height: int, width: int) -> graph_files.GraphRunner:
        return graph_files.GraphRunner(
            self.graph_bytes(height, width), self.engine, threads=self.threads
        )

    def __call__(self, images):
        x = graph_files.nhwc_images(images)
        return self.runner(x.shape[1], x.shape[2])(x)

    predict_on_batch = __call__
