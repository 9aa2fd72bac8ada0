"""Isotropic ConvNeXt, DINOv3 ConvNeXt and timm's small ConvNeXts, proved against independent
PyTorch references and loaded the way users load them: by name, from loopback-served files
(the official server's path for the isotropic files, the Hugging Face Hub's HTTP interface for
the DINOv3 and timm rows, ``tests/conftest.py``).

* isotropic: a PyTorch isotropic ConvNeXt written from the paper (``isotropic_reference.py``),
  in the official checkpoint layout; logits, pooled features and the stage output at 224;
* DINOv3: transformers' ``DINOv3ConvNextModel`` with random weights, in the Hub's
  ``model.safetensors`` layout (gated: the token is needed); the global descriptor, the
  normalised patch features (``dense``) and the pyramid, on a non-square image; the official
  ``.pth`` layout and transformers 5's own save convert to the same arrays;
* timm: transformers' ConvNext written in timm's layout with 1x1-convolution MLPs
  (``conv_mlp``), at each row's resolution.

Outputs agree within 1e-4 (float32).  Per backend: isotropic small and base, DINOv3 tiny, timm
atto; the larger sizes (``slow``, TensorFlow only) are the same code at other widths.
"""

from __future__ import annotations

import gc

import isotropic_reference as iso
import keras
import numpy as np
import pytest
import torch_reference as ref

import convnext_keras as ck
from convnext_keras import registry
from convnext_keras.nets.convnext import build_for_loading
from convnext_keras.weights import cache, store

TOLERANCE = 1e-4


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _run(model, images):
    out = model(images, training=False)
    if isinstance(out, dict):
        return {k: keras.ops.convert_to_numpy(v) for k, v in out.items()}
    return keras.ops.convert_to_numpy(out)


