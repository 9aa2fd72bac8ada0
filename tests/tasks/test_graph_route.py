"""The warm path: a named model runs on its cached graph, with no Keras and no backend, and
gives the answers of the first (uncached) call; damaged and stale cache entries are rebuilt.

The model is ConvNeXt V2-atto by its registry name, its official file made by transformers'
ConvNextV2 (random, well-spread weights; tests/references) and served from a folder
(``CONVNEXT_BASE_URL=file://...``), so ``--weights official`` downloads, converts and caches it
as with the real file.  The first call of each test runs in this process (Keras is imported
here anyway); the warm calls run as ``convnext`` commands in a fresh process, whose
``sys.modules`` is the proof that nothing heavy was imported.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch_reference as ref
from click.testing import CliRunner
from test_preprocess import reference

from convnext_keras import preprocess, registry
from convnext_keras.cli import main
from convnext_keras.data import labels
from convnext_keras.engines import graph_files
from convnext_keras.tasks import graph_route as route_lib
from convnext_keras.tasks.embed import load_features
from convnext_keras.tasks.graph_route import GraphRoute, graph_route
from convnext_keras.tasks.predict import softmax
from convnext_keras.weights import graphs
from convnext_keras.weights.cache import converted_cache_path

ROOT = Path(__file__).parents[2]
PHOTOS = sorted((ROOT / "examples" / "images").glob("*.jpg"))
NAME = "convnextv2_atto_1k_224"
CKPT = registry.CHECKPOINTS[NAME]
HEAVY = ("keras", "tensorflow", "jax", "torch", "onnx")

#: Runs ``convnext`` commands (a JSON object name -> argv) in one fresh process; prints their
#: exit status and stdout, and which heavy modules that process imported.
WARM = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from convnext_keras.cli import main

    out = {}
    for name, args in json.loads(sys.argv[1]).items():
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            try:
                main.main(args, prog_name="convnext", standalone_mode=False)
                code = 0
            except SystemExit as e:
                code = e.code
        out[name] = [code, buffer.getvalue()]
    out["loaded"] = [m for m in HEAVY if m in sys.modules]
    print(json.dumps(out))
    """
).replace("HEAVY", repr(HEAVY))


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """transformers' ConvNextV2-atto and a folder serving it at its official path."""
    model = ref.reference(registry.VARIANTS["convnextv2_atto"], seed=3)
    folder = tmp_path_factory.mktemp("server")
    (folder / CKPT.source.path).parent.mkdir(parents=True)
    ref.save_official(model, folder / CKPT.source.path)
    return model, folder


@pytest.fixture
def served(official, monkeypatch):
    monkeypatch.setenv("CONVNEXT_BASE_URL", official[1].as_uri() + "/")
    return official[0]


def _warm(commands: dict, env=None) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", WARM, json.dumps(commands)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env or os.environ,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def _val_set(tmp_path: Path) -> Path:
    """An ImageNet-1k class-folder layout of the example photos (two classes)."""
    wnids = labels.imagenet_1k().wnids
    for i, photo in enumerate(PHOTOS):
        folder = tmp_path / "val" / wnids[(281, 417)[i % 2]]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"ILSVRC2012_val_{i + 1:08d}.JPEG").write_bytes(photo.read_bytes())
    return tmp_path / "val"


