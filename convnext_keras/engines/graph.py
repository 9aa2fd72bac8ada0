"""A faster CPU inference engine for ConvNeXt: the Keras model's weights run by onnxruntime.

On the CPUs this project measures on, onnxruntime (MLAS kernels, NCHWc convolutions) runs the
ConvNeXt forward pass faster than Keras' ``predict_on_batch`` on any of the three backends (see
BENCHMARKS.md).  :class:`OnnxRunner` builds an ONNX graph straight from a built Keras ConvNeXt's
weights - no TensorFlow, no tf2onnx - arranged for that engine:

* the stem (4x4 stride 4) and downsampling (2x2 stride 2) convolutions become a
  space-to-depth reshape and one matrix product (patches do not overlap), which MLAS runs at
  its GEMM rate instead of its direct-convolution rate;
* each block's layer scale is folded into ``pwconv2``'s weights and bias (``(xW + b) * g ==
  x(W g) + b g``), one pass over the activations less per block;
* ConvNeXt V2's Global Response Normalization ``y * (1 + gamma * N) + beta`` costs one read
  of the hidden activations (their sum of squares over height and width) and one scaling
  pass: ``beta`` is folded into ``pwconv2``'s bias (``b + beta W``);
* LayerNorm and exact (erf) GELU are single fused operators.

The graph computes the same function as the Keras model in float32 (tested against it and,
through the checkpoint tests, against the PyTorch reference).  :func:`build_onnx_graph` builds
it for any head (classifier, ``_fe``, pyramid, ``features="all"``), a fixed or a dynamic
height/width and opset 17 or 20; ``convnext export --format onnx`` writes it.  The runner
(classifier and ``_fe`` models) builds one graph per input height/width (any batch size) and
caches it.  Only models made of this library's ConvNeXt layers and nothing else are rebuilt
(:func:`graph_unsupported_reason`); anything else stays on Keras.

Weights are copied when the runner is made: a runner made before training or a
``load_weights`` call still holds the old weights (make a new one).

Opt-in int8 (``OnnxRunner(model, precision="int8")``, ``--precision int8``): the same float
graph quantized by onnxruntime's own static post-training quantizer (:func:`quantize_int8`):
int8 weights per output channel and uint8 activations with ranges calibrated on real photos
through the official transform, for the matrix products only (stem, downsampling and every
block's two pointwise layers); LayerNorm, GELU, the depthwise convolution and the head stay
float32.  How close it stays to float32 on a model that learned something, and how much faster
it is, is measured in BENCHMARKS.md.

The same float32 graph also runs on OpenVINO's CPU plugin (:class:`OpenVinoRunner`, engine
``"openvino"``), compiled with float32 inference precision (OpenVINO would otherwise compute in
bfloat16 on CPUs with ``avx512_bf16`` or AMX).  Where OpenVINO is installed (the ``openvino``
extra; ``make setup`` installs it) the ``"auto"`` engine picks it on a CPU: on the AVX-512 CPU
measured (AMD EPYC family 25 model 17) it ran ConvNeXt-T 1.05-1.15x faster than onnxruntime on
either graph at batch 1, 8 and 32, and on the AVX2-only one (family 23 model 1) level with it
(BENCHMARKS.md).
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from pathlib import Path

import numpy as np

from convnext_keras import registry
from convnext_keras.nets.convnext import non_float32_layer, variant_of
from convnext_keras.nets.layers import too_small_message

#: ONNX opset of the graph (``Gelu`` is an operator from opset 20).
OPSET = 20
ENGINES = ("auto", "openvino", "onnxruntime", "keras")
#: Engines that run this library's ONNX graph on the CPU, in the order ``"auto"`` tries them.
GRAPH_ENGINES = ("openvino", "onnxruntime")
#: The opt-in precision of the onnxruntime engine (static int8 post-training quantization).
INT8 = "int8"
#: What the onnxruntime engine computes in.
PRECISIONS = ("fp32", INT8)


def onnxruntime_available() -> bool:
    """Whether ``import onnxruntime`` works (it ships in the ``export`` extra)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def openvino_available() -> bool:
    """Whether OpenVINO is installed (the ``openvino`` extra); found without importing it."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def cpu_graph_engine() -> str | None:
    """The engine ``"auto"`` runs this library's graph with on a CPU: ``"openvino"`` when
    OpenVINO is installed, else ``"onnxruntime"`` when that is, else None (Keras)."""
    available = {"openvino": openvino_available, "onnxruntime": onnxruntime_available}
    return next((e for e in GRAPH_ENGINES if available[e]()), None)


def _threads(threads: int | None) -> int | None:
    """An engine's thread count: ``threads``, else ``$CONVNEXT_THREADS``, else None (the
    engine's default, one per physical core)."""
    env = os.environ.get("CONVNEXT_THREADS")
    return threads if threads is not None else (int(env) if env else None)


