"""The Pallas depthwise kernel: exact against XLA's convolution, differentiable, lowers for CUDA.

Off a GPU the kernel runs in Pallas' interpreter (the same kernel body, evaluated op by op),
which checks its indexing, masking and accumulation; the CUDA lowering test checks that the
body translates to Triton IR for ConvNeXt's stage shapes.  Its GPU speed is measured by
benchmarks/gpu_bench.py, not here.
"""

import contextlib
import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

from convnext_keras.kernels import depthwise as pdw  # noqa: E402


def _random(shape, seed, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


@pytest.mark.parametrize(
    "shape,k,blocks",
    [
        ((2, 9, 7, 8, 7), 7, None),  # width 7 -> 8-wide tiles: a duplicated last column
        ((1, 10, 13, 96, 7), 7, (3, 32)),  # height not a multiple of block_h; 3 channel blocks
        ((2, 5, 6, 20, 3), 3, None),  # 20 channels in one 32-wide block: duplicated channels
    ],
)
def test_kernel_equals_xla_convolution(shape, k, blocks):
    *_, channels = shape[:4]
    x = _random(shape[:4], 0)
    kernel, bias = _random((k, k, channels), 1), _random((channels,), 2)
    block_h, block_c = blocks or (None, None)
    out = pdw.depthwise_conv2d(x, kernel, bias, block_h=block_h, block_c=block_c, interpret=True)
    ref = pdw.reference_depthwise_conv2d(x, kernel, bias)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "shape,block_w", [((2, 6, 7, 8), 4), ((1, 5, 13, 20), 4), ((1, 4, 16, 8), 8)]
)
def test_column_blocks_equal_whole_rows(shape, block_w):
    """Rows split into column blocks (the last one partly past the image, or exact): the same
    convolution and the same gradients as XLA's."""
    x, weights = _random(shape, 30), _random(shape, 31)
    kernel, bias = _random((7, 7, shape[-1]), 32), _random((shape[-1],), 33)

    def loss(fn):
        return lambda x, k, b: (fn(x, k, b) * weights).sum()

    def conv(x, k, b):
        return pdw.depthwise_conv2d(x, k, b, block_w=block_w, interpret=True)

    ref = pdw.reference_depthwise_conv2d(x, kernel, bias)
    np.testing.assert_allclose(np.asarray(conv(x, kernel, bias)), np.asarray(ref), atol=1e-5)
    ours = jax.grad(loss(conv), (0, 1, 2))(x, kernel, bias)
    want = jax.grad(loss(pdw.reference_depthwise_conv2d), (0, 1, 2))(x, kernel, bias)
    for g, r in zip(ours, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-4, rtol=1e-5)


def test_kernel_bfloat16_rounds_once():
    x = _random((1, 8, 8, 16), 3, jnp.bfloat16)
    kernel, bias = _random((7, 7, 16), 4, jnp.bfloat16), _random((16,), 5, jnp.bfloat16)
    out = pdw.depthwise_conv2d(x, kernel, bias, interpret=True)
    assert out.dtype == jnp.bfloat16
    ref = pdw.reference_depthwise_conv2d(x, kernel, bias)  # float32 sums, one rounding
    diff = np.abs(np.asarray(out, np.float32) - np.asarray(ref, np.float32))
    ulp = np.abs(np.asarray(ref, np.float32)) * 2.0**-7 + 1e-6
    assert (diff <= ulp).all()