@pytest.mark.backends
def test_warm_calls_import_no_keras_and_answer_as_the_first(served, tmp_path):
    """predict, eval and embed by name: the first call (this process) loads Keras once and
    caches the graphs; the same commands in a fresh process import no Keras, no backend and
    not even onnx, and print the same answers - which are transformers' ConvNextV2's."""
    val = _val_set(tmp_path)
    commands = {
        "predict": ["predict", *map(str, PHOTOS), "--model", NAME, "--top", "5", "--json"],
        "eval": ["eval", str(val), "--model", NAME, "--batch-size", "3", "--report"],
        "embed": ["embed", str(val), "--model", NAME + "_fe", "--format", "npy", "--quiet",
                  "--batch-size", "3", "--out"],
    }  # fmt: skip
    runs = {}
    for phase in ("cold", "warm"):
        argv = {
            "predict": commands["predict"],
            "eval": [*commands["eval"], str(tmp_path / f"{phase}.json")],
            "embed": [*commands["embed"], str(tmp_path / f"{phase}-features")],
        }
        if phase == "cold":
            runs[phase] = {}
            for name, args in argv.items():
                result = CliRunner().invoke(main, args, catch_exceptions=False)
                runs[phase][name] = [result.exit_code, result.stdout]
        else:
            runs[phase] = _warm(argv)
    assert runs["warm"]["loaded"] == []
    for phase in ("cold", "warm"):
        assert [runs[phase][n][0] for n in commands] == [0, 0, 0], runs[phase]
    # predict: the same JSON, byte for byte, on OpenVINO (the plain install's engine).
    assert runs["warm"]["predict"][1] == runs["cold"]["predict"][1]
    rows = json.loads(runs["warm"]["predict"][1])
    assert {r["engine"] for r in rows} == {graph_files.cpu_graph_engine()} == {"openvino"}
    images = np.stack([reference(preprocess.load_image(p), 224, 0.875, "bicubic") for p in PHOTOS])
    want = softmax(ref.hf_outputs(served, images)["logits"])
    for r, probs in zip(rows, want):
        order = np.argsort(-probs)[:5]
        assert [p["index"] for p in r["predictions"]] == order.tolist(), r["file"]
        np.testing.assert_allclose([p["probability"] for p in r["predictions"]], probs[order],
                                   atol=1e-5)  # fmt: skip
    # eval: the same report (timings aside), run on the cached graph with no backend.
    reports = [json.loads((tmp_path / f"{p}.json").read_text()) for p in ("cold", "warm")]
    for key in ("predictions", "acc1", "acc5", "evaluated", "per_class", "config"):
        assert reports[0][key] == reports[1][key], key
    assert reports[1]["config"]["engine"] == "openvino" and reports[1]["config"]["backend"] is None
    assert "no backend: cached graph" in runs["warm"]["eval"][1]
    # embed: the same features, bit for bit.
    cold, warm = (load_features(tmp_path / f"{p}-features") for p in ("cold", "warm"))
    assert cold.paths == warm.paths and len(cold.paths) == len(PHOTOS)
    np.testing.assert_array_equal(cold.features, warm.features)
    entries = sorted(p.name.split("-")[0] for p in (graphs.graphs_dir() / NAME).iterdir())
    assert entries == ["classifier", "pooled"]


def _images() -> np.ndarray:
    return np.stack([preprocess.transform_file(p, preprocess.as_config(NAME)) for p in PHOTOS])


def _route() -> GraphRoute:
    route = graph_route(NAME, "official", head="classifier")
    assert route is not None and route.engine == "openvino"
    return route


def _flip(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    where = len(data) // 2 if offset is None else offset
    data[where] ^= 0x55
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))


