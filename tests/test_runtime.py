"""The onnxruntime engine computes the same function as the PyTorch reference and Keras."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import torch_reference as ref

import convnext_keras as ck
from convnext_keras import registry, runtime

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def atto_checkpoint(tmp_path_factory):
    """A transformers ConvNext-atto with well-spread random weights, in the official layout."""
    spec = registry.VARIANTS["atto"]
    model = ref.hf_model(spec.depths, spec.dims, 1000, seed=3)
    path = ref.save_official(model, tmp_path_factory.mktemp("atto") / "atto.pth")
    return model, path


def _images(n, h, w, seed=0):
    return np.random.default_rng(seed).standard_normal((n, h, w, 3), dtype=np.float32)


@pytest.mark.backends
@pytest.mark.parametrize("size", [(64, 64), (70, 45)], ids=["64x64", "70x45-uneven"])
def test_runner_equals_torch_reference(atto_checkpoint, size):
    """Logits and pooled features equal transformers' ConvNext, also for sizes that are not
    multiples of the stride (VALID patches drop the last rows/columns, as in PyTorch)."""
    hf, path = atto_checkpoint
    images = _images(2, *size)
    expected = ref.hf_outputs(hf, images)
    classifier = ck.load_model("convnext_atto", weights=path)
    pooled = ck.load_model("convnext_atto", weights=path, features="pooled")
    logits = runtime.OnnxRunner(classifier)(images)
    features = runtime.OnnxRunner(pooled)(images)
    assert logits.shape == (2, 1000) and features.shape == (2, 320)
    np.testing.assert_allclose(logits, expected["logits"], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(features, expected["pooled"], atol=TOLERANCE, rtol=0)
    # ... and Keras' own forward pass on the same weights.
    np.testing.assert_allclose(
        logits, np.asarray(classifier.predict_on_batch(images)), atol=TOLERANCE, rtol=0
    )


def test_runner_without_layer_scale_and_any_batch(atto_checkpoint):
    """Models built without layer scale, and batch sizes 1 and 3 through one cached session."""
    model = ck.build_model("atto", num_classes=7, layer_scale_init=None)
    runner = runtime.OnnxRunner(model, threads=1)
    for n in (1, 3):
        images = _images(n, 64, 64, seed=n)
        np.testing.assert_allclose(
            runner(images), model.predict_on_batch(images), atol=TOLERANCE, rtol=0
        )
    assert list(runner._sessions) == [(64, 64)]


def test_onnx_graph_passes_the_checker():
    import onnx

    graph = runtime.build_onnx_graph(ck.build_model("atto"), 64, 64)
    onnx.checker.check_model(graph, full_check=True)
    ops = {n.op_type for n in graph.graph.node}
    assert "Gelu" in ops and "LayerNormalization" in ops
    assert "Mul" not in ops  # layer scale folded into pwconv2


def test_opset_17_graph_with_dynamic_size_equals_opset_20():
    """Opset 17 writes GELU in its erf form and ReduceMean with an axes attribute; with a dynamic
    height/width the patch reshapes read the size at run time."""
    import onnx
    import onnxruntime as ort

    model = ck.build_model("atto")
    graphs = {17: runtime.build_onnx_graph(model, None, None, opset=17)}
    graphs[20] = runtime.build_onnx_graph(model, 70, 45)
    onnx.checker.check_model(graphs[17], full_check=True)
    assert "Gelu" not in {n.op_type for n in graphs[17].graph.node}
    images = _images(2, 70, 45, seed=3)
    outs = {
        opset: ort.InferenceSession(g.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"images": images}
        )[0]
        for opset, g in graphs.items()
    }
    np.testing.assert_allclose(outs[17], outs[20], atol=1e-5, rtol=0)
    np.testing.assert_allclose(outs[17], model.predict_on_batch(images), atol=TOLERANCE, rtol=0)
    with pytest.raises(ValueError, match="opset must be >= 17"):
        runtime.build_onnx_graph(model, 64, 64, opset=13)


def test_a_model_with_layers_of_its_own_stays_on_keras():
    """A head added after the pooled features must not be skipped by the graph builder."""
    fe = ck.build_model("atto", head="pooled")
    model = keras.Model(fe.input, keras.layers.Dense(3, name="my_head")(fe.output))
    assert "my_head" in runtime.unsupported_reason(model)
    assert runtime.inference_function(model)[1] == "keras"
    with pytest.raises(ValueError, match="my_head"):
        runtime.build_onnx_graph(model, 64, 64)


def test_inference_function_picks_the_engine():
    classifier = ck.build_model("atto")
    fn, engine = runtime.inference_function(classifier)
    assert engine == "onnxruntime" and isinstance(fn, runtime.OnnxRunner)
    fn, engine = runtime.inference_function(classifier, "keras")
    assert engine == "keras" and fn == classifier.predict_on_batch
    pyramid = ck.build_model("atto", head="pyramid")
    assert runtime.inference_function(pyramid)[1] == "keras"
    with pytest.raises(ValueError, match="pyramid"):
        runtime.inference_function(pyramid, "onnxruntime")
    with pytest.raises(ValueError, match="engine must be one of"):
        runtime.inference_function(classifier, "tensorrt")


def test_cli_engine_choices_are_the_runtime_engines():
    from convnext_keras.cli import _app

    assert _app.ENGINES == runtime.ENGINES


def test_mixed_precision_models_stay_on_keras():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = ck.build_model("atto")
    finally:
        keras.config.set_dtype_policy(previous)
    assert "bfloat16" in runtime.unsupported_reason(model)
    assert runtime.inference_function(model)[1] == "keras"


def test_bad_inputs_are_explained():
    runner = runtime.OnnxRunner(ck.build_model("atto"))
    with pytest.raises(ValueError, match=r"add a batch axis"):
        runner(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"NHWC"):
        runner(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(ValueError, match="at least 32x32 pixels .*; got 16x40"):
        runner(np.ones((1, 16, 40, 3), np.float32))
    with pytest.raises(ValueError, match="at least 32x32 pixels .*; got 31x64"):
        runtime.build_onnx_graph(ck.build_model("atto"), 31, 64)
    with pytest.raises(ValueError, match="not a ConvNeXt"):
        runtime.OnnxRunner(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]))