@pytest.mark.parametrize("kernel_grad", ["xla", "pallas", "auto"])
@pytest.mark.parametrize("k", [3, 7])
def test_gradient_is_the_convolution_gradient(k, kernel_grad):
    """The input gradient runs the kernel again with flipped taps, the kernel gradient is
    XLA's or the Pallas one; all three equal XLA's."""
    x = _random((2, 6, 9, 8), 6)
    kernel, bias = _random((k, k, 8), 7), _random((8,), 8)
    weights = _random((2, 6, 9, 8), 9)

    def loss(fn):
        return lambda x, k, b: (fn(x, k, b) * weights).sum()

    def conv(*a):
        return pdw.depthwise_conv2d(*a, interpret=True, kernel_grad=kernel_grad)

    ours = jax.grad(loss(conv), (0, 1, 2))
    ref = jax.grad(loss(pdw.reference_depthwise_conv2d), (0, 1, 2))
    for g, r in zip(ours(x, kernel, bias), ref(x, kernel, bias)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    "shape,k,blocks",
    [
        ((2, 9, 7, 8), 7, None),  # 8-wide tiles: the padding column must add nothing
        ((1, 10, 13, 96), 7, (3, 32)),  # rows not a multiple of block_h; 3 channel blocks
        ((2, 5, 6, 20), 3, None),  # 20 channels in a 32-wide block: repeated channel lanes
        ((1, 3, 3, 16), 7, None),  # taps wider than the image
    ],
)
def test_kernel_gradient_kernel_equals_xla(shape, k, blocks):
    """The Pallas kernel gradient: sum over images, rows and columns of input times output
    gradient for each tap, equal to XLA's gradient of its convolution (float32 sums)."""
    x, grad = _random(shape, 20), _random(shape, 21)
    kernel, bias = _random((k, k, shape[-1]), 22), jnp.zeros(shape[-1])
    _, vjp = jax.vjp(lambda kk: pdw._xla_depthwise(x, kk, bias, precision="highest"), kernel)
    block_h, block_c = blocks or (None, None)
    got = pdw._kernel_grad(
        x, grad, kernel.shape, block_h=block_h, block_c=block_c, num_warps=4, interpret=True
    )
    assert got.shape == kernel.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(vjp(grad)[0]), atol=1e-4, rtol=1e-5)


def test_kernel_gradient_choice(monkeypatch):
    monkeypatch.delenv("CONVNEXT_DEPTHWISE_KERNEL_GRAD", raising=False)
    assert pdw.kernel_grad_choice() == "auto"
    monkeypatch.setenv("CONVNEXT_DEPTHWISE_KERNEL_GRAD", "Pallas")
    assert pdw.kernel_grad_choice() == "pallas"
    assert pdw.kernel_grad_choice("xla") == "xla"  # the argument wins
    monkeypatch.setenv("CONVNEXT_DEPTHWISE_KERNEL_GRAD", "cudnn")
    with pytest.raises(ValueError, match="CONVNEXT_DEPTHWISE_KERNEL_GRAD"):
        pdw.kernel_grad_choice()


def test_auto_kernel_gradient_follows_the_map_size():
    """ "auto": the Pallas kernel gradient for maps of at most KERNEL_GRAD_PALLAS_MAX_PIXELS
    pixels (ConvNeXt's last stage at 224: 7x7), XLA's for larger ones; the backward pass runs
    one more Pallas kernel exactly when the Pallas kernel gradient is picked."""
    limit = pdw.KERNEL_GRAD_PALLAS_MAX_PIXELS
    assert pdw.kernel_grad_for(7, 7) == "pallas" and pdw.kernel_grad_for(14, 14) == "xla"
    assert pdw.kernel_grad_for(1, limit) == "pallas" and pdw.kernel_grad_for(1, limit + 1) == "xla"
    assert pdw.kernel_grad_for(7, 7, "xla") == "xla"
    assert pdw.kernel_grad_for(56, 56, "pallas") == "pallas"

    def pallas_calls(shape, kernel_grad):
        x, kernel = jnp.zeros(shape), jnp.zeros((7, 7, shape[-1]))

        def loss(x, k):
            return pdw.depthwise_conv2d(x, k, interpret=True, kernel_grad=kernel_grad).sum()

        return str(jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, kernel)).count("pallas_call")

    small, large = (1, 7, 7, 8), (1, 9, 8, 8)  # 49 and 72 pixels
    assert pallas_calls(small, "auto") == pallas_calls(small, "pallas") == 3
    assert pallas_calls(large, "auto") == pallas_calls(large, "xla") == 2


