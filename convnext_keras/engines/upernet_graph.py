"""UperNet-ConvNeXt as an ONNX graph built from the Keras model's weights: the ONNX export of
the segmentation models and their CPU engines, OpenVINO and onnxruntime (no TensorFlow, no
tf2onnx).

The backbone is :func:`convnext_keras.engines.onnx_graph.build_onnx_graph`'s (the classifiers' CPU
engine: its stage outputs); the decoder follows it in NCHW, the layout of ONNX's ``Conv``:

* each conv + BatchNorm (inference mode) is one ``Conv`` whose weights and bias carry the
  BatchNorm (``W * gamma / sqrt(var + eps)``, ``beta - mean * gamma / sqrt(var + eps)``),
  then ``Relu``;
* adaptive average pooling is two ``MatMul`` with averaging matrices made from the input's
  height and width at run time (PyTorch's bins), so one graph serves every input size;
* every bilinear resize is ``Resize(mode="linear", coordinate_transformation_mode=
  "half_pixel")``, to the size of the map it joins (PyTorch's ``align_corners=False``).

The graph takes ``images`` (float32 NHWC, normalised) and returns ``logits`` (float32 NHWC,
``(batch, height, width, classes)``), as the Keras model; tested against it on every backend.
"""

from __future__ import annotations

import threading

import numpy as np

from convnext_keras import registry
from convnext_keras.engines import graph_files, onnx_graph, runners

#: The opset of the graph (the backbone's: ``Gelu``).
OPSET = onnx_graph.OPSET


def _backbone(model):
    """The model's ConvNeXt pyramid (stage outputs before the stage norms), as a Keras model
    sharing its layers: what :func:`convnext_keras.engines.onnx_graph.build_onnx_graph` rebuilds."""
    import keras

    from convnext_keras.nets.convnext import PYRAMID_OUTPUTS, variant_of

    spec = variant_of(model)
    outputs = {
        key: model.get_layer(f"stage{stage}_block{depth - 1}_add").output
        for stage, (key, depth) in enumerate(zip(PYRAMID_OUTPUTS, spec.depths))
    }
    return keras.Model(model.inputs, outputs, name=model.name)


def unsupported_reason(model) -> str | None:
    """Why :func:`build_onnx_graph` cannot rebuild ``model`` (None when it can): it must be a
    float32 UperNet built by :func:`convnext_keras.nets.upernet.build_upernet`."""
    from convnext_keras.nets.convnext import non_float32_layer, variant_of

    names = {layer.name for layer in model.layers}
    if "decode_conv_seg" not in names or variant_of(model) is None:
        return "it is not a UperNet-ConvNeXt built by convnext_keras"
    mixed = non_float32_layer(model)
    if mixed:
        return f"it computes in {mixed[1]} (layer {mixed[0]!r}); the graph is float32 only"
    return onnx_graph.graph_unsupported_reason(_backbone(model))