def test_damaged_or_stale_cache_entries_are_rebuilt_never_used(served, caplog, monkeypatch):
    """A graph that differs from its record (or has none) is moved aside and built again from
    the Keras model; a compiled blob that differs, or that a record vouches for but OpenVINO
    refuses, is compiled again from the checked graph (no Keras); new converted weights or
    another engine version make a new entry and remove the old one.  Every rebuilt entry
    gives the first call's answers."""
    x = _images()
    first = _route()
    expected = first(x)
    assert first.used_keras
    key = first.key(224, 224)
    assert key.graph_path.is_file() and graphs.cached_graph(key) == key.graph_path
    (blob,) = graphs._compiled_files(key.compiled_dir)

    def again(*, keras: bool):
        route = _route()
        np.testing.assert_array_equal(route(x), expected)
        assert route.used_keras is keras
        (new_blob,) = graphs._compiled_files(key.compiled_dir)
        assert graphs.read_record(new_blob) == graphs.file_sha256(new_blob)
        assert graphs.read_record(key.graph_path) == graphs.file_sha256(key.graph_path)

    again(keras=False)  # warm
    caplog.set_level(logging.WARNING, logger="convnext_keras")
    _flip(blob)
    again(keras=False)
    assert "deleted the compiled graph" in caplog.text and "SHA-256 differs" in caplog.text
    # A blob whose record matches but which OpenVINO cannot import: it compiles the graph,
    # which is checked then.
    (blob,) = graphs._compiled_files(key.compiled_dir)
    os.chmod(blob, 0o644)
    blob.write_bytes(b"not a blob")
    graphs.write_record(blob, graphs.file_sha256(blob))
    again(keras=False)
    _flip(key.graph_path)
    again(keras=True)
    assert "graph.onnx is damaged" in caplog.text
    assert len(list(key.folder.glob("graph.onnx.corrupt-*"))) == 1
    graphs.record_path(key.graph_path).unlink()
    again(keras=True)
    assert "no SHA-256 record" in caplog.text
    # Another engine version: a new entry (the old one removed), the same answers.
    monkeypatch.setattr(graph_files, "engine_version", lambda engine: "0.0.0-test")
    route = _route()
    np.testing.assert_array_equal(route(x), expected)
    assert route.used_keras and route.key(224, 224).folder.name.endswith(key.weights_sha256)
    assert not key.folder.exists() and "-0.0.0_test-" in route.key(224, 224).entry
    # New converted weights (another conversion of another file): a new entry whose answers
    # are the new weights', and the entry of the old weights is gone.
    old = route.key(224, 224)
    converted = converted_cache_path(CKPT)
    from convnext_keras.weights.cache import read_converted, save_converted

    weights = read_converted(converted)
    weights["head_fc"][1] = weights["head_fc"][1] + 1.0  # every logit + 1
    save_converted(weights, converted, {"source": CKPT.filename, "model": NAME})
    route = _route()
    np.testing.assert_allclose(route(x), expected + 1.0, atol=1e-4)
    assert route.used_keras and not old.folder.exists()
    assert route.key(224, 224).weights_sha256 == graphs.file_sha256(converted)


def test_onnxruntime_where_openvino_is_not_installed(served, monkeypatch):
    """Without OpenVINO the route runs the same cached graph on onnxruntime: warm calls need
    no Keras and give the first call's answers, within float32 rounding of OpenVINO's."""
    x = _images()
    openvino = _route()(x)
    monkeypatch.setattr(graph_files, "openvino_available", lambda: False)
    first = graph_route(NAME, "official", head="classifier")
    assert first.engine == "onnxruntime"
    expected = first(x)
    second = graph_route(NAME, "official", head="classifier")
    np.testing.assert_array_equal(second(x), expected)
    assert first.used_keras and not second.used_keras
    assert not second.key(224, 224).compiled_dir.exists()  # onnxruntime keeps no blob
    np.testing.assert_allclose(expected, openvino, atol=1e-4, rtol=0)