def test_bad_arguments_are_explained():
    x = jnp.zeros((1, 8, 8, 4))
    with pytest.raises(ValueError, match="NHWC"):
        pdw.depthwise_conv2d(jnp.zeros((8, 8, 4)), jnp.zeros((3, 3, 4)))
    with pytest.raises(ValueError, match="channels = 4"):
        pdw.depthwise_conv2d(x, jnp.zeros((3, 3, 5)))
    with pytest.raises(ValueError, match="odd kernel"):
        pdw.depthwise_conv2d(x, jnp.zeros((2, 2, 4)))
    with pytest.raises(ValueError, match="power of two"):
        pdw.depthwise_conv2d(x, jnp.zeros((3, 3, 4)), block_c=24)
    with pytest.raises(ValueError, match="block_w must be a power of two"):
        pdw.depthwise_conv2d(x, jnp.zeros((3, 3, 4)), block_w=12)
    with pytest.raises(ValueError, match="num_warps must be a power of two"):
        pdw.depthwise_conv2d(x, jnp.zeros((3, 3, 4)), num_warps=6)


def _cuda_target():
    """From jax 0.11 on, Pallas' Triton lowering asks for the target GPU's kind: without a GPU
    it must be named through an abstract mesh (an H100); older JAX lowers without one."""
    try:
        from jax._src import mesh as mesh_lib

        device = mesh_lib.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu")
        mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
        return jax.sharding.use_abstract_mesh(mesh)
    except (AttributeError, ImportError, TypeError):
        return contextlib.nullcontext()


@pytest.mark.parametrize("shape", [(256, 56, 56, 96), (256, 7, 7, 768)])
def test_lowers_to_triton_for_cuda(shape):
    """The kernel body translates to Triton IR (no GPU needed: JAX lowers for another platform)."""
    args = (
        jax.ShapeDtypeStruct(shape, jnp.bfloat16),
        jax.ShapeDtypeStruct((7, 7, shape[-1]), jnp.bfloat16),
        jax.ShapeDtypeStruct((shape[-1],), jnp.bfloat16),
    )

    def loss(x, k, b, kernel_grad=None):
        out = pdw.depthwise_conv2d(x, k, b, interpret=False, kernel_grad=kernel_grad)
        return out.astype(jnp.float32).sum()

    def triton_calls_of_gradient(kernel_grad):
        grads = jax.jit(
            jax.value_and_grad(functools.partial(loss, kernel_grad=kernel_grad), (0, 1, 2))
        )
        return (
            grads.trace(*args)
            .lower(lowering_platforms=("cuda",))
            .as_text()
            .count("__gpu$xla.gpu.triton")
        )

    with _cuda_target():
        fn = jax.jit(lambda x, k, b: pdw.depthwise_conv2d(x, k, b, interpret=False))
        text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == 1
        assert triton_calls_of_gradient("xla") == 2  # forward, and the input gradient
        # the default ("auto"): the Pallas kernel gradient too for the 7x7 map only
        assert triton_calls_of_gradient(None) == (3 if shape[1] == 7 else 2)

        def loss_pallas_kernel_grad(x, k, b):
            out = pdw.depthwise_conv2d(x, k, b, interpret=False, kernel_grad="pallas")
            return out.astype(jnp.float32).sum()

        grads = jax.jit(jax.value_and_grad(loss_pallas_kernel_grad, argnums=(0, 1, 2)))
        text = grads.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == 3  # and the kernel gradient
        assert "feature_group_count" not in text  # no XLA convolution left


