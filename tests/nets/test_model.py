"""The network: shapes, heads, parameters, initialisation, serialisation, precision, training."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import convnext_keras as ck
from convnext_keras import registry
from convnext_keras.nets.convnext import layer_names, variant_of


def test_tiny_parameter_count_matches_original():
    # facebookresearch/ConvNeXt ConvNeXt-T with a 1000-class head: 28,589,128 parameters.
    assert ck.build_model("tiny").count_params() == 28_589_128


def test_v2_tiny_parameter_count_matches_original():
    # facebookresearch/ConvNeXt-V2 ConvNeXt V2-T with a 1000-class head (transformers'
    # ConvNextV2 has the same count: test_equality checks every size against it).
    assert ck.build_model("convnextv2_tiny").count_params() == 28_635_496


def test_v2_block_is_the_v1_block_with_grn_and_no_layer_scale():
    v1, v2 = ck.build_model("atto", head="pooled"), ck.build_model("convnextv2_atto", head="pooled")
    assert v2.name == "convnextv2_atto" and v1.name == "convnext_atto"
    names = [layer.name for layer in v2.layers if layer.name.startswith("stage0_block0_")]
    assert names == [
        "stage0_block0_dwconv",
        "stage0_block0_norm",
        "stage0_block0_pwconv1",
        "stage0_block0_grn",
        "stage0_block0_pwconv2",
        "stage0_block0_add",
    ]
    assert not any(isinstance(layer, ck.LayerScale) for layer in v2.layers)
    grn = v2.get_layer("stage2_block3_grn")
    assert isinstance(grn, ck.GlobalResponseNormalization) and grn.epsilon == 1e-6
    assert grn.gamma.shape == (4 * 160,)  # after the 4x expansion
    assert variant_of(v2) is registry.VARIANTS["convnextv2_atto"]
    assert variant_of(v1) is registry.VARIANTS["atto"]
    with pytest.raises(ValueError, match="no layer scale"):
        ck.build_model("convnextv2_atto", layer_scale_init=0.1)


@pytest.mark.parametrize("variant", ["atto", "femto", "pico", "nano"])
def test_edge_variant_parameter_counts(variant):
    model = ck.build_model(variant, num_classes=10)
    assert model.count_params() == ck.count_params(variant, 10)


@pytest.mark.backends
def test_any_input_size_and_every_head():
    images = np.random.default_rng(0).standard_normal((2, 96, 160, 3)).astype("float32")
    logits = ck.build_model("atto", num_classes=7)(images)
    assert tuple(logits.shape) == (2, 7)
    pooled = ck.build_model("atto", head="pooled")(images)
    assert tuple(pooled.shape) == (2, 320)
    pyramid = ck.build_model("atto", head="pyramid")(images)
    assert {k: tuple(v.shape) for k, v in pyramid.items()} == {
        "stage1": (2, 24, 40, 40),
        "stage2": (2, 12, 20, 80),
        "stage3": (2, 6, 10, 160),
        "stage4": (2, 3, 5, 320),
    }
    everything = ck.build_model("atto", num_classes=7, head="all")(images)
    assert set(everything) == {"logits", "pooled", "stage1", "stage2", "stage3", "stage4"}


def test_block_uses_depthwise_conv_and_exact_gelu():
    model = ck.build_model("atto")
    dw = model.get_layer("stage0_block0_dwconv")
    assert isinstance(dw, keras.layers.DepthwiseConv2D)
    assert dw.kernel_size == (7, 7) and dw.padding == "same"
    fc1 = model.get_layer("stage0_block0_pwconv1")
    x = np.linspace(-3, 3, 7).astype("float32")
    exact = 0.5 * x * (1 + np.vectorize(__import__("math").erf)(x / np.sqrt(2)))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(fc1.activation(x)), exact, atol=1e-6)
    for layer in model.layers:
        if isinstance(layer, keras.layers.LayerNormalization):
            assert layer.epsilon == registry.LAYER_NORM_EPSILON


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="head must be one of"):
        ck.build_model("atto", head="logits")
    with pytest.raises(ValueError, match="num_classes"):
        ck.build_model("atto", num_classes=0)
    with pytest.raises(ValueError, match="drop_path_rate"):
        ck.build_model("atto", drop_path_rate=1.5)
    with pytest.raises(ValueError, match="NHWC"):
        ck.build_model("atto", input_shape=(3, 224, 224))


def test_initialisation_matches_original():
    """Kernels ~ truncated normal with std 0.02, biases zero, layer scale 1e-6, LN (1, 0)."""
    keras.utils.set_random_seed(0)
    model = ck.build_model("tiny")
    kernel = keras.ops.convert_to_numpy(model.get_layer("stage2_block0_pwconv1").kernel)
    assert abs(kernel.std() - 0.02) < 0.001
    assert abs(kernel.mean()) < 0.001
    # Truncated at 2 standard deviations (Keras' torch backend redraws only 4 times, so a few
    # in a million may pass the bound there).
    assert (np.abs(kernel) > 2 * 0.02 / 0.8796256610342398 + 1e-6).mean() < 1e-4
    bias = keras.ops.convert_to_numpy(model.get_layer("stage2_block0_pwconv1").bias)
    assert not bias.any()
    gamma = keras.ops.convert_to_numpy(model.get_layer("stage2_block0_layer_scale").gamma)
    np.testing.assert_array_equal(gamma, np.full(384, 1e-6, "float32"))


@pytest.mark.parametrize("variant", ["nano", "convnextv2_nano"])
def test_layer_names_cover_every_weight(variant):
    model = ck.build_model(variant)
    named = {n for group in layer_names(variant).values() for n in group}
    weighted = {layer.name for layer in model.layers if layer.weights}
    assert named == weighted
    assert variant_of(model) is registry.VARIANTS[variant]


@pytest.mark.backends
def test_stochastic_depth_per_sample_only_in_training():
    layer = ck.StochasticDepth(0.5, seed=1)
    x = np.ones((64, 2, 2, 3), "float32")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x, training=False)), x)
    y = keras.ops.convert_to_numpy(layer(x, training=True))
    per_sample = y.reshape(64, -1)
    # each sample is dropped (0) or kept and rescaled (1 / 0.5) as a whole
    assert set(np.unique(per_sample)) <= {0.0, 2.0}
    assert all(len(set(row)) == 1 for row in per_sample)
    assert 10 < (per_sample[:, 0] == 0).sum() < 54


def test_drop_path_rates_rise_linearly():
    model = ck.build_model("atto", drop_path_rate=0.3)
    rates = [layer.rate for layer in model.layers if isinstance(layer, ck.StochasticDepth)]
    # atto has 12 blocks: the first block's rate is 0 (no layer), the last one's 0.3
    np.testing.assert_allclose(rates, np.linspace(0, 0.3, 12)[1:], rtol=1e-6)


@pytest.mark.backends
def test_save_and_load_keras_file_without_custom_objects(tmp_path):
    model = ck.build_model("atto", num_classes=5, drop_path_rate=0.1)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(model(x)), atol=1e-6
    )


@pytest.mark.backends
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("variant", ["atto", "convnextv2_atto"])
def test_mixed_precision(policy, variant):
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = ck.build_model(variant, num_classes=10, head="all")
        x = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype("float32")
        out = model(x, training=False)
        assert keras.backend.standardize_dtype(out["logits"].dtype) == "float32"
        assert keras.backend.standardize_dtype(out["pooled"].dtype) == "float32"
        logits = keras.ops.convert_to_numpy(out["logits"])
        assert np.isfinite(logits).all()
        scale = "grn" if variant.startswith("convnextv2") else "layer_scale"
        gamma = model.get_layer(f"stage0_block0_{scale}").gamma
        assert keras.backend.standardize_dtype(gamma.dtype) == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.backends
def test_a_training_step_reduces_the_loss():
    keras.utils.set_random_seed(0)
    model = ck.build_model("atto", num_classes=3, drop_path_rate=0.1)
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 32, 32, 3)).astype("float32")
    y = np.array([0, 1, 2, 0, 1, 2])
    first = float(model.train_on_batch(x, y))
    for _ in range(15):
        last = float(model.train_on_batch(x, y))
    assert np.isfinite(first) and last < first


@pytest.mark.backends
def test_too_small_images_are_refused_with_the_minimum_never_nan():
    minimum = registry.VARIANTS["atto"].min_input_size
    assert minimum == registry.STEM_PATCH * registry.DOWNSAMPLE_STRIDE**3 == 32
    model = ck.build_model("atto", num_classes=5)
    small = np.zeros((1, 16, 28, 3), "float32")
    message = r"at least 32x32 pixels .*; got 16x28\."
    with pytest.raises(ValueError, match=message):
        model(small)
    with pytest.raises(ValueError, match=message):
        model.predict_on_batch(small)
    with pytest.raises(ValueError, match=r"at least 32x32 .*; got 16x16"):
        ck.build_model("atto", input_shape=(16, 16, 3))
    fine = model.predict_on_batch(np.ones((1, minimum, minimum + 7, 3), "float32"))
    assert np.isfinite(fine).all()
    if keras.backend.backend() == "tensorflow":
        # After several sizes Keras traces predict() with an unknown size: the graph asserts.
        for size in (64, 48, 40):
            model.predict(np.zeros((1, size, size, 3), "float32"), verbose=0)
        with pytest.raises(Exception, match=r"at least 32x32 pixels") as info:
            model.predict(small, verbose=0)
        assert "16" in str(info.value) and "28" in str(info.value)


@pytest.mark.backends
def test_channels_first_global_setting_builds_the_same_nhwc_network():
    x = np.random.default_rng(0).standard_normal((2, 64, 48, 3)).astype("float32")
    reference = ck.build_model("atto", num_classes=4)
    previous = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")
    try:
        model = ck.build_model("atto", num_classes=4)
        model.set_weights(reference.get_weights())
        np.testing.assert_allclose(
            model.predict_on_batch(x), reference.predict_on_batch(x), rtol=1e-5, atol=1e-5
        )
    finally:
        keras.config.set_image_data_format(previous)