def test_a_route_only_for_a_named_model_with_official_float32_weights(monkeypatch, tmp_path):
    """Everything the cached graph cannot stand for goes the Keras way (None)."""
    assert isinstance(graph_route(NAME, "official", head="classifier"), GraphRoute)
    assert graph_route(NAME, "official", head="classifier", precision="fp32") is not None
    assert graph_route(NAME + "_fe", "official", head="pooled").head == "pooled"
    assert graph_route(NAME, "official", head="pooled") is not None  # a classifier's features
    seg = graph_route("upernet_convnext_tiny_ade20k_512", "official", head="segmentation")
    assert seg is not None and seg.num_classes == 150
    refused = [
        (NAME, None, {}),  # random weights
        (NAME, str(tmp_path / "file.pth"), {}),  # a local file
        (NAME, "hf://org/repo", {}),
        (str(tmp_path / "m.keras"), "official", {}),
        (object(), "official", {}),
        ("convnext_atto", "official", {}),  # an architecture: no official weights
        ("convnext_atoo", "official", {}),  # unknown: the Keras path says so
        (NAME + "_fe", "official", {}),  # a feature extractor asked for logits
        ("convnextv2_atto_fcmae", "official", {}),  # an encoder
        ("upernet_convnext_tiny_ade20k_512", "official", {}),
        (NAME, "official", {"precision": "bf16"}),
        (NAME, "official", {"precision": "int8"}),
        (NAME, "official", {"engine": "keras"}),
        (NAME, "official", {"engine": "tensorrt"}),
    ]
    for model, weights, options in refused:
        assert graph_route(model, weights, head="classifier", **options) is None, (model, options)
    assert graph_route("upernet_convnext_tiny_ade20k_512", "official", head="pooled") is None
    monkeypatch.setattr(route_lib, "accelerator", lambda: True)
    assert graph_route(NAME, "official", head="classifier") is None
    monkeypatch.undo()
    monkeypatch.setattr(graph_files, "openvino_available", lambda: False)
    assert graph_route(NAME, "official", head="classifier").engine == "onnxruntime"
    assert graph_route(NAME, "official", head="classifier", engine="openvino") is None
    monkeypatch.setattr(graph_files, "onnxruntime_available", lambda: False)
    assert graph_route(NAME, "official", head="classifier") is None


def test_precision_none_follows_the_global_policy_or_keras_json(monkeypatch, tmp_path):
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        assert graph_route(NAME, "official", head="classifier") is None
        assert graph_route(NAME, "official", head="classifier", precision="fp32") is not None
    finally:
        keras.config.set_dtype_policy(previous)
    # Without Keras imported: keras.json's floatx, read without importing Keras.
    monkeypatch.delitem(sys.modules, "keras")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert route_lib.global_policy_float32()  # no keras.json
    (tmp_path / "keras.json").write_text(json.dumps({"floatx": "float16"}))
    assert not route_lib.global_policy_float32()
    (tmp_path / "keras.json").write_text("{broken")
    assert route_lib.global_policy_float32()


def test_accelerator_visible_without_a_backend(monkeypatch, tmp_path):
    """Device nodes decide, and the ``*_VISIBLE_DEVICES`` variables that hide them."""
    monkeypatch.setattr(sys, "platform", "linux")
    for variable in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"):
        monkeypatch.delenv(variable, raising=False)
    assert not graph_files.accelerator_visible(tmp_path)
    (tmp_path / "nvidia0").touch()
    assert graph_files.accelerator_visible(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not graph_files.accelerator_visible(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert graph_files.accelerator_visible(tmp_path)
    (tmp_path / "nvidia0").unlink()
    (tmp_path / "kfd").touch()
    assert graph_files.accelerator_visible(tmp_path)
    monkeypatch.setenv("HIP_VISIBLE_DEVICES", "-1")
    assert not graph_files.accelerator_visible(tmp_path)
    (tmp_path / "accel0").touch()
    assert graph_files.accelerator_visible(tmp_path)


def test_a_pin_set_after_caching_is_checked_on_the_warm_path(official, served, monkeypatch):
    """A warm call reads no weights, but a ``CONVNEXT_SHA256_<NAME>`` pin set after the model
    was cached still decides: the graph is keyed only while the converted weights were made
    from the pinned file (their ``source_sha256``); another pin sends the call down the cold
    path, which refuses the cached files."""
    _route()(_images()[:1])  # cached: weights and graph
    converted = converted_cache_path(CKPT)
    source = graphs.converted_source(converted)
    assert source == graphs.file_sha256(official[1] / CKPT.source.path)
    variable = "CONVNEXT_SHA256_" + NAME.upper()
    monkeypatch.setenv(variable, source)
    assert graphs.graph_key(CKPT, "classifier", 224, 224, "fp32", "openvino", "1") is not None
    monkeypatch.setenv(variable, "0" * 64)
    assert graphs.graph_key(CKPT, "classifier", 224, 224, "fp32", "openvino", "1") is None
    with pytest.raises(Exception, match="SHA-256"):
        graph_route(NAME, "official", head="classifier")(_images()[:1])