def test_column_blocks_lower_to_triton_for_cuda():
    """ConvNeXt-T at 384, stage 0 (96 wide) in 32-column blocks."""
    args = (
        jax.ShapeDtypeStruct((128, 96, 96, 96), jnp.bfloat16),
        jax.ShapeDtypeStruct((7, 7, 96), jnp.bfloat16),
        jax.ShapeDtypeStruct((96,), jnp.bfloat16),
    )
    with _cuda_target():
        fn = jax.jit(lambda x, k, b: pdw.depthwise_conv2d(x, k, b, block_w=32, interpret=False))
        text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1


def test_default_blocks_fit_convnext_stages():
    # ~2048-value tiles (4 per thread at 16 warps), channel blocks that divide the channels,
    # BLOCK_H (8) output rows per program
    assert pdw.BLOCK_H == 8
    assert pdw.default_blocks(56, 56, 96) == (8, 32)
    assert pdw.default_blocks(28, 28, 192) == (8, 64)
    assert pdw.default_blocks(14, 14, 384) == (8, 128)
    assert pdw.default_blocks(7, 7, 768) == (8, 256)  # 7 rows: one block (next power of two)
    assert pdw.default_blocks(96, 96, 96) == (8, 16)  # ConvNeXt-T at 384, stage 0
    assert pdw.default_blocks(12, 12, 768) == (8, 128)
    assert pdw.default_blocks(5, 5, 20) == (8, 32)  # no power-of-two divisor: one masked block
    assert pdw.default_blocks(2, 2, 64) == (2, 64)  # fewer rows than a block
    assert pdw.default_blocks(3, 3, 64) == (4, 64)
    assert pdw.default_blocks(96, 96, 96, block_w=32) == (8, 32)  # 32x64 would not divide 96
    # what "auto" runs the kernel on: tiles of at most 8 values per thread (widths up to 256)
    assert pdw.suits_width(256) and pdw.suits_width(7) and not pdw.suits_width(257)
    assert pdw.default_blocks(48, 48, 192, block_w=16) == (8, 64)  # 128 would not divide 192


@pytest.mark.backends
@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_layer_uses_the_kernel_on_jax(policy):
    import keras

    from convnext_keras.nets.layers import DepthwiseConv2D

    if keras.backend.backend() != "jax":
        pytest.skip("implementation='pallas' is a JAX kernel (other backends use Keras' conv)")
    x = np.random.default_rng(10).normal(size=(2, 9, 9, 8)).astype("float32")
    native = DepthwiseConv2D(7, padding="same", implementation="native", dtype=policy)
    native.build(x.shape)
    native.kernel.assign(np.random.default_rng(11).normal(size=native.kernel.shape))
    native.bias.assign(np.random.default_rng(12).normal(size=native.bias.shape))
    pallas = DepthwiseConv2D.from_config({**native.get_config(), "implementation": "pallas"})
    pallas.build(x.shape)
    pallas.set_weights(native.get_weights())
    assert pallas._pallas_applies()
    got, want = pallas(x), native(x)
    assert got.dtype == want.dtype
    tol = 1e-5 if policy == "float32" else 5e-2  # bf16: one rounding vs cuDNN/XLA's
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol
    )


def _grouped_conv_kernel_specs(fn, x, kernel, bias):
    """The kernel dimension numbers of every feature-grouped convolution in fn's gradient."""
    channels = kernel.shape[-1]
    jaxpr = jax.make_jaxpr(jax.grad(lambda *a: fn(*a).sum(), (0, 1, 2)))(x, kernel, bias)
    specs = []

    def walk(j):
        for eqn in j.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                if eqn.params["feature_group_count"] == channels:
                    specs.append(eqn.params["dimension_numbers"].rhs_spec)
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    walk(inner)

    walk(jaxpr.jaxpr)
    return specs