def _images(height, width, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((1, height, width, 3)).astype(np.float32)


def _clear():
    keras.backend.clear_session()
    gc.collect()


# ---------------------------------------------------------------------------------------------
# Isotropic ConvNeXt


@pytest.mark.equality
@pytest.mark.parametrize("size", ["small", "base", pytest.param("large", marks=pytest.mark.slow)])
def test_isotropic_matches_the_paper_reference(size, loopback_server, monkeypatch):
    """Downloaded from the official path (a loopback mirror; large, 1.2 GB: converted from
    memory), equal to the paper's network; one changed tensor moves the logits far beyond the
    tolerance.  At the rows' 224 on TensorFlow; at 96 on JAX and PyTorch (the same graph: an
    isotropic ConvNeXt has no position-dependent part)."""
    ckpt = registry.CHECKPOINTS[f"convnext_iso_{size}_1k_224"]
    spec = ckpt.spec
    net = iso.model(spec.depths[0], spec.dims[0], 1000, spec.block == "layer_scale", seed=3)
    assert ck.count_params(spec, 1000) == sum(p.numel() for p in net.parameters())
    res = ckpt.resolution if keras.backend.backend() == "tensorflow" else 96
    images = _images(res, res)
    expected = iso.outputs(net, images)
    state = {k: v.numpy() for k, v in iso.official_state_dict(net).items()}
    if size != "large":
        iso.save_official(net, loopback_server.root / ckpt.filename)
    del net
    gc.collect()

    if size == "large":
        model = build_for_loading(spec, head="all", name=ckpt.name)
        ck.weights.convert.assign_weights(model, ck.convert_state_dict(state, spec))
    else:
        monkeypatch.setenv("CONVNEXT_BASE_URL", loopback_server.url)
        model = ck.load_model(ckpt.name, features="all")
        assert loopback_server.requests == [f"/{ckpt.filename}"]
    got = _run(model, images)
    assert sorted(got) == ["logits", "pooled", "stage1"]
    assert got["stage1"].shape == (1, res // 16, res // 16, spec.dims[0])  # one stage, stride 16
    for key in ("logits", "pooled", "stage1"):
        assert _max_diff(got[key], expected[key]) <= TOLERANCE, key
    if size == "small":
        state["blocks.7.pwconv1.weight"] = state["blocks.7.pwconv1.weight"] * 1.05
        ck.weights.convert.assign_weights(model, ck.convert_state_dict(state, spec))
        assert _max_diff(_run(model, images)["logits"], expected["logits"]) > 10 * TOLERANCE
    del model, state
    _clear()


def test_isotropic_heads_and_errors():
    """No pyramid (one stage): a clear error, before any download; ``dense`` is the head
    LayerNorm at each position of the stride-16 map; the ``_fe`` twin is pooled."""
    with pytest.raises(ValueError, match="no feature pyramid: it is one stage at stride 16"):
        ck.load_model("convnext_iso_small_1k_224", features="pyramid")
    model = ck.load_model("convnext_iso_small_1k_224", weights=None, features="dense")
    assert model.output.shape == (None, None, None, 384)
    assert _run(model, _images(48, 32)).shape == (1, 3, 2, 384)
    assert ck.load_model("convnext_iso_small_1k_224_fe", weights=None).output.shape == (None, 384)
    with pytest.raises(ValueError, match=r"at least 16x16 pixels \(an isotropic ConvNeXt's"):
        _run(model, _images(8, 32))  # smaller than one patch
    with pytest.raises(ValueError, match="without it and have no layer scale"):
        ck.build_model("iso_base", layer_scale_init=0.1)


def test_isotropic_layer_decay_groups():
    """One stage, no downsampling: 'group' spreads the blocks over 12 groups (stem 0, head 13);
    'single' gives each block its own group."""
    from convnext_keras.finetune import optim

    groups = optim.layer_groups("iso_small")
    assert groups["stem_conv"] == 0 and groups["head_fc"] == 13
    blocks = [groups[f"stage0_block{b}_dwconv"] for b in range(18)]
    assert blocks == [1 + b * 12 // 18 for b in range(18)] and blocks[-1] == 12
    large = optim.layer_groups("iso_large")
    assert [large[f"stage0_block{b}_pwconv1"] for b in (0, 2, 3, 35)] == [1, 1, 2, 12]
    single = optim.layer_groups("iso_small", "single")
    assert (single["stem_conv"], single["stage0_block17_pwconv2"], single["head_norm"]) == (
        1,
        18,
        19,
    )
    model = ck.build_model("iso_small", num_classes=3, input_shape=(32, 32, 3))
    scales = {g["layer"]: g["lr_scale"] for g in optim.parameter_groups(model, 0.5)}
    assert (scales["stem_conv"], scales["stage0_block17_norm"], scales["head_fc"]) == (
        0.5**13,
        0.5,
        1.0,
    )


# ---------------------------------------------------------------------------------------------
# DINOv3 ConvNeXt


@pytest.mark.equality
@pytest.mark.parametrize("size", ["tiny", pytest.param("large", marks=pytest.mark.slow)])
def test_dinov3_matches_transformers(size, hub_server, monkeypatch):
    """From the (gated) loopback Hub with a token: the global descriptor, the normalised patch
    features and the pyramid equal transformers' on a non-square image (large: the patch
    features, which depend on every weight)."""
    ckpt = registry.CHECKPOINTS[f"dinov3_convnext_{size}_lvd1689m"]
    spec = ckpt.spec
    torch_model = ref.hf_dinov3_model(spec.depths, spec.dims, seed=5)
    assert ck.count_params(spec) == sum(p.numel() for p in torch_model.parameters())
    images = _images(192, 256, seed=1)
    expected = ref.dinov3_outputs(torch_model, images)
    folder = hub_server.root / ckpt.source.repo
    folder.mkdir(parents=True)
    ref.save_dinov3_hub(torch_model, folder / ckpt.source.path)
    hub_server.gated.add(ckpt.source.repo)
    layouts = None
    if size == "tiny":  # the other layouts' renaming does not depend on the size
        layouts = {
            "official .pth": ref.dinov3_official_state_dict(torch_model),
            "transformers 5": torch_model.state_dict(),
        }
        layouts = {k: {n: t.numpy().copy() for n, t in v.items()} for k, v in layouts.items()}
    del torch_model
    gc.collect()

    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    # The heads are proved on tiny; the larger size's dense output covers its whole network.
    for features in ("pooled", "dense", "pyramid") if size == "tiny" else ("dense",):
        model = ck.load_model(ckpt.name, features=features)
        got = _run(model, images)
        if features == "pyramid":
            for i, stride in enumerate(spec.strides):
                key = f"stage{i + 1}"
                assert got[key].shape == (1, 192 // stride, 256 // stride, spec.dims[i]), key
                assert _max_diff(got[key], expected[key]) <= TOLERANCE, key
        else:
            assert got.shape == expected[features].shape, features
            assert _max_diff(got, expected[features]) <= TOLERANCE, features
        del model
    # One download, then the converted cache.
    assert len([r for r in hub_server.cdn_requests if r[0].startswith("/lfs/")]) == 1
    if layouts:
        weights = cache.read_converted(cache.converted_cache_path(ckpt))
        for layout, state in layouts.items():
            converted = ck.convert_state_dict(state, spec)
            assert converted.keys() == weights.keys(), layout
            for layer, arrays in converted.items():
                for a, b in zip(arrays, weights[layer], strict=True):
                    np.testing.assert_array_equal(a, b, err_msg=f"{layout} {layer}")
    _clear()


def test_dinov3_has_no_classifier():
    with pytest.raises(ValueError, match="encoder without classification head"):
        ck.load_model("dinov3_convnext_tiny_lvd1689m", features="classifier", weights=None)
    with pytest.raises(ValueError, match="without a classification head"):
        ck.tasks.predict.load_classifier("dinov3_convnext_tiny_lvd1689m_fe")


def test_dinov3_official_file_with_a_changed_second_norm_is_refused():
    """dinov3's ``norms.3`` is the final LayerNorm again; a file where it differs is damaged."""
    spec = registry.VARIANTS["tiny"]
    state = {k: np.ones(v, np.float32) for k, v in (("norm.weight", 768), ("norm.bias", 768))}
    state["downsample_layers.0.0.weight"] = np.zeros((96, 3, 4, 4), np.float32)
    state["norms.3.weight"], state["norms.3.bias"] = state["norm.weight"] * 2, state["norm.bias"]
    with pytest.raises(ck.CheckpointError, match="norms.3.weight is not a second name"):
        ck.convert_state_dict(state, spec)


# ---------------------------------------------------------------------------------------------
# timm's trained small ConvNeXts


def _timm_params():
    for c in registry.CHECKPOINTS.values():
        if c.family != "timm":
            continue
        # nano: its largest resolution (384) proves the architecture; its 224 rows are the
        # same tensors and graph.  femto / pico are atto's code at other widths.
        if c.variant == "nano" and c.resolution != 384:
            continue
        slow = c.variant != "atto"
        yield pytest.param(c.name, id=c.name, marks=[pytest.mark.slow] if slow else [])


@pytest.mark.equality
@pytest.mark.parametrize("name", list(_timm_params()))
def test_timm_rows_match_pytorch(name, hub_server):
    """timm's ``model.safetensors`` (1x1-convolution MLPs) from the loopback Hub, at the row's
    resolution: logits, pooled features and the pyramid."""
    ckpt = registry.CHECKPOINTS[name]
    spec = ckpt.spec
    torch_model = ref.hf_model(spec.depths, spec.dims, 1000, seed=7)
    images = _images(ckpt.resolution, ckpt.resolution, seed=2)
    expected = ref.hf_outputs(torch_model, images)
    folder = hub_server.root / ckpt.source.repo
    folder.mkdir(parents=True)
    ref.save_timm(torch_model, folder / "model.safetensors", conv_mlp=True)
    del torch_model

    model = ck.load_model(name, features="all")
    got = _run(model, images)
    for key in ("logits", "pooled", *(f"stage{i}" for i in range(1, 5))):
        assert _max_diff(got[key], expected[key]) <= TOLERANCE, key
    assert store.is_cached(ckpt)
    del model
    _clear()


def test_new_rows_build_without_weights():
    """``weights=None`` builds each new family's smallest row (random weights)."""
    for name, shape in (
        ("convnext_femto_1k_224", (None, 1000)),
        ("dinov3_convnext_tiny_lvd1689m_fe", (None, 768)),
        ("convnext_iso_small_1k_224_fe", (None, 384)),
    ):
        assert ck.load_model(name, weights=None).output.shape == shape, name
    pyramid = ck.load_model("dinov3_convnext_tiny_lvd1689m", weights=None)
    assert sorted(pyramid.output) == ["stage1", "stage2", "stage3", "stage4"]


# ---------------------------------------------------------------------------------------------
# The rest of the pipeline: the CPU engine's graph, predict, export, model cards


def test_onnx_graph_of_isotropic_and_dense_models_equals_keras(tmp_path):
    """The onnxruntime engine's own graph (16x16 patch stem without LayerNorm, one stage;
    the 'dense' head) computes what the Keras model does; export writes it, verified."""
    pytest.importorskip("onnxruntime")
    from convnext_keras.engines import onnx_graph, runners
    from convnext_keras.export.exporter import export

    images = _images(64, 48, seed=4)
    iso_model = ck.load_model("convnext_iso_small_1k_224", weights=None)
    runner = runners.OnnxRunner(iso_model)
    assert _max_diff(runner(images), iso_model.predict_on_batch(images)) <= TOLERANCE
    dense = ck.load_model("dinov3_convnext_tiny_lvd1689m", weights=None, features="dense")
    session = runners.onnx_session(onnx_graph.build_onnx_graph(dense, None, None))
    (got,) = session.run(None, {"images": images})
    assert got.shape == (1, 2, 1, 768)
    assert _max_diff(got, dense.predict_on_batch(images)) <= TOLERANCE
    result = export(dense, tmp_path / "dense.onnx", "onnx", image_size=64)
    assert result.outputs == ["dense"] and result.max_abs_diff <= TOLERANCE


def test_predict_runs_where_there_is_a_head_and_says_why_not_where_there_is_none():
    from pathlib import Path

    photo = sorted(Path("examples/images").glob("*.jpg"))[0]
    (result,) = ck.predict_files("convnext_iso_small_1k_224", [photo], weights=None, top=3)
    assert result.ok and len(result.predictions) == 3 and result.random_weights
    with pytest.raises(ValueError, match="an encoder without a classification head"):
        ck.predict_files("dinov3_convnext_tiny_lvd1689m", [photo], weights=None)


def test_model_cards_of_the_new_families():
    from convnext_keras.export.collection import model_card

    iso_card = model_card("convnext_iso_base_1k_224")
    assert "ConvNeXt-Base (isotropic): depths 18, widths 768, 16x16 patch stem" in iso_card
    dino = model_card("dinov3_convnext_large_lvd1689m")
    assert "gated: accept the licence there; HF_TOKEN" in dino
    assert "LicenseRef-DINOv3, https://github.com/facebookresearch/dinov3" in dino
    assert "resize to 224x224 (bilinear, no crop)" in dino
    timm_card = model_card("convnext_nano_12k_1k_384")
    assert "83.3% (reported by timm)" in timm_card and "Apache-2.0" in timm_card
    assert "resize the shorter side to 384 (bicubic), centre-crop 384x384" in timm_card


def test_an_isotropic_model_fine_tunes_with_its_one_stage_layer_decay(tmp_path, monkeypatch):
    """convnext finetune's loop on a micro isotropic ConvNeXt (the isotropic code at a tiny
    width): a run with layer decay over its one stage writes a finite, loadable classifier."""
    from test_finetune_data import digits_folder

    from convnext_keras.finetune import loop, optim

    micro = registry.Variant(
        "iso_micro", (3,), (16,), block="plain", patch_size=16, stem_norm=False
    )
    monkeypatch.setitem(registry.VARIANTS, "iso_micro", micro)
    groups = optim.layer_groups("iso_micro")
    assert [groups[f"stage0_block{b}_pwconv1"] for b in range(3)] == [1, 5, 9]
    data = digits_folder(tmp_path / "digits", per_class=6, classes=3)
    result = loop.run(
        data,
        tmp_path / "run",
        model="convnext_iso_micro",
        epochs=1,
        batch_size=6,
        resolution=32,
        layer_decay=0.7,
        val_fraction=0.25,
        checkpoint_every=0,
        export=False,
        verbose=0,
    )
    (row,) = result.history
    assert np.isfinite(row["train_loss"]) and np.isfinite(row["val_loss"])
    model = keras.saving.load_model(result.files["best"])
    assert model.output.shape == (None, 3)
