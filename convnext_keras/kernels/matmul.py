"""ConvNeXt's first pointwise layer - matrix product, bias and exact GELU - as one Pallas
(Triton) kernel, for JAX on GPUs.  Experimental: nothing uses it by default.

Why: in the H200 profile of ConvNeXt-T 224 bf16 (BENCHMARKS.md) the bias + exact GELU + cast
fusions after the first pointwise matrix product take 3.5 of the 15.3 ms forward.  That pass
reads and writes the 4x-wide hidden activations once more (at stage 0 with batch 256, 616 MB
each way per block), and cuBLAS - XLA's pick for the product - has no exact-GELU epilogue.  A
kernel that applies bias and GELU to its float32 accumulator before the single store needs no
such pass.

The kernel: one program per ``(block_m, block_n)`` output tile; a loop over ``block_k``-wide
slices of the inner dimension accumulates ``x @ w`` in float32 (tensor cores through Triton's
``dot``), then adds the bias, applies ``x/2 (1 + erf(x / sqrt 2))`` (PyTorch's ``nn.GELU()``,
this library's :func:`convnext_keras.nets.layers.gelu`; erf as XLA's float32 rational approximation,
:func:`erf_f32`) and rounds once to the input's dtype.
Backward (``jax.custom_vjp``): XLA's gradient of the same function (product recomputed).

Status: equal to XLA's product + bias + GELU in Pallas' interpreter and lowered to Triton IR
for CUDA (tests, no GPU needed).  Measured on an H200 (2026-11-27, BENCHMARKS.md,
``benchmarks/gpu_bench.py`` job ``pointwise``): slower than cuBLAS plus XLA's GELU pass at every
ConvNeXt-T stage (1.01-1.33x the time) and in the whole network (0.90x), so the model does not
use it; kept as the experiment's record and a start for a whole-MLP kernel.
"""

from __future__ import annotations

import functools
import math

__all__ = ["dense_gelu", "reference_dense_gelu", "default_blocks", "erf_f32"]

_SQRT_HALF = 1.0 / math.sqrt(2.0)


def default_blocks(k: int) -> tuple[int, int, int]:
    """``(block_m, block_n, block_k)`` for an inner dimension ``k``: 128 x 128 output tiles,
    32- or 64-wide inner slices (every ConvNeXt width, 96 * 2**i, is a multiple of 32; its
    hidden width, 4x that, of 128)."""
    block_k = 64 if k % 64 == 0 else 32
    return 128, 128, block_k


# erf(x) = x P(x^2) / Q(x^2) on [-4, 4] (+-1 beyond, where float32 erf is 1): the rational
# approximation XLA and Eigen use for float32 erf, within 4e-7 of the exact erf (tested).
# Pallas' Triton lowering has no erf primitive, so the kernel computes it from these.
_ERF_P = (
    -2.72614225801306e-10,
    2.77068142495902e-08,
    -2.10102402082508e-06,
    -5.69250639462346e-05,
    -7.34990630326855e-04,
    -2.95459980854025e-03,
    -1.60960333262415e-02,
)
_ERF_Q = (
    -1.45660718464996e-05,
    -2.13374055278905e-04,
    -1.68282697438203e-03,
    -7.37332916720468e-03,
    -1.42647390514189e-02,
)


def erf_f32(x):
    """float32 erf from multiplies, adds and one division (Triton-lowerable)."""
    import jax.numpy as jnp

    x = jnp.clip(x, -4.0, 4.0)
    x2 = x * x
    p = jnp.full_like(x2, _ERF_P[0])
    for c in _ERF_P[1:]:
        p = p * x2 + c
    q = jnp.full_like(x2, _ERF_Q[0])
    for c in _ERF_Q[1:]:
        q = q * x2 + c
    return x * p / q


def _gelu_f32(y):
    return 0.5 * y * (1.0 + erf_f32(y * _SQRT_HALF))


def _xla_dense_gelu(x, w, b, precision=None):
    """The same function with XLA's product and erf (what the gradient is taken of): float32
    sums and GELU, rounded to ``x.dtype``."""
    import jax.numpy as jnp
    from jax import lax

    y = jnp.dot(x, w.astype(x.dtype), precision=precision, preferred_element_type=jnp.float32)
    y = y + b.astype(jnp.float32)
    return (0.5 * y * (1.0 + lax.erf(y * _SQRT_HALF))).astype(x.dtype)


