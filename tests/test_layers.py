"""The library's DepthwiseConv2D: shifted-sum and native paths compute the same function."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from convnext_keras.layers import DepthwiseConv2D


def _pair(kernel=7, **kwargs):
    native = DepthwiseConv2D(kernel, padding="same", implementation="native", **kwargs)
    shifted = DepthwiseConv2D(kernel, padding="same", implementation="shifted", **kwargs)
    x = np.random.default_rng(0).standard_normal((2, 9, 11, 5), dtype=np.float32)
    native(x)
    shifted(x)
    rng = np.random.default_rng(1)
    shifted.set_weights([rng.standard_normal(w.shape).astype(w.dtype) for w in native.weights])
    native.set_weights(shifted.get_weights())
    return native, shifted, x


@pytest.mark.backends
@pytest.mark.parametrize("kernel", [7, 3])
def test_shifted_equals_native(kernel):
    native, shifted, x = _pair(kernel)
    assert shifted._shifted_applies() and not native._shifted_applies()
    a = keras.ops.convert_to_numpy(native(x))
    b = keras.ops.convert_to_numpy(shifted(x))
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.backends
def test_shifted_bfloat16_within_bf16_rounding():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        native, shifted, x = _pair()
    finally:
        keras.config.set_dtype_policy(previous)
    a = keras.ops.convert_to_numpy(keras.ops.cast(native(x), "float32"))
    b = keras.ops.convert_to_numpy(keras.ops.cast(shifted(x), "float32"))
    assert keras.backend.standardize_dtype(shifted(x).dtype) == "bfloat16"
    assert np.linalg.norm(b - a) / np.linalg.norm(a) < 1e-2


@pytest.mark.backends
def test_auto_uses_shifted_sums_only_for_jax_on_cpu():
    layer = DepthwiseConv2D(7, padding="same")
    layer.build((None, 8, 8, 4))
    on_jax_cpu = keras.backend.backend() == "jax"
    if on_jax_cpu:
        import jax

        on_jax_cpu = jax.default_backend() == "cpu"
    assert layer._shifted_applies() == on_jax_cpu


def test_other_configurations_fall_back_to_keras():
    for kwargs in ({"strides": 2}, {"depth_multiplier": 2}, {"dilation_rate": 2}):
        layer = DepthwiseConv2D(3, padding="same", implementation="shifted", **kwargs)
        layer.build((None, 8, 8, 4))
        assert not layer._shifted_applies(), kwargs
    layer = DepthwiseConv2D(3, padding="valid", implementation="shifted")
    assert not layer._shifted_applies()


def test_config_round_trip_and_bad_implementation():
    layer = DepthwiseConv2D(7, padding="same", implementation="native")
    clone = DepthwiseConv2D.from_config(layer.get_config())
    assert clone.implementation == "native" and clone.kernel_size == (7, 7)
    with pytest.raises(ValueError, match="implementation must be one of"):
        DepthwiseConv2D(7, implementation="fast")