#: Every layer of a plain ConvNeXt built by this library (anything else: not ours to rebuild).
_PLAIN_LAYER = re.compile(
    r"images|input_size_check|stem_(conv|norm)|stage\d_downsample_(norm|conv)"
    r"|stage\d_block\d+_(dwconv|norm|pwconv1|grn|pwconv2|layer_scale|drop_path|add)"
    r"|head_(pool|norm|fc)"
)


def _graph_outputs(model) -> list[tuple[str | None, str]] | str:
    """``[(output key, what it is)]`` of a plain ConvNeXt, or why the graph cannot be built.

    What an output is: ``"logits"``, ``"pooled"``, ``"dense"`` (the head LayerNorm at every
    position) or ``"stage1"`` ... ``"stage4"``, read off the layer that produces it; the key is
    the dict key of a dict-output model, else None.
    """
    spec = variant_of(model)
    if spec is None:
        return "it is not a ConvNeXt built by convnext_keras (layer names do not match)"
    extra = [layer.name for layer in model.layers if not _PLAIN_LAYER.fullmatch(layer.name)]
    if extra:
        return f"it has layers a ConvNeXt does not have ({', '.join(extra[:3])})"
    mixed = non_float32_layer(model)
    if mixed:
        return f"it computes in {mixed[1]} (layer {mixed[0]!r}); the graph is float32 only"
    kinds = {"head_fc": "logits", "head_norm": "pooled"}
    for stage, depth in enumerate(spec.depths):
        kinds[f"stage{stage}_block{depth - 1}_add"] = f"stage{stage + 1}"
    output = model.output
    items = list(output.items()) if isinstance(output, dict) else [(None, output)]
    if not isinstance(output, dict) and len(model.outputs) != 1:
        return "it has several unnamed outputs"
    result = []
    for key, tensor in items:
        producer = tensor._keras_history.operation.name
        if producer not in kinds:
            return f"output {key or 0} comes from layer {producer!r}, not a ConvNeXt output"
        dense = producer == "head_norm" and len(tensor.shape) == 4
        result.append((key, "dense" if dense else kinds[producer]))
    return result


def graph_unsupported_reason(model) -> str | None:
    """Why :func:`build_onnx_graph` cannot rebuild ``model`` (None when it can)."""
    outputs = _graph_outputs(model)
    return outputs if isinstance(outputs, str) else None


def unsupported_reason(model) -> str | None:
    """Why :class:`OnnxRunner` cannot run ``model`` (None when it can)."""
    outputs = _graph_outputs(model)
    if isinstance(outputs, str):
        return outputs
    if len(outputs) != 1 or outputs[0][1] not in ("logits", "pooled"):
        return "only the classifier and pooled-feature heads are supported (not pyramid/all)"
    return None