def reference_dense_gelu(x, w, b):
    """The same function with XLA (float32, ``HIGHEST`` precision), rounded to ``x.dtype``."""
    import jax.numpy as jnp
    from jax import lax

    f32 = [a.astype(jnp.float32) for a in (x, w, b)]
    return _xla_dense_gelu(*f32, precision=lax.Precision.HIGHEST).astype(x.dtype)


def _kernel(x_ref, w_ref, b_ref, o_ref, *, steps, block_k):
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    def step(i, acc):
        xs = x_ref[:, pl.ds(i * block_k, block_k)]
        ws = w_ref[pl.ds(i * block_k, block_k), :]
        return acc + jnp.dot(xs, ws, preferred_element_type=jnp.float32)

    acc = jnp.zeros(o_ref.shape, jnp.float32)
    acc = jax.lax.fori_loop(0, steps, step, acc)
    acc = acc + b_ref[...].astype(jnp.float32)[None, :]
    o_ref[...] = _gelu_f32(acc).astype(o_ref.dtype)


def _forward(x, w, b, *, block_m, block_n, block_k, num_warps, num_stages, interpret):
    import jax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    m, k = x.shape
    n = w.shape[1]
    body = functools.partial(_kernel, steps=k // block_k, block_k=block_k)
    call = pl.pallas_call(
        body,
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        grid=(m // block_m, n // block_n),
        in_specs=[
            pl.BlockSpec((block_m, k), lambda i, j: (i, 0)),
            pl.BlockSpec((k, block_n), lambda i, j: (0, j)),
            pl.BlockSpec((block_n,), lambda i, j: (j,)),
        ],
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="dense_bias_gelu",
    )
    return call(x, w.astype(x.dtype), b)


@functools.cache
def _with_gradient(block_m, block_n, block_k, num_warps, num_stages, interpret):
    import jax

    forward = functools.partial(
        _forward,
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
    )

    @jax.custom_vjp
    def fused(x, w, b):
        return forward(x, w, b)

    def fwd(x, w, b):
        return fused(x, w, b), (x, w, b)

    def bwd(residuals, grad):
        # XLA's gradient of the same function (the pre-activation recomputed by XLA)
        _, vjp = jax.vjp(_xla_dense_gelu, *residuals)
        return vjp(grad)

    fused.defvjp(fwd, bwd)
    return fused


def dense_gelu(
    x,
    w,
    b,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool | None = None,
):
    """``gelu(x @ w + b)`` (exact GELU) for ``x`` ``(M, K)``, ``w`` ``(K, N)``, ``b`` ``(N,)``.

    Sums in float32, one rounding to ``x.dtype``.  The blocks must divide the sizes (Triton
    tiles have power-of-two sides): ``ValueError`` says which does not.  ``interpret``: run in
    Pallas' interpreter (default: when JAX's default backend is not a GPU).  Differentiable.
    """
    import jax

    if x.ndim != 2 or w.ndim != 2 or b.ndim != 1:
        raise ValueError(
            f"dense_gelu expects x (M, K), w (K, N) and b (N,), got {x.shape}, {w.shape}, "
            f"{b.shape}; reshape a channels-last batch to (-1, channels) first."
        )
    (m, k), n = x.shape, w.shape[1]
    if w.shape[0] != k or b.shape[0] != n:
        raise ValueError(f"Shapes do not chain: x {x.shape}, w {w.shape}, b {b.shape}.")
    dm, dn, dk = default_blocks(k)
    block_m, block_n, block_k = block_m or dm, block_n or dn, block_k or dk
    for name, size, block in (("M", m, block_m), ("N", n, block_n), ("K", k, block_k)):
        if block & (block - 1) or size % block:
            raise ValueError(
                f"block for {name} must be a power of two dividing {name} = {size}, got {block}."
            )
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    fn = _with_gradient(block_m, block_n, block_k, num_warps, num_stages, bool(interpret))
    return fn(x, w, b)
