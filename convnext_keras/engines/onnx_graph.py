"""This library's ONNX graph of a built ConvNeXt, arranged for the CPU engines.

:func:`build_onnx_graph` writes the graph straight from a built Keras ConvNeXt's weights - no
TensorFlow, no tf2onnx - arranged for onnxruntime's and OpenVINO's CPU kernels:

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
height/width and opset 17 or 20; ``convnext export --format onnx`` writes it, and the runners of
:mod:`.runners` run it.  Only models made of this library's ConvNeXt layers and nothing else
are rebuilt (:func:`graph_unsupported_reason`); anything else stays on Keras.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from convnext_keras import registry
from convnext_keras.errors import require
from convnext_keras.nets.convnext import non_float32_layer, variant_of
from convnext_keras.nets.layers import too_small_message

#: ONNX opset of the graph (``Gelu`` is an operator from opset 20).
OPSET = 20
#: Protobuf serialises at most 2 GiB: a graph whose weights pass this many bytes is written in
#: ONNX's external-data format (the weights in a file beside the graph; 64 MiB are left for the
#: nodes and names).  ConvNeXt V2-H (660M parameters, 2.6 GB) is over it, ConvNeXt-XL is under.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


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


def require_onnx(purpose: str = "This library's ONNX graph", extra: str = "export"):
    """The ``onnx`` module, or :class:`convnext_keras.errors.MissingDependencyError` naming
    ``extra``."""
    return require("onnx", extra=extra, purpose=purpose)


class _GraphBuilder:
    """Accumulates ONNX nodes and initializers, every name unique.

    A constant asked for under a name already taken reuses it when the value is the same (the
    ``1.0`` of GELU and of GRN in one block) and gets a new name otherwise: onnxruntime warns
    about every duplicate initializer name, and a duplicate with another value would be wrong.
    """

    def __init__(self):
        onnx = require_onnx()

        self.helper, self.numpy_helper = onnx.helper, onnx.numpy_helper
        self.nodes, self.initializers = [], []
        self._count = 0
        self._consts: dict[str, np.ndarray] = {}

    def const(self, array, name) -> str:
        array = np.asarray(array)
        base, n = name, 1
        while name in self._consts:
            known = self._consts[name]
            if known.dtype == array.dtype and np.array_equal(known, array):
                return name
            n += 1
            name = f"{base}_{n}"
        self._consts[name] = array
        self.initializers.append(self.numpy_helper.from_array(array, name))
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


def check_input_size(spec, height: int | None, width: int | None) -> None:
    """``ValueError`` for a height/width below what the network takes (None: dynamic)."""
    for side in (height, width):
        if side is not None and side < spec.min_input_size:
            raise ValueError(too_small_message(height, width, spec.min_input_size))


def weight_bytes(graph) -> int:
    """Bytes of an ``onnx.ModelProto``'s initializers (their shapes times their element sizes,
    read without serialising anything)."""
    onnx = require_onnx()

    total = 0
    for tensor in graph.graph.initializer:
        size = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        total += size * int(np.prod(tensor.dims, dtype=np.int64))
    return total


def needs_external_data(graph, threshold: int | None = None) -> bool:
    """Whether ``graph``'s weights pass ``threshold`` bytes (default
    :data:`EXTERNAL_DATA_THRESHOLD`), so that it must be saved with external data."""
    limit = EXTERNAL_DATA_THRESHOLD if threshold is None else threshold
    return weight_bytes(graph) > limit


def data_file(path) -> Path:
    """The external-data file of the ONNX file ``path``: ``<path>.data`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def save_graph(graph, path, *, threshold: int | None = None) -> list[Path]:
    """Write ``graph`` (an ``onnx.ModelProto``) to ``path``; returns the files written.

    Up to ``threshold`` bytes of weights (default :data:`EXTERNAL_DATA_THRESHOLD`) one file;
    above it, ONNX's external-data format: the graph in ``path`` and every tensor over 1 KiB in
    :func:`data_file` (``<name>.onnx.data``) beside it, found by its relative name, so the two
    files move together.  onnxruntime (``InferenceSession(path)``), OpenVINO
    (``Core().read_model(path)``) and ``onnx.load(path)`` read both.  Saving with external data
    moves the weights out of ``graph`` (it keeps references to the data file).
    """
    onnx = require_onnx()

    path = Path(path)
    if not needs_external_data(graph, threshold):
        onnx.save_model(graph, str(path))
        return [path]
    data = data_file(path)
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(
        graph,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )
    return [path, data]


class GraphFiles:
    """A graph as an engine loads it: ``source`` is its serialised bytes, or - for a graph over
    the external-data threshold - the path of the graph saved with its data file in a temporary
    folder, which lives as long as this object (keep it with the engine's session: engines may
    map the data file instead of copying it)."""

    def __init__(self, graph, threshold: int | None = None):
        self._folder = None
        if isinstance(graph, bytes):
            self.source = graph
        elif needs_external_data(graph, threshold):
            import tempfile

            self._folder = tempfile.TemporaryDirectory(prefix="convnext-graph-")
            path = Path(self._folder.name) / "graph.onnx"
            save_graph(graph, path, threshold=threshold)
            self.source = str(path)
        else:
            self.source = graph.SerializeToString()

    @property
    def external(self) -> bool:
        """Whether the graph is a file with external data (not bytes)."""
        return self._folder is not None

    def close(self) -> None:
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


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
    TensorProto = require_onnx().TensorProto

    outputs = _graph_outputs(model)
    if isinstance(outputs, str):
        raise ValueError(f"Cannot build an ONNX graph for {model.name!r}: {outputs}.")
    if opset < 17:
        raise ValueError(f"opset must be >= 17 (LayerNormalization), got {opset}.")
    names = output_names or [key or kind for key, kind in outputs]
    if len(names) != len(outputs):
        raise ValueError(f"{model.name!r} has {len(outputs)} outputs, got names {names}.")
    spec = variant_of(model)
    check_input_size(spec, height, width)
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