class _Decoder:
    """The decoder's nodes, appended to the backbone graph (names prefixed, unique)."""

    def __init__(self, weights: dict[str, list[np.ndarray]]):
        self.g = onnx_graph._GraphBuilder()
        self.weights = weights

    def const(self, value, name):
        return self.g.const(value, name)

    def op(self, op_type, inputs, name, **attrs):
        return self.g.op(op_type, inputs, name, **attrs)

    def ints(self, values, name):
        return self.const(np.asarray(values, np.int64), name)

    def shape(self, x, start: int, end: int, name: str):
        """``Shape(x)[start:end]`` (int64)."""
        return self.op(
            "Slice",
            [
                self.op("Shape", [x], name),
                self.ints([start], f"{name}_s"),
                self.ints([end], f"{name}_e"),
            ],
            name,
        )

    def conv_bn_relu(self, x, name: str):
        (kernel,) = self.weights[f"{name}_conv"]  # Keras (kh, kw, in, out)
        gamma, beta, mean, var = (w.astype(np.float64) for w in self.weights[f"{name}_bn"])
        scale = gamma / np.sqrt(var + registry.BATCH_NORM_EPSILON)
        w = kernel.transpose(3, 2, 0, 1).astype(np.float64) * scale[:, None, None, None]
        b = beta - mean * scale
        size = kernel.shape[0]
        y = self.op(
            "Conv",
            [
                x,
                self.const(w.astype(np.float32), f"{name}_w"),
                self.const(b.astype(np.float32), f"{name}_b"),
            ],
            name,
            kernel_shape=[size, size],
            pads=[size // 2] * 4,
        )
        return self.op("Relu", [y], name)

    def resize(self, x, height_width, name: str):
        """``x`` (NCHW) resized bilinearly to ``height_width`` (an int64 (2,) tensor)."""
        sizes = self.op("Concat", [self.shape(x, 0, 2, f"{name}_nc"), height_width], name, axis=0)
        return self.op(
            "Resize",
            [x, "", "", sizes],
            name,
            mode="linear",
            coordinate_transformation_mode="half_pixel",
        )

    def pooling_matrix(self, length, bins: int, name: str):
        """``(bins, length)`` float32 averaging matrix of PyTorch's adaptive pooling bins over
        an axis of ``length`` (an int64 (1,) tensor)."""
        index = np.arange(bins, dtype=np.int64)
        start = self.op(
            "Div",
            [
                self.op("Mul", [self.ints(index, f"{name}_i"), length], name),
                self.ints([bins], f"{name}_n"),
            ],
            name,
        )
        upper = self.op(
            "Add",
            [
                self.op("Mul", [self.ints(index + 1, f"{name}_i1"), length], name),
                self.ints([bins - 1], f"{name}_n1"),
            ],
            name,
        )
        end = self.op("Div", [upper, self.ints([bins], f"{name}_n2")], name)
        scalar = self.op("Squeeze", [length, self.ints([0], f"{name}_ax")], name)
        position = self.op(
            "Range", [self.ints(0, f"{name}_zero"), scalar, self.ints(1, f"{name}_one")], name
        )
        row = self.op("Unsqueeze", [position, self.ints([0], f"{name}_r")], name)  # (1, length)
        column = self.ints([1], f"{name}_c")
        after = self.op("GreaterOrEqual", [row, self.op("Unsqueeze", [start, column], name)], name)
        before = self.op("Less", [row, self.op("Unsqueeze", [end, column], name)], name)
        inside = self.op("Cast", [self.op("And", [after, before], name)], name, to=1)  # float
        count = self.op(
            "Cast",
            [self.op("Unsqueeze", [self.op("Sub", [end, start], name), column], name)],
            name,
            to=1,
        )
        return self.op("Div", [inside, count], name)

    def adaptive_pool(self, x, bins: int, name: str):
        """``AdaptiveAvgPool2d(bins)`` of ``x`` (NCHW)."""
        rows = self.pooling_matrix(self.shape(x, 2, 3, f"{name}_h"), bins, f"{name}_rows")
        cols = self.pooling_matrix(self.shape(x, 3, 4, f"{name}_w"), bins, f"{name}_cols")
        y = self.op("MatMul", [rows, x], name)  # (bins, H) @ (N, C, H, W) -> (N, C, bins, W)
        return self.op("MatMul", [y, self.op("Transpose", [cols], name, perm=[1, 0])], name)


def build_onnx_graph(
    model, height: int | None, width: int | None, *, opset: int = OPSET, output_names=None
):
    """The ONNX graph (``onnx.ModelProto``) of a UperNet-ConvNeXt built by this library.

    Input ``images``: float32 NHWC ``(batch, height, width, 3)``, normalised as for the Keras
    model; ``height`` / ``width`` None make that axis dynamic.  Output ``logits`` (or
    ``output_names[0]``): ``(batch, height, width, classes)`` float32.  Raises ``ValueError``
    for a model it cannot rebuild (:func:`unsupported_reason`) or an input below the
    network's 32x32.
    """
    onnx = onnx_graph.require_onnx()
    helper = onnx.helper

    from convnext_keras.nets.convnext import PYRAMID_OUTPUTS

    reason = unsupported_reason(model)
    if reason:
        raise ValueError(f"Cannot build an ONNX graph for {model.name!r}: {reason}.")
    stages = list(PYRAMID_OUTPUTS)
    proto = onnx_graph.build_onnx_graph(
        _backbone(model), height, width, opset=opset, output_names=stages
    )
    d = _Decoder(onnx_graph._weights(model))
    features = []
    for i, stage in enumerate(stages):
        x = onnx_graph._layer_norm(
            d.g, stage, d.weights[f"stage{i}_output_norm"], f"stage{i}_output_norm"
        )
        features.append(d.op("Transpose", [x], f"decode_in{i}", perm=[0, 3, 1, 2]))
    top = features[-1]
    top_size = d.shape(top, 2, 4, "decode_top_hw")
    pooled = [top]
    scales = sum(
        1 for name in d.weights if name.startswith("decode_ppm") and name.endswith("_conv")
    )
    for i in range(scales):
        bins = model.get_layer(f"decode_ppm{i}_pool").output_size
        y = d.conv_bn_relu(d.adaptive_pool(top, bins, f"decode_ppm{i}_pool"), f"decode_ppm{i}")
        pooled.append(d.resize(y, top_size, f"decode_ppm{i}_resize"))
    laterals = [d.conv_bn_relu(f, f"decode_lateral{i}") for i, f in enumerate(features[:-1])]
    laterals.append(
        d.conv_bn_relu(d.op("Concat", pooled, "decode_ppm", axis=1), "decode_bottleneck")
    )
    for i in range(len(laterals) - 1, 0, -1):
        size = d.shape(laterals[i - 1], 2, 4, f"decode_top_down{i}_hw")
        above = d.resize(laterals[i], size, f"decode_top_down{i}")
        laterals[i - 1] = d.op("Add", [laterals[i - 1], above], f"decode_top_down{i}")
    outputs = [d.conv_bn_relu(x, f"decode_fpn{i}") for i, x in enumerate(laterals[:-1])]
    outputs.append(laterals[-1])
    finest = d.shape(outputs[0], 2, 4, "decode_fpn_hw")
    outputs[1:] = [d.resize(x, finest, f"decode_fpn{i}") for i, x in enumerate(outputs[1:], 1)]
    y = d.conv_bn_relu(d.op("Concat", outputs, "decode_fpn", axis=1), "decode_fpn_bottleneck")
    kernel, bias = d.weights["decode_conv_seg"]
    y = d.op(
        "Conv",
        [
            y,
            d.const(kernel.transpose(3, 2, 0, 1), "decode_conv_seg_w"),
            d.const(bias, "decode_conv_seg_b"),
        ],
        "decode_conv_seg",
        kernel_shape=[1, 1],
    )
    y = d.resize(y, d.shape("images", 1, 3, "decode_image_hw"), "decode_resize")
    y = d.op("Transpose", [y], "decode_out", perm=[0, 2, 3, 1])
    name = (output_names or ["logits"])[0]
    d.g.nodes.append(helper.make_node("Identity", [y], [name], name=f"output_{name}"))

    graph = proto.graph
    kept = {o.name for o in graph.output}
    # The backbone's stage outputs become the decoder's inputs, no longer graph outputs.
    nodes = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in kept)]
    rename = {
        n.output[0]: n.input[0]
        for n in graph.node
        if n.op_type == "Identity" and n.output[0] in kept
    }
    for node in d.g.nodes:
        node.input[:] = [rename.get(i, i) for i in node.input]
    del graph.node[:]
    graph.node.extend(nodes + d.g.nodes)
    graph.initializer.extend(d.g.initializers)
    del graph.output[:]
    classes = int(bias.shape[0])
    dims = ["batch", height or "height", width or "width", classes]
    graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, dims))
    graph.name = f"{model.name}_{height or 'H'}x{width or 'W'}"
    return proto