class _GraphBuilder:
    """Accumulates ONNX nodes and initializers with unique names."""

    def __init__(self):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes, self.initializers = [], []
        self._count = 0

    def const(self, array, name) -> str:
        self.initializers.append(self.numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type, inputs, name, **attrs) -> str:
        self._count += 1
        out = f"{name}_{op_type.lower()}_{self._count}"
        self.nodes.append(self.helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def _weights(model) -> dict[str, list[np.ndarray]]:
    return {
        layer.name: [np.asarray(w, dtype=np.float32) for w in layer.get_weights()]
        for layer in model.layers
        if layer.weights
    }


def _patchify_matmul(g, x, h, w, patch, kernel, bias, name):
    """A ``patch x patch`` conv with stride ``patch`` (VALID) on NHWC ``x`` as one GEMM.

    ``h``/``w``: the static input size, or None for a size read from the tensor at run time.
    """
    kh, kw, cin, cout = kernel.shape
    p_ = g.const(np.array([patch], np.int64), f"{name}_p")
    if h is not None:
        ho, wo = h // patch, w // patch
        if (ho * patch, wo * patch) != (h, w):  # VALID drops the last rows/columns
            ends = g.const(np.array([ho * patch, wo * patch], np.int64), f"{name}_ends")
            x = _slice_hw(g, x, ends, name)
        grid = [
            g.const(np.array([ho], np.int64), f"{name}_ho"),
            g.const(np.array([wo], np.int64), f"{name}_wo"),
        ]
    else:
        hw = g.op(
            "Slice",
            [
                g.op("Shape", [x], name),
                g.const(np.array([1], np.int64), f"{name}_hw_start"),
                g.const(np.array([3], np.int64), f"{name}_hw_end"),
            ],
            name,
        )
        out_hw = g.op("Div", [hw, p_], name)  # integer division: floor for sizes >= 0
        x = _slice_hw(g, x, g.op("Mul", [out_hw, p_], name), name)
        grid = [
            g.op(
                "Slice",
                [
                    out_hw,
                    g.const(np.array([i], np.int64), f"{name}_i{i}"),
                    g.const(np.array([i + 1], np.int64), f"{name}_j{i}"),
                ],
                name,
            )
            for i in (0, 1)
        ]
    minus_one = g.const(np.array([-1], np.int64), f"{name}_m1")
    shape6 = g.op(
        "Concat",
        [minus_one, grid[0], p_, grid[1], p_, g.const(np.array([cin], np.int64), f"{name}_cin")],
        name,
        axis=0,
    )
    x = g.op("Reshape", [x, shape6], name)
    x = g.op("Transpose", [x], name, perm=[0, 1, 3, 2, 4, 5])
    flat = g.const(np.array([patch * patch * cin], np.int64), f"{name}_flat")
    x = g.op("Reshape", [x, g.op("Concat", [minus_one, *grid, flat], name, axis=0)], name)
    # Keras kernels are (kh, kw, cin, cout): flattening gives the (dy, dx, c) patch order.
    x = g.op("MatMul", [x, g.const(kernel.reshape(kh * kw * cin, cout), f"{name}_w")], name)
    out_h = None if h is None else h // patch
    out_w = None if w is None else w // patch
    return g.op("Add", [x, g.const(bias, f"{name}_b")], name), out_h, out_w


def _slice_hw(g, x, ends, name):
    """``x[:, :ends[0], :ends[1], :]``."""
    zeros = g.const(np.array([0, 0], np.int64), f"{name}_starts")
    return g.op(
        "Slice", [x, zeros, ends, g.const(np.array([1, 2], np.int64), f"{name}_axes")], name
    )


def _gelu(g, x, opset, name):
    """Exact GELU: the ``Gelu`` operator from opset 20, else its erf form (which onnxruntime
    fuses back into one operator)."""
    if opset >= 20:
        return g.op("Gelu", [x], name, approximate="none")
    scaled = g.op("Div", [x, g.const(np.array(np.sqrt(2.0), np.float32), f"{name}_sqrt2")], name)
    one = g.const(np.array(1.0, np.float32), f"{name}_one")
    y = g.op("Mul", [x, g.op("Add", [g.op("Erf", [scaled], name), one], name)], name)
    return g.op("Mul", [y, g.const(np.array(0.5, np.float32), f"{name}_half")], name)


def _reduce(g, op, x, axes, opset, name):
    """``op`` (ReduceMean, ReduceSumSquare...) over ``axes``, keeping them (axes became an input
    in opset 18)."""
    if opset >= 18:
        axes_const = g.const(np.array(axes, np.int64), f"{name}_{op.lower()}_axes")
        return g.op(op, [x, axes_const], name, keepdims=1)
    return g.op(op, [x], name, keepdims=1, axes=list(axes))


def _grn_pwconv2(g, y, grn, w2, b2, opset, name):
    """``pwconv2(GRN(y))`` on the GELU output ``y`` ``(N, H, W, 4C)``.

    GRN: ``N_c = G_c / (mean_c G + eps)`` with ``G`` the L2 norm over height and width, and
    ``GRN(y) = y * (1 + gamma * N) + beta``; ``beta`` goes into ``pwconv2``'s bias
    (``b + beta W``), so GRN costs one read of ``y`` (its sum of squares) and one scaling pass.
    """
    gamma, beta = grn
    norm = g.op("Sqrt", [_reduce(g, "ReduceSumSquare", y, [1, 2], opset, name)], name)
    mean = _reduce(g, "ReduceMean", norm, [-1], opset, name)
    eps = g.const(np.array(registry.GRN_EPSILON, np.float32), f"{name}_grn_eps")
    ratio = g.op("Div", [norm, g.op("Add", [mean, eps], name)], name)  # (N, 1, 1, 4C)
    one = g.const(np.array(1.0, np.float32), f"{name}_one")
    scale = g.op("Add", [g.op("Mul", [ratio, g.const(gamma, f"{name}_grn_g")], name), one], name)
    out = g.op("MatMul", [g.op("Mul", [y, scale], name), g.const(w2, f"{name}_w2")], name)
    return g.op("Add", [out, g.const(b2 + beta @ w2, f"{name}_b2")], name)


def _layer_norm(g, x, weights, name):
    gamma, beta = weights
    return g.op(
        "LayerNormalization",
        [x, g.const(gamma, f"{name}_g"), g.const(beta, f"{name}_b")],
        name,
        axis=-1,
        epsilon=registry.LAYER_NORM_EPSILON,
    )


def _check_input_size(spec, height: int | None, width: int | None) -> None:
    """``ValueError`` for a height/width below what the network takes (None: dynamic)."""
    for side in (height, width):
        if side is not None and side < spec.min_input_size:
            raise ValueError(too_small_message(height, width, spec.min_input_size))


def build_onnx_graph(
    model,
    height: int | None,
    width: int | None,
    *,
    opset: int = OPSET,
    output_names: list[str] | None = None,
):
    """The ONNX graph (``onnx.ModelProto``) of a ConvNeXt built by this library.

    Input ``images``: float32 NHWC ``(batch, height, width, 3)``, normalised as for the Keras
    model; ``height``/``width`` None make that axis dynamic.  Outputs: what the model returns,
    in its order - ``logits`` (classifier), ``pooled`` (``_fe``), ``dense``, the dict of a
    pyramid / ``features="all"`` model under its keys - or named ``output_names``.  Isotropic
    ConvNeXts (one stage behind a 16x16 patch stem) are built the same way.  ``opset`` 20 writes
    exact GELU as the ``Gelu`` operator, 17-19 as its erf form.  Raises ``ValueError`` for
    models it cannot rebuild (see :func:`graph_unsupported_reason`) and for inputs smaller than
    the network's total stride.
    """
    from onnx import TensorProto

    outputs = _graph_outputs(model)
    if isinstance(outputs, str):
        raise ValueError(f"Cannot build an ONNX graph for {model.name!r}: {outputs}.")
    if opset < 17:
        raise ValueError(f"opset must be >= 17 (LayerNormalization), got {opset}.")
    names = output_names or [key or kind for key, kind in outputs]
    if len(names) != len(outputs):
        raise ValueError(f"{model.name!r} has {len(outputs)} outputs, got names {names}.")
    spec = variant_of(model)
    _check_input_size(spec, height, width)
    W = _weights(model)
    g = _GraphBuilder()
    k = registry.DWCONV_KERNEL
    values = {}

    x, h, w = _patchify_matmul(g, "images", height, width, spec.patch_size, *W["stem_conv"], "stem")
    if spec.stem_norm:
        x = _layer_norm(g, x, W["stem_norm"], "stem_norm")
    for stage, depth in enumerate(spec.depths):
        if stage > 0:
            p = f"stage{stage}_downsample"
            x = _layer_norm(g, x, W[f"{p}_norm"], f"{p}_norm")
            x, h, w = _patchify_matmul(
                g, x, h, w, registry.DOWNSAMPLE_STRIDE, *W[f"{p}_conv"], f"{p}_conv"
            )
        for b in range(depth):
            p = f"stage{stage}_block{b}"
            dw_kernel, dw_bias = W[f"{p}_dwconv"]
            dim = dw_kernel.shape[2]
            y = g.op("Transpose", [x], p, perm=[0, 3, 1, 2])
            y = g.op(
                "Conv",
                [
                    y,
                    g.const(dw_kernel.transpose(2, 3, 0, 1), f"{p}_dw_w"),  # (C, 1, kh, kw)
                    g.const(dw_bias, f"{p}_dw_b"),
                ],
                p,
                group=dim,
                kernel_shape=[k, k],
                pads=[k // 2] * 4,
            )
            y = g.op("Transpose", [y], p, perm=[0, 2, 3, 1])
            y = _layer_norm(g, y, W[f"{p}_norm"], f"{p}_norm")
            w1, b1 = W[f"{p}_pwconv1"]
            y = g.op("MatMul", [y, g.const(w1, f"{p}_w1")], p)
            y = _gelu(g, g.op("Add", [y, g.const(b1, f"{p}_b1")], p), opset, p)
            w2, b2 = W[f"{p}_pwconv2"]
            if f"{p}_grn" in W:
                y = _grn_pwconv2(g, y, W[f"{p}_grn"], w2, b2, opset, p)
            else:
                if f"{p}_layer_scale" in W:
                    (scale,) = W[f"{p}_layer_scale"]
                    w2, b2 = w2 * scale[None, :], b2 * scale
                y = g.op("MatMul", [y, g.const(w2, f"{p}_w2")], p)
                y = g.op("Add", [y, g.const(b2, f"{p}_b2")], p)
            x = g.op("Add", [x, y], p)
        values[f"stage{stage + 1}"] = (x, [None, h, w, int(spec.dims[stage])])
    kinds = {kind for _, kind in outputs}
    if "dense" in kinds:
        dense = _layer_norm(g, x, W["head_norm"], "head_dense")
        values["dense"] = (dense, [None, h, w, int(spec.dims[-1])])
    if kinds & {"logits", "pooled"}:
        if opset >= 18:  # axes became an input in opset 18
            axes = g.const(np.array([1, 2], np.int64), "pool_axes")
            x = g.op("ReduceMean", [x, axes], "head", keepdims=0)
        else:
            x = g.op("ReduceMean", [x], "head", keepdims=0, axes=[1, 2])
        x = _layer_norm(g, x, W["head_norm"], "head_norm")
        values["pooled"] = (x, [None, int(spec.dims[-1])])
        if "logits" in kinds:
            wf, bf = W["head_fc"]
            x = g.op("MatMul", [x, g.const(wf, "head_fc_w")], "head")
            x = g.op("Add", [x, g.const(bf, "head_fc_b")], "head")
            values["logits"] = (x, [None, int(wf.shape[1])])

    helper = g.helper
    graph_outputs = []
    for name, (_, kind) in zip(names, outputs):
        value, shape = values[kind]
        g.nodes.append(helper.make_node("Identity", [value], [name], name=f"output_{name}"))
        dims = ["batch", *(d if d is not None else f"{name}_{i}" for i, d in enumerate(shape[1:]))]
        graph_outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
    size = [d if d is not None else n for d, n in ((height, "height"), (width, "width"))]
    graph = helper.make_graph(
        g.nodes,
        f"{model.name}_{height or 'H'}x{width or 'W'}",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", *size, 3])],
        graph_outputs,
        g.initializers,
    )
    onnx_model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="convnext_keras"
    )
    onnx_model.ir_version = min(onnx_model.ir_version, 10)  # what onnxruntime >= 1.20 reads
    return onnx_model


def onnx_session(graph, threads: int | None = None):
    """An onnxruntime CPU session of ``graph`` (an ``onnx.ModelProto`` or its bytes) with the
    engine's settings: every graph optimisation, ``threads`` intra-op threads (None:
    onnxruntime's default, one per physical core) and sequential execution."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    data = graph if isinstance(graph, bytes) else graph.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def nhwc_batch(images, min_size: int) -> np.ndarray:
    """``images`` as the contiguous float32 NHWC batch an onnxruntime session takes.

    Raises ``ValueError`` for another shape than ``(batch, height, width, 3)`` or a height or
    width below ``min_size`` pixels."""
    x = np.ascontiguousarray(np.asarray(images), dtype=np.float32)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(
            f"Expected an NHWC batch of RGB images (batch, height, width, 3), got shape "
            f"{x.shape}; add a batch axis with x[None] for a single image."
        )
    if min(x.shape[1:3]) < min_size:
        raise ValueError(too_small_message(x.shape[1], x.shape[2], min_size))
    return x


class OnnxRunner:
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
    ``precision`` other than ``"fp32"``/``"int8"``, ``ImportError`` without onnxruntime.
    """

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
        if not onnxruntime_available():
            raise ImportError(
                "OnnxRunner needs onnxruntime: pip install onnxruntime "
                "(or pip install 'convnext-keras[export]')."
            )
        self.model = model
        self.min_size = variant_of(model).min_input_size
        self.precision = precision
        self.threads = _threads(threads)
        self.calibration = None
        if precision == INT8:
            self.calibration = (
                calibration_images() if calibration is None else _as_calibration(calibration)
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
                _check_input_size(variant_of(self.model), *key)
                key = None
            if key not in self._sessions:
                if key is None:
                    graph = quantize_int8(self.model, self.calibration)
                    self.quantization = {p.key: p.value for p in graph.metadata_props}
                else:
                    graph = build_onnx_graph(self.model, *key)
                self._sessions[key] = onnx_session(graph, self.threads)
            return self._sessions[key]

    def __call__(self, images) -> np.ndarray:
        x = nhwc_batch(images, self.min_size)
        return self.session(x.shape[1], x.shape[2]).run(None, {"images": x})[0]

    predict_on_batch = __call__


class OpenVinoRunner:
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

    Raises ``ValueError`` for models it cannot run (:func:`unsupported_reason`),
    ``ImportError`` without OpenVINO (``pip install openvino``).
    """

    #: Shapes whose compiled graphs are kept (a run's batch size, its last smaller batch, ...).
    CACHED_SHAPES = 4

    def __init__(self, model, *, threads: int | None = None):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"OpenVinoRunner cannot run {model.name!r}: {reason}.")
        if not openvino_available():
            raise ImportError(
                "The openvino engine needs OpenVINO: pip install openvino "
                "(or pip install 'convnext-keras[openvino]'); engine 'auto' uses onnxruntime "
                "without it."
            )
        self.model = model
        self.min_size = variant_of(model).min_input_size
        self.threads = _threads(threads)
        self._requests: dict[tuple[int, int], object] = {}
        self._lock = threading.Lock()

    def _request(self, shape: tuple[int, ...]):
        if shape not in self._requests:
            import openvino as ov

            if len(self._requests) >= self.CACHED_SHAPES:
                self._requests.pop(next(iter(self._requests)))
            core = ov.Core()
            graph = core.read_model(
                build_onnx_graph(self.model, *shape[1:3]).SerializeToString(), b""
            )
            graph.reshape({graph.inputs[0].get_any_name(): list(shape)})
            config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
            if self.threads:
                config["INFERENCE_NUM_THREADS"] = self.threads
            self._requests[shape] = core.compile_model(graph, "CPU", config).create_infer_request()
        return self._requests[shape]

    def __call__(self, images) -> np.ndarray:
        x = nhwc_batch(images, self.min_size)
        with self._lock:
            request = self._request(x.shape)
            request.infer({0: x})
            return np.array(request.get_output_tensor(0).data, copy=True)

    predict_on_batch = __call__


# ----------------------------------------------------------------------------------------------
# Opt-in int8: onnxruntime's static post-training quantization of the float graph

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

    if source is None:
        files = sample_photos()
        if not files:
            raise ValueError(
                "int8 calibrates on real photos and none were given: pass calibration=FOLDER "
                "(CLI: --calibration DIR) with photos like the ones you will classify, or "
                "install scikit-image (pip install scikit-image) for its sample photos."
            )
        return files
    paths = [Path(source)] if isinstance(source, (str, os.PathLike)) else [Path(p) for p in source]
    known = set(Image.registered_extensions())
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in known
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
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


def _as_calibration(images) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(images), dtype=np.float32)
    if x.ndim != 4 or x.shape[-1] != 3 or len(x) == 0:
        raise ValueError(
            "calibration must be preprocessed images (n, height, width, 3) as the model takes "
            f"them (runtime.calibration_images(files, config) makes them), got shape {x.shape}."
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
    import onnx
    from onnxruntime import quantization as q

    reason = unsupported_reason(model)
    if reason:
        raise ValueError(f"Cannot quantize {model.name!r}: {reason}.")
    images = _as_calibration(calibration)
    _check_input_size(variant_of(model), images.shape[1], images.shape[2])
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
        onnx.save(build_onnx_graph(model, None, None), source)
        q.quant_pre_process(source, prepared, skip_symbolic_shape=True)  # as onnxruntime advises
        head = [n.name for n in onnx.load(prepared).graph.node if n.name.startswith("head")]
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
    """
    check_engine(engine, precision)
    if precision == INT8:
        return OnnxRunner(model, precision=INT8, calibration=calibration), "onnxruntime"
    if engine == "auto":
        engine = "keras"
        if not unsupported_reason(model) and not accelerator():
            engine = cpu_graph_engine() or "keras"
    if engine == "keras":
        return model.predict_on_batch, "keras"
    if engine == "openvino":
        return OpenVinoRunner(model), "openvino"
    return OnnxRunner(model), "onnxruntime"