def test_xla_variant_writes_its_input_gradient_as_the_forward_convolution():
    x, kernel, bias = _random((2, 9, 11, 5), 0), _random((7, 7, 5), 1), _random((5,), 2)
    forward_spec = _grouped_conv_kernel_specs(pdw._xla_depthwise, x, kernel, bias)[0]
    # JAX's own gradient transposes the convolution (kernel input/output dimensions swapped)
    plain = _grouped_conv_kernel_specs(pdw._xla_depthwise, x, kernel, bias)
    assert any(spec != forward_spec for spec in plain)
    ours = _grouped_conv_kernel_specs(pdw.xla_depthwise_conv2d, x, kernel, bias)
    assert len(ours) >= 2 and all(spec == forward_spec for spec in ours)


@pytest.mark.parametrize("kernel_size", [7, 3])
def test_xla_variant_equals_the_plain_convolution_with_gradients(kernel_size):
    x = _random((2, 9, 11, 6), 3)
    kernel, bias = _random((kernel_size, kernel_size, 6), 4), _random((6,), 5)
    weights = _random(x.shape, 6)

    def loss(fn):
        return lambda *a: (fn(*a) * weights).sum()

    np.testing.assert_allclose(
        np.asarray(pdw.xla_depthwise_conv2d(x, kernel, bias)),
        np.asarray(pdw._xla_depthwise(x, kernel, bias)),
        atol=1e-5,
    )
    ours = jax.grad(loss(pdw.xla_depthwise_conv2d), (0, 1, 2))(x, kernel, bias)
    ref = jax.grad(loss(pdw._xla_depthwise), (0, 1, 2))(x, kernel, bias)
    for g, r in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="odd kernel"):
        pdw.xla_depthwise_conv2d(x, jnp.zeros((2, 2, 6)))


@pytest.mark.backends
def test_auto_runs_the_kernel_on_one_nvidia_gpu(monkeypatch):
    """``"auto"``: the Pallas kernel on JAX with one CUDA GPU; cuDNN's convolution on ROCm and
    under a multi-device keras.distribution (XLA cannot split a Pallas kernel); shifted sums
    on JAX's CPU backend.  The device is faked: what is checked is the rule."""
    import types

    import keras

    from convnext_keras.nets import layers

    if keras.backend.backend() != "jax":
        pytest.skip("the rule is JAX's (other backends run Keras' convolution)")
    layer = layers.DepthwiseConv2D(7, padding="same")
    layer.build((None, 8, 8, 4))
    monkeypatch.delenv("CONVNEXT_DEPTHWISE", raising=False)
    if jax.default_backend() == "cpu":
        assert layer._choice() == "shifted"

    def fake_gpu(platform_version):
        device = types.SimpleNamespace(
            client=types.SimpleNamespace(platform_version=platform_version)
        )
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
        monkeypatch.setattr(jax, "devices", lambda *a: [device])

    fake_gpu("PJRT C API\ncuda 12080")
    assert layer._choice() == "pallas" and layer._pallas_applies()
    assert layer._jax_kernel(width=256) == "pallas"
    assert layer._jax_kernel(width=257) is None  # past 4096-value tiles: cuDNN's convolution
    explicit = layers.DepthwiseConv2D(7, padding="same", implementation="pallas")
    explicit.build((None, 8, 8, 4))
    assert explicit._jax_kernel(width=1024) == "pallas"  # an explicit choice is kept
    strided = layers.DepthwiseConv2D(7, strides=2, padding="same")
    strided.build((None, 8, 8, 4))
    assert not strided._pallas_applies()  # shapes the kernel does not handle: Keras' conv
    mesh = types.SimpleNamespace(devices=np.empty((2,)))
    monkeypatch.setattr(
        keras.distribution, "distribution", lambda: types.SimpleNamespace(device_mesh=mesh)
    )
    assert layer._choice() == "native"
    monkeypatch.setattr(keras.distribution, "distribution", lambda: None)
    fake_gpu("PJRT C API\nrocm 60342")
    assert layer._choice() == "native"
    monkeypatch.setenv("CONVNEXT_DEPTHWISE", "native")  # the environment still decides first
    fake_gpu("cuda 12080")
    assert layer._choice() == "native"
