"""The CPU engines (onnxruntime and OpenVINO on this library's ONNX graph) compute the same
function as the PyTorch reference and Keras."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import torch_reference as ref

import convnext_keras as ck
from convnext_keras import registry
from convnext_keras.engines import graph_files, onnx_graph, quantization, runners
from convnext_keras.nets.convnext import dtype_policy

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
    logits = runners.OnnxRunner(classifier)(images)
    features = runners.OnnxRunner(pooled)(images)
    assert logits.shape == (2, 1000) and features.shape == (2, 320)
    np.testing.assert_allclose(logits, expected["logits"], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(features, expected["pooled"], atol=TOLERANCE, rtol=0)
    # OpenVINO on the same graph, in float32 (never its bfloat16 default on CPUs that have it).
    openvino = runners.OpenVinoRunner(classifier)
    np.testing.assert_allclose(openvino(images), expected["logits"], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(
        runners.OpenVinoRunner(pooled)(images), expected["pooled"], atol=TOLERANCE, rtol=0
    )
    # ... and Keras' own forward pass on the same weights.
    np.testing.assert_allclose(
        logits, np.asarray(classifier.predict_on_batch(images)), atol=TOLERANCE, rtol=0
    )


@pytest.fixture(scope="module")
def atto_v2_checkpoint(tmp_path_factory):
    """A transformers ConvNextV2-atto (GRN scale and shift far from zero), official layout."""
    model = ref.reference(registry.VARIANTS["convnextv2_atto"], seed=3)
    return model, ref.save_official(model, tmp_path_factory.mktemp("atto_v2") / "atto_v2.pt")


@pytest.mark.backends
def test_runner_runs_convnext_v2_with_grn(atto_v2_checkpoint):
    """GRN (folded into per-sample pwconv2 weights): logits and pooled features equal
    transformers' ConvNextV2 within 1e-4, for batch 1 and 3 through one session, at an uneven
    size; the graph also equals Keras' pyramid with a dynamic size (opset 17 and 20)."""
    import onnxruntime as ort

    hf, path = atto_v2_checkpoint
    classifier = ck.load_model("convnextv2_atto_1k_224", weights=path)
    pooled = ck.load_model("convnextv2_atto_1k_224_fe", weights=path)
    runner, features = runners.OnnxRunner(classifier), runners.OnnxRunner(pooled)
    for n in (1, 3):
        images = _images(n, 70, 45, seed=n)
        expected = ref.hf_outputs(hf, images)
        np.testing.assert_allclose(runner(images), expected["logits"], atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(features(images), expected["pooled"], atol=TOLERANCE, rtol=0)
    assert list(runner._sessions) == [(70, 45)]
    images = _images(3, 70, 45, seed=3)
    np.testing.assert_allclose(
        runners.OpenVinoRunner(classifier)(images),
        ref.hf_outputs(hf, images)["logits"],
        atol=TOLERANCE,
        rtol=0,
    )
    pyramid = ck.load_model("convnextv2_atto_1k_224", weights=path, features="pyramid")
    images = _images(2, 96, 64, seed=5)
    want = pyramid.predict_on_batch(images)
    for opset in (17, 20):
        graph = onnx_graph.build_onnx_graph(pyramid, None, None, opset=opset)
        session = ort.InferenceSession(
            graph.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        got = dict(
            zip([o.name for o in session.get_outputs()], session.run(None, {"images": images}))
        )
        for key in want:
            np.testing.assert_allclose(got[key], want[key], atol=TOLERANCE, rtol=0, err_msg=key)


def test_runner_without_layer_scale_and_any_batch(atto_checkpoint):
    """Models built without layer scale, and batch sizes 1 and 3 through one cached session."""
    model = ck.build_model("atto", num_classes=7, layer_scale_init=None)
    runner = runners.OnnxRunner(model, threads=1)
    for n in (1, 3):
        images = _images(n, 64, 64, seed=n)
        np.testing.assert_allclose(
            runner(images), model.predict_on_batch(images), atol=TOLERANCE, rtol=0
        )
    assert list(runner._sessions) == [(64, 64)]


def test_onnx_graph_passes_the_checker():
    import onnx

    graph = onnx_graph.build_onnx_graph(ck.build_model("atto"), 64, 64)
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
    graphs = {17: onnx_graph.build_onnx_graph(model, None, None, opset=17)}
    graphs[20] = onnx_graph.build_onnx_graph(model, 70, 45)
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
        onnx_graph.build_onnx_graph(model, 64, 64, opset=13)


def test_a_model_with_layers_of_its_own_stays_on_keras():
    """A head added after the pooled features must not be skipped by the graph builder."""
    fe = ck.build_model("atto", head="pooled")
    model = keras.Model(fe.input, keras.layers.Dense(3, name="my_head")(fe.output))
    assert "my_head" in onnx_graph.unsupported_reason(model)
    assert runners.inference_function(model)[1] == "keras"
    with pytest.raises(ValueError, match="my_head"):
        onnx_graph.build_onnx_graph(model, 64, 64)


def test_openvino_runner_any_batch_and_its_outputs_are_its_own():
    """Batches 1 and 3, one compiled graph per shape; a result is a copy, not a view of
    OpenVINO's output buffer that the next call overwrites."""
    model = ck.build_model("atto", num_classes=7, layer_scale_init=None)
    runner = runners.OpenVinoRunner(model, threads=1)
    first = runner(_images(1, 64, 64, seed=1))
    kept = first.copy()
    for n in (1, 3):
        images = _images(n, 64, 64, seed=n + 10)
        np.testing.assert_allclose(
            runner(images), model.predict_on_batch(images), atol=TOLERANCE, rtol=0
        )
    np.testing.assert_array_equal(first, kept)
    assert list(runner._requests) == [(1, 64, 64, 3), (3, 64, 64, 3)]
    with pytest.raises(ValueError, match="got shape"):
        runner(np.zeros((64, 64, 3), np.float32))


def test_inference_function_picks_the_engine(monkeypatch):
    classifier = ck.build_model("atto")
    # auto on a CPU: OpenVINO when installed, else onnxruntime, else Keras.
    fn, engine = runners.inference_function(classifier)
    assert engine == "openvino" and isinstance(fn, runners.OpenVinoRunner)
    monkeypatch.setattr(graph_files, "openvino_available", lambda: False)
    fn, engine = runners.inference_function(classifier)
    assert engine == "onnxruntime" and isinstance(fn, runners.OnnxRunner)
    with pytest.raises(ImportError, match=r'pip install "convnext-keras\[openvino\]"'):
        runners.inference_function(classifier, "openvino")
    monkeypatch.setattr(graph_files, "onnxruntime_available", lambda: False)
    assert runners.inference_function(classifier)[1] == "keras"
    monkeypatch.undo()
    fn, engine = runners.inference_function(classifier, "onnxruntime")
    assert engine == "onnxruntime" and isinstance(fn, runners.OnnxRunner)
    fn, engine = runners.inference_function(classifier, "keras")
    assert engine == "keras" and fn == classifier.predict_on_batch
    pyramid = ck.build_model("atto", head="pyramid")
    assert runners.inference_function(pyramid)[1] == "keras"
    for insisted in ("onnxruntime", "openvino"):
        with pytest.raises(ValueError, match="pyramid"):
            runners.inference_function(pyramid, insisted)
    with pytest.raises(ValueError, match="int8' runs on the onnxruntime engine only"):
        runners.inference_function(classifier, "openvino", precision="int8")
    with pytest.raises(ValueError, match="engine must be one of"):
        runners.inference_function(classifier, "tensorrt")


def test_cli_engine_choices_are_the_runtime_engines():
    from convnext_keras.cli import _app

    assert _app.ENGINES == runners.ENGINES


def test_mixed_precision_models_stay_on_keras():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = ck.build_model("atto")
    finally:
        keras.config.set_dtype_policy(previous)
    assert "bfloat16" in onnx_graph.unsupported_reason(model)
    assert runners.inference_function(model)[1] == "keras"


def test_bad_inputs_are_explained():
    runner = runners.OnnxRunner(ck.build_model("atto"))
    with pytest.raises(ValueError, match=r"add a batch axis"):
        runner(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"NHWC"):
        runner(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(ValueError, match="at least 32x32 pixels .*; got 16x40"):
        runner(np.ones((1, 16, 40, 3), np.float32))
    with pytest.raises(ValueError, match="at least 32x32 pixels .*; got 31x64"):
        onnx_graph.build_onnx_graph(ck.build_model("atto"), 31, 64)
    with pytest.raises(ValueError, match="not a ConvNeXt"):
        runners.OnnxRunner(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]))


# --- opt-in int8 (static post-training quantization by onnxruntime) ---------------------------


@pytest.fixture(scope="module")
def atto_int8(atto_checkpoint):
    """The well-spread atto classifier, its float32 runner and its int8 runner calibrated on
    every other sample photo (7 of 14; the other 7 are held out)."""
    _, path = atto_checkpoint
    model = ck.load_model("convnext_atto", weights=path)
    photos = quantization.calibration_images(None, "convnext_atto")
    int8 = runners.OnnxRunner(model, precision="int8", calibration=photos[::2])
    return model, runners.OnnxRunner(model), int8, photos


def test_int8_quantizes_the_matrix_products_only(atto_int8):
    """Stem, downsampling and pointwise products become integer products with one weight scale
    per output channel; LayerNorm, GELU, the depthwise convolution and the head stay float."""
    model, _, _, photos = atto_int8
    quantized = quantization.quantize_int8(model, photos[:2])
    graph = quantized.graph
    producer = {out: node for node in graph.node for out in node.output}
    inits = {i.name: i for i in graph.initializer}
    spec = registry.VARIANTS["atto"]
    products = [n for n in graph.node if n.op_type == "MatMul"]
    assert len(products) == 1 + (len(spec.depths) - 1) + 2 * sum(spec.depths)  # head: a Gemm
    for node in products:
        data, weight = (producer[name] for name in node.input)
        assert data.op_type == weight.op_type == "DequantizeLinear"
        assert inits[weight.input[0]].data_type == 3  # int8 weights
        out_channels = inits[weight.input[0]].dims[1]
        assert list(inits[weight.input[1]].dims) == [out_channels]  # per channel
    for node in graph.node:
        if node.op_type in ("LayerNormalization", "Gelu", "Conv", "Gemm"):
            assert all(
                name in inits or producer[name].op_type != "DequantizeLinear" for name in node.input
            ), node.name
    props = {p.key: p.value for p in quantized.metadata_props}
    assert props["convnext_keras.precision"] == "int8"
    assert props["convnext_keras.calibration_images"] == "2"


def test_int8_runner_runs_any_size_close_to_float32(atto_int8):
    """Random weights make top-1 meaningless (the trained proxy in test_finetune_learning.py
    measures agreement); here: shapes, one session for every size, and a bounded error."""
    _, fp32, int8, photos = atto_int8
    held_out = photos[1::2]
    got, want = int8(held_out), fp32(held_out)
    assert got.shape == want.shape == (len(held_out), 1000) and got.dtype == np.float32
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.1
    assert int8(_images(3, 70, 45)).shape == (3, 1000)
    assert list(int8._sessions) == [None]  # quantized once, dynamic height/width
    assert int8.quantization["convnext_keras.calibration_images"] == "7"
    # (main's wording since issue 17: "at least 32x32 pixels"; either passes until the merge)
    with pytest.raises(ValueError, match="total stride 32|at least 32x32 pixels"):
        int8(np.ones((1, 16, 16, 3), np.float32))


def test_int8_pooled_features(atto_checkpoint, atto_int8):
    """The ``_fe`` head (no classifier to exclude): pooled features close to float32."""
    photos = atto_int8[3]
    pooled = ck.load_model("convnext_atto", weights=atto_checkpoint[1], features="pooled")
    got = runners.OnnxRunner(pooled, precision="int8", calibration=photos[::2])(photos[1::2])
    want = runners.OnnxRunner(pooled)(photos[1::2])
    assert got.shape == want.shape == (7, 320)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.1


def test_int8_is_an_onnxruntime_choice_with_clear_errors(atto_int8, tmp_path):
    model = atto_int8[0]
    with pytest.raises(ValueError, match="int8' runs on the onnxruntime engine only"):
        runners.inference_function(model, "keras", precision="int8")
    with pytest.raises(ValueError, match="None or 'int8', got 'bf16'"):
        runners.inference_function(model, precision="bf16")
    with pytest.raises(ValueError, match="computes in fp32 or int8, got precision 'fp16'"):
        runners.OnnxRunner(model, precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16, int8"):
        runners.split_precision("int4")
    assert runners.split_precision("int8") == ("fp32", "int8")
    with pytest.raises(ValueError, match="'int8' is not a Keras dtype policy"):
        ck.load_model("convnext_atto", weights=None, precision="int8")
    assert runners.split_precision("bf16") == ("bf16", None)
    with pytest.raises(ValueError, match=r"calibration must be .*got shape \(224, 224, 3\)"):
        runners.OnnxRunner(model, precision="int8", calibration=np.zeros((224, 224, 3)))
    with pytest.raises(ValueError, match="NaN"):
        runners.OnnxRunner(model, precision="int8", calibration=np.full((1, 64, 64, 3), np.nan))
    (tmp_path / "notes.txt").write_text("not a photo")
    with pytest.raises(ValueError, match="No image files in"):
        quantization.calibration_images(tmp_path)
    with pytest.raises(FileNotFoundError, match="No such calibration image"):
        quantization.calibration_images(tmp_path / "missing")
    with dtype_policy("bf16"):
        bf16 = ck.build_model("atto")
    with pytest.raises(ValueError, match="computes in bfloat16"):
        runners.inference_function(bf16, precision="int8")


def test_calibration_images_are_real_photos_through_the_official_transform(tmp_path):
    from PIL import Image

    from convnext_keras import preprocess

    photos = quantization.sample_photos()
    assert len(photos) == 14 and all(p.is_file() for p in photos)
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, p in enumerate(photos[:3]):
        Image.open(p).convert("RGB").save(folder / ("sub" if i else ".") / f"{i}.png")
    (folder / ".hidden.png").write_bytes(b"")
    (folder / "labels.csv").write_text("a,b")
    files = quantization.calibration_files(folder)
    assert [f.relative_to(folder).as_posix() for f in files] == ["0.png", "sub/1.png", "sub/2.png"]
    images = quantization.calibration_images(folder, (64, 0.875, "bicubic"), limit=2)
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.float32
    expected = preprocess.transform_file(folder / "sub" / "2.png", (64, 0.875, "bicubic"))
    np.testing.assert_array_equal(images[1], expected)  # evenly spaced: first and last


# ----------------------------------------------------------------------------------------------
# Graphs over protobuf's 2 GiB, an engine that gives way to Keras, a graph without duplicates


def test_the_external_data_threshold_parts_v2_huge_from_the_rest():
    """ConvNeXt V2-H's weights (660M parameters, 2.6 GB in float32) are over protobuf's 2 GiB,
    so its graph needs external data; the largest of the others (ConvNeXt-XL with the 21841-way
    head) is under the threshold, so every other graph stays one file."""
    limit = onnx_graph.EXTERNAL_DATA_THRESHOLD
    assert limit < 2**31 - 1  # what protobuf serialises
    rows = {r["name"]: r["params"] * 4 for r in ck.api.model_table()}
    huge = [n for n in rows if n.startswith("convnextv2_huge")]
    assert len(huge) == 4 and min(rows[n] for n in huge) > 2**31 > limit
    assert max(b for n, b in rows.items() if n not in huge) < limit


@pytest.mark.backends
def test_a_graph_over_the_threshold_runs_from_external_data(atto_v2_checkpoint, monkeypatch):
    """The external-data path that ConvNeXt V2-H takes, with the threshold lowered so that
    ConvNeXt V2-atto (14 MB) crosses it: onnxruntime and OpenVINO load the graph from a file
    with its weights in a data file beside it, and still equal transformers' ConvNextV2."""
    import onnx

    hf, path = atto_v2_checkpoint
    monkeypatch.setattr(onnx_graph, "EXTERNAL_DATA_THRESHOLD", 1 << 20)
    classifier = ck.load_model("convnextv2_atto_1k_224", weights=path)
    graph = onnx_graph.build_onnx_graph(classifier, 64, 64)
    assert onnx_graph.weight_bytes(graph) == sum(
        onnx.numpy_helper.to_array(t).nbytes for t in graph.graph.initializer
    )
    assert onnx_graph.needs_external_data(graph)
    images = _images(2, 64, 64, seed=9)
    expected = ref.hf_outputs(hf, images)["logits"]
    runner = runners.OnnxRunner(classifier)
    np.testing.assert_allclose(runner(images), expected, atol=TOLERANCE, rtol=0)
    files = runner._sessions[(64, 64)].graph_files
    graph_file = Path(files.source)
    assert files.external and onnx_graph.data_file(graph_file).stat().st_size > 1 << 20
    assert graph_file.stat().st_size < 1 << 20  # the nodes only
    openvino = runners.OpenVinoRunner(classifier)
    np.testing.assert_allclose(openvino(images), expected, atol=TOLERANCE, rtol=0)
    assert openvino._requests[images.shape][1].external
    del runner, files
    import gc

    gc.collect()  # the temporary folder goes with the session
    assert not graph_file.parent.exists()


def test_an_engine_that_cannot_run_a_model_gives_way_to_keras(monkeypatch, caplog):
    """With engine "auto", an engine failure (what protobuf's EncodeError was for V2-H) costs
    one line saying why, then Keras answers - the same numbers; an engine asked for by name
    raises instead."""
    model = ck.build_model("atto")
    images = _images(2, 64, 64)

    def broken(*args, **kwargs):
        raise RuntimeError("Failed to serialize proto\nsecond line")

    monkeypatch.setattr(runners, "build_onnx_graph", broken)
    for engine in ("openvino", "onnxruntime"):
        monkeypatch.setattr(graph_files, "openvino_available", lambda e=engine: e == "openvino")
        fn, name = runners.inference_function(model)
        assert name == engine
        with caplog.at_level("WARNING", logger="convnext_keras"):
            caplog.clear()
            first, second = fn(images), fn(images)
        np.testing.assert_array_equal(first, np.asarray(model.predict_on_batch(images)))
        np.testing.assert_array_equal(second, first)
        (record,) = caplog.records  # one line, once
        assert record.getMessage() == (
            f"convnext_keras: the {engine} engine cannot run convnext_atto (RuntimeError: "
            "Failed to serialize proto); running it on Keras instead."
        )
        assert fn.fell_back.startswith("RuntimeError")
        with pytest.raises(RuntimeError, match="serialize"):
            runners.inference_function(model, engine)[0](images)
    with pytest.raises(ValueError, match="got shape"):  # a bad input is no engine failure
        runners.inference_function(model)[0](np.zeros((64, 64, 3), np.float32))


def test_graph_initializers_have_unique_names_and_onnxruntime_says_nothing(capfd):
    """GELU's and GRN's constant 1.0 in one block (opset 17) used to share a name: onnxruntime
    printed a "Duplicate initializer" warning for each, dozens per export."""
    import onnxruntime as ort

    model = ck.build_model("convnextv2_atto")
    for opset in (17, 20):
        graph = onnx_graph.build_onnx_graph(model, 64, 64, opset=opset)
        names = [t.name for t in graph.graph.initializer]
        assert len(names) == len(set(names)), opset
        capfd.readouterr()
        ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
        assert "Duplicate" not in capfd.readouterr().err
    g = onnx_graph._GraphBuilder()
    assert g.const(np.float32(1), "one") == g.const(np.float32(1), "one") == "one"
    assert g.const(np.float32(2), "one") == "one_2" and len(g.initializers) == 2


def test_openvino_is_imported_without_its_usage_telemetry():
    """`import openvino` starts its converter's telemetry, which forks a process to send a
    usage event (JAX warns about the fork); the engine imports OpenVINO with the converter's own
    stand-in instead, and leaves openvino_telemetry importable for anyone else."""
    from test_startup import run_python

    result = run_python(
        """
        import os, sys
        forks = []
        os.register_at_fork(before=lambda: forks.append(1))
        from convnext_keras.engines.runners import import_openvino
        ov = import_openvino()
        import openvino.tools.ovc.telemetry_utils as t
        print(t.tm.__name__, "openvino_telemetry" in sys.modules, len(forks))
        import openvino_telemetry
        print(ov.Core().available_devices[:1])
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    first = result.stdout.splitlines()[0]
    assert first == "openvino.tools.ovc.telemetry_stub False 0"