class SegmentationRunner(runners._GraphRunner):
    """Inference of a float32 UperNet-ConvNeXt on a CPU graph engine - OpenVINO or
    onnxruntime: ``runner(images)`` takes an NHWC float batch and returns the logits
    ``(batch, H, W, classes)`` as numpy, the same as ``model.predict_on_batch(images)``.  One
    graph per input height/width (a static size per window: built on first use and kept; the
    sliding windows of a model all share one size), any batch size.  With ``fallback`` set
    (:func:`inference_function`, ``"auto"``), an engine failure gives way to Keras in one line.

    Raises ``ValueError`` for a model it cannot run (:func:`unsupported_reason`),
    :class:`convnext_keras.errors.MissingDependencyError` without the engine.
    """

    #: Sizes whose compiled graphs are kept (whole-image inference meets a new size per image).
    CACHED_SIZES = 4

    def __init__(self, model, *, engine: str = "onnxruntime", threads: int | None = None):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"The {engine} engine cannot run {model.name!r}: {reason}.")
        if engine not in graph_files.GRAPH_ENGINES:
            raise ValueError(f"engine must be 'openvino' or 'onnxruntime', got {engine!r}.")
        if engine == "onnxruntime":
            runners.check_onnxruntime("The onnxruntime engine", "export")
        else:
            runners.check_openvino()
        from convnext_keras.nets.convnext import variant_of

        self.model = model
        self.engine = engine
        self.min_size = variant_of(model).min_input_size
        self.threads = threads
        self._runners: dict[tuple[int, int], graph_files.GraphRunner] = {}
        self._lock = threading.Lock()

    def runner(self, height: int, width: int) -> graph_files.GraphRunner:
        """The engine's runner of the graph for inputs of this size (built once, then kept)."""
        key = (int(height), int(width))
        with self._lock:
            if key not in self._runners:
                if len(self._runners) >= self.CACHED_SIZES:
                    self._runners.pop(next(iter(self._runners)))
                graph = build_onnx_graph(self.model, *key).SerializeToString()
                self._runners[key] = graph_files.GraphRunner(
                    graph, self.engine, threads=self.threads
                )
            return self._runners[key]

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.runner(x.shape[1], x.shape[2])(x)


def inference_function(model, engine: str = "auto"):
    """``(fn, engine name)`` for a segmentation model: on a CPU, for a float32 model, the
    first installed of :data:`convnext_keras.engines.graph_files.SEGMENTATION_ENGINES`
    (``"auto"``; the faster on the CPUs measured, BENCHMARKS.md), else Keras'
    ``predict_on_batch``; ``"openvino"`` / ``"onnxruntime"`` insist, ``"keras"`` always uses
    Keras (see :func:`convnext_keras.engines.runners.inference_function`; with ``"auto"`` an
    engine failure gives way to Keras with one line saying why)."""
    runners.check_engine(engine)
    chosen = engine
    if engine == "auto":
        chosen = "keras"
        if not unsupported_reason(model) and not runners.accelerator():
            chosen = graph_files.cpu_graph_engine(segmentation=True) or "keras"
    if chosen == "keras":
        return model.predict_on_batch, "keras"
    runner = SegmentationRunner(model, engine=chosen)
    if engine == "auto":  # an engine failure gives way to Keras, in one line
        runner.fallback = model.predict_on_batch
    return runner, chosen
