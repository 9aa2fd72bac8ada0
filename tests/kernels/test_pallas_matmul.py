"""The fused matrix product + bias + exact GELU Pallas kernel: equal to XLA's, differentiable,
lowers for CUDA.  Off a GPU it runs in Pallas' interpreter; its speed is gpu_bench's job."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

from test_pallas_depthwise import _cuda_target  # noqa: E402

from convnext_keras.kernels import matmul as pm  # noqa: E402


def _random(shape, seed, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def _operands(m=256, k=96, n=384):
    return _random((m, k), 0), _random((k, n), 1, 0.1), _random((n,), 2, 0.1)


@pytest.mark.parametrize("shape", [(256, 96, 384), (128, 192, 256)])
def test_float32_equals_xla(shape):
    x, w, b = _operands(*shape)
    out = pm.dense_gelu(x, w, b)
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(pm.reference_dense_gelu(x, w, b)), atol=2e-5, rtol=1e-5
    )
    # the exact GELU, not the tanh form (they differ by up to ~5e-4)
    pre = np.asarray(x) @ np.asarray(w) + np.asarray(b)
    tanh = 0.5 * pre * (1 + np.tanh(np.sqrt(2 / np.pi) * (pre + 0.044715 * pre**3)))
    assert np.abs(np.asarray(out) - tanh).max() > 1e-5


def test_bfloat16_rounds_once():
    x, w, b = _operands()
    xb, wb, bb = (a.astype(jnp.bfloat16) for a in (x, w, b))
    out = pm.dense_gelu(xb, wb, bb)
    assert out.dtype == jnp.bfloat16
    exact = np.asarray(pm.reference_dense_gelu(xb.astype(jnp.float32), wb, bb), np.float32)
    got = np.asarray(out, np.float32)
    # one bf16 rounding of the float32 result (8 significant bits), plus float32 sum order
    assert np.all(np.abs(got - exact) <= 2.0**-8 * np.abs(exact) + 1e-6)


def test_gradients_equal_xla():
    x, w, b = _operands(128, 64, 128)
    weights = _random((128, 128), 3)

    def loss(fn):
        return lambda *a: (fn(*a) * weights).sum()

    ours = jax.grad(loss(pm.dense_gelu), (0, 1, 2))(x, w, b)
    ref = jax.grad(loss(pm.reference_dense_gelu), (0, 1, 2))(x, w, b)
    for g, r in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-4, rtol=1e-4)


def test_bad_arguments_are_explained():
    x, w, b = _operands()
    with pytest.raises(ValueError, match="reshape a channels-last batch"):
        pm.dense_gelu(x[None], w, b)
    with pytest.raises(ValueError, match="do not chain"):
        pm.dense_gelu(x, w[:64], b)
    with pytest.raises(ValueError, match="block for M must be a power of two dividing M = 200"):
        pm.dense_gelu(x[:200], w, b)
    with pytest.raises(ValueError, match="block for K"):
        pm.dense_gelu(x, w, b, block_k=48)


@pytest.mark.parametrize("shape", [(256 * 56 * 56, 96, 384), (256 * 7 * 7, 768, 3072)])
def test_lowers_to_triton_for_cuda(shape):
    m, k, n = shape
    args = (
        jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
        jax.ShapeDtypeStruct((k, n), jnp.bfloat16),
        jax.ShapeDtypeStruct((n,), jnp.bfloat16),
    )

    def loss(x, w, b):
        return pm.dense_gelu(x, w, b, interpret=False).astype(jnp.float32).sum()

    with _cuda_target():
        fn = jax.jit(lambda x, w, b: pm.dense_gelu(x, w, b, interpret=False))
        text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == 1
        grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        text = grads.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == 1  # the forward; the backward is XLA's


def test_erf_f32_is_within_4e_7_of_exact_erf():
    from math import erf

    x = np.concatenate([np.linspace(-6, 6, 24001), [-40.0, -4.0, 0.0, 4.0, 40.0]])
    got = np.asarray(pm.erf_f32(jnp.asarray(x, jnp.float32)), np.float64)
    exact = np.array([erf(v) for v in x.astype(np.float32).astype(np.float64)])
    assert np.abs(got - exact).max() < 4e-7
