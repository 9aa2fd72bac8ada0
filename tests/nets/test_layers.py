"""The library's layers: DepthwiseConv2D's shifted-sum, "xla" and native paths compute the
same function (and gradients); the GELU is the exact (erf) one in every dtype and survives
serialization; Global Response Normalization (ConvNeXt V2) is the paper's formula, in float32
under mixed precision, with finite gradients."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from convnext_keras.nets.layers import DepthwiseConv2D, GlobalResponseNormalization, gelu


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


def test_environment_variable_chooses_for_auto(monkeypatch):
    layer = DepthwiseConv2D(7, padding="same")
    layer.build((None, 8, 8, 4))
    monkeypatch.setenv("CONVNEXT_DEPTHWISE", "shifted")
    assert layer._shifted_applies()
    monkeypatch.setenv("CONVNEXT_DEPTHWISE", "native")
    assert not layer._shifted_applies()
    fixed = DepthwiseConv2D(7, padding="same", implementation="shifted")
    fixed.build((None, 8, 8, 4))
    assert fixed._shifted_applies()  # an explicit choice wins
    monkeypatch.setenv("CONVNEXT_DEPTHWISE", "fastest")
    with pytest.raises(ValueError, match="CONVNEXT_DEPTHWISE='fastest'"):
        layer._shifted_applies()


@pytest.mark.backends
@pytest.mark.parametrize("implementation", ["shifted", "xla"])
def test_outputs_and_gradients_equal_native(implementation):
    """Shifted sums and "xla" (JAX; elsewhere Keras' layer) give native's outputs and gradients."""
    native, shifted, x = _pair(7)
    other = DepthwiseConv2D(7, padding="same", implementation=implementation)
    other(x)
    other.set_weights(native.get_weights())
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(other(x)),
        keras.ops.convert_to_numpy(native(x)),
        atol=1e-5,
        rtol=1e-5,
    )
    assert (other._jax_kernel() == "xla") == (
        implementation == "xla" and keras.backend.backend() == "jax"
    )
    weights = np.random.default_rng(5).standard_normal(x.shape).astype("float32")
    expected = _input_and_kernel_gradients(native, x, weights)
    for a, b in zip(expected, _input_and_kernel_gradients(other, x, weights)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def _input_and_kernel_gradients(layer, x, weights):
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        def loss(x, kernel, bias):
            out, _ = layer.stateless_call([kernel, bias], [], x)
            return (out * weights).sum()

        values = [keras.ops.convert_to_tensor(x), *[v.value for v in layer.trainable_variables]]
        return [np.asarray(g) for g in jax.grad(loss, argnums=(0, 1, 2))(*values)]
    if backend == "tensorflow":
        import tensorflow as tf

        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            loss = tf.reduce_sum(layer(xt) * weights)
        grads = tape.gradient(loss, [xt, *[v.value for v in layer.trainable_variables]])
        return [g.numpy() for g in grads]
    import torch

    xt = torch.tensor(x, requires_grad=True)
    loss = (layer(xt) * torch.tensor(weights)).sum()
    params = [v.value for v in layer.trainable_variables]
    grads = torch.autograd.grad(loss, [xt, *params])
    return [g.detach().cpu().numpy() for g in grads]


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


def _exact_gelu(x: np.ndarray) -> np.ndarray:
    from math import erf, sqrt

    return np.array([0.5 * v * (1.0 + erf(v / sqrt(2.0))) for v in x.astype(np.float64)])


@pytest.mark.backends
def test_gelu_is_exact_erf_gelu():
    x = np.concatenate([np.linspace(-10, 10, 2001), [-40.0, -6.5, 0.0, 6.5, 40.0]])
    got = keras.ops.convert_to_numpy(gelu(keras.ops.convert_to_tensor(x.astype("float32"))))
    assert got.dtype == np.float32
    # atol: 1 + erf(x / sqrt 2) cancels in float32 for x < -4 (as in PyTorch's erf-form kernels),
    # leaving absolute errors of a few 1e-7 where the true value is below 1e-5.
    np.testing.assert_allclose(got, _exact_gelu(x), rtol=2e-6, atol=1e-6)
    # Not the tanh approximation, which differs by up to ~5e-4 around |x| = 2.
    tanh = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    assert np.abs(got - tanh).max() > 1e-4


@pytest.mark.backends
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gelu_keeps_16_bit_dtype_and_stays_within_rounding(dtype):
    x = np.linspace(-6, 6, 601).astype("float32")
    xt = keras.ops.cast(keras.ops.convert_to_tensor(x), dtype)
    out = gelu(xt)
    assert keras.backend.standardize_dtype(out.dtype) == dtype
    got = keras.ops.convert_to_numpy(keras.ops.cast(out, "float32"))
    exact = _exact_gelu(keras.ops.convert_to_numpy(keras.ops.cast(xt, "float32")))
    # JAX (this library's float32-inside form) and PyTorch round once to the 16-bit type (8 or
    # 11 significant bits); TensorFlow's tf.nn.gelu (kept there: the TFLite and ONNX converters
    # know it, and the TensorFlow paths are measured with it) computes in the 16-bit type.
    eps = 2.0**-8 if dtype == "bfloat16" else 2.0**-11
    ulps = 5 if keras.backend.backend() == "tensorflow" else 3
    assert np.all(np.abs(got - exact) <= ulps * eps * np.maximum(np.abs(exact), 1e-2))


def test_gelu_serializes_by_registered_name(tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, activation=gelu)(inputs))
    config = model.get_layer(index=1).get_config()
    assert "gelu" in str(config["activation"]) and "convnext_keras" in str(config["activation"])
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.layers[1].activation is gelu
    x = np.random.default_rng(0).standard_normal((2, 4)).astype("float32")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(model(x)), atol=1e-6
    )


def _grn_reference(x, gamma, beta, eps=1e-6):
    """ConvNeXt V2 eq. 1-3 in float64 numpy: G = ||x||_2 over H, W; N = G / (mean_c G + eps)."""
    x = x.astype(np.float64)
    g = np.sqrt((x**2).sum(axis=(1, 2), keepdims=True))
    n = g / (g.mean(axis=-1, keepdims=True) + eps)
    return gamma * (x * n) + beta + x


def _grn(x, policy="float32"):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        layer = GlobalResponseNormalization()
        layer.build(x.shape)
    finally:
        keras.config.set_dtype_policy(previous)
    rng = np.random.default_rng(4)
    layer.set_weights([rng.standard_normal(x.shape[-1]).astype("float32") for _ in range(2)])
    return layer


@pytest.mark.backends
def test_grn_is_the_papers_formula():
    x = np.random.default_rng(3).standard_normal((2, 5, 7, 6)).astype("float32")
    layer = _grn(x)
    gamma, beta = (keras.ops.convert_to_numpy(w) for w in layer.weights)
    expected = _grn_reference(x, gamma, beta)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), expected, atol=1e-5)
    # zero-initialised scale and shift: the identity
    fresh = GlobalResponseNormalization()
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(fresh(x)), x)


@pytest.mark.backends
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_grn_statistics_in_float32_under_mixed_precision(policy):
    """A 56x56 map of values ~30: its sum of squares (~2.8e6) overflows float16's 65504."""
    x = (30 + np.random.default_rng(5).standard_normal((1, 56, 56, 8))).astype("float32")
    layer = _grn(x, policy)
    assert keras.backend.standardize_dtype(layer.gamma.dtype) == "float32"
    out = layer(keras.ops.cast(x, layer.compute_dtype))
    assert keras.backend.standardize_dtype(out.dtype) == layer.compute_dtype
    out = keras.ops.convert_to_numpy(keras.ops.cast(out, "float32"))
    gamma, beta = (keras.ops.convert_to_numpy(w) for w in layer.weights)
    x16 = keras.ops.convert_to_numpy(
        keras.ops.cast(keras.ops.cast(x, layer.compute_dtype), "float32")
    )
    expected = _grn_reference(x16, gamma, beta)
    assert np.isfinite(out).all()
    assert np.abs(out - expected).max() / np.abs(expected).max() < 1e-2


@pytest.mark.backends
def test_grn_gradient_is_finite_for_a_zero_channel():
    x = np.random.default_rng(6).standard_normal((2, 4, 4, 3)).astype("float32")
    x[..., 1] = 0.0
    layer = _grn(x)
    grads = _input_gradient(layer, x)
    assert np.isfinite(grads).all()


def _input_gradient(layer, x):
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = tf.reduce_sum(layer(xt) ** 2)
        return tape.gradient(y, xt).numpy()
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(lambda v: (layer(v) ** 2).sum())(x))
    import torch

    xt = torch.tensor(x, requires_grad=True)
    (layer(xt) ** 2).sum().backward()
    return xt.grad.numpy()


def test_grn_survives_serialization(tmp_path):
    x = np.random.default_rng(7).standard_normal((1, 6, 6, 4)).astype("float32")
    inputs = keras.Input((None, None, 4))
    model = keras.Model(inputs, GlobalResponseNormalization(epsilon=1e-5, name="grn")(inputs))
    model.get_layer("grn").set_weights([np.full(4, 0.5, "float32"), np.full(4, 0.1, "float32")])
    model.save(tmp_path / "grn.keras")
    loaded = keras.saving.load_model(tmp_path / "grn.keras")
    assert loaded.get_layer("grn").epsilon == 1e-5
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(model(x)), atol=1e-6
    )
