"""A depthwise ``k x k`` convolution written as a Pallas (Triton) kernel, for JAX on GPUs.

Why: kernel profiles of ConvNeXt-T on an H100 (BENCHMARKS.md) put 27 % of a bf16 forward in
cuDNN's depthwise 7x7 kernel (``conv2d_c1_k1_nhwc_specialized``, 4.6 ms for batch 256), about
six times the time its memory traffic needs, and XLA's autotuner sometimes picks a kernel
4-5x slower still (``conv2d_grouped_direct_kernel``).  timm compiled uses the same cuDNN kernel,
so this is where a JAX port can get ahead.

The kernel: one program per (image, block of ``block_h`` output rows, block of channels).
For each of the ``k`` column shifts it walks the ``block_h + k - 1`` input rows the block
needs, loads each row's shifted tile ``(W, C-block)`` once (NHWC: channels contiguous, so the
loads are coalesced) and adds it, times its tap, to the accumulators of every output row it
reaches: ``k (block_h + k - 1) / block_h`` tile loads per output row instead of ``k * k``, with
only one column of taps live at a time.  Sums in
float32; the output has the input's dtype.  Out-of-range rows/columns are masked to zero
(``"same"`` padding, stride 1).

Backward: the input gradient is this kernel again (a stride-1 ``"same"`` convolution's
transpose is the same convolution with the kernel flipped in both axes); the kernel and bias
gradients, reductions over the batch, are XLA's.

Status: exact against ``lax.conv_general_dilated`` in Pallas' interpreter (any device) and
lowered to Triton IR for CUDA (tests).  Timed on an H200 (BENCHMARKS.md): with the launch
settings below (8 warps, ~8 values per thread per tile) 1.27x faster than cuDNN at ConvNeXt-T's
stages 0 and 1; the first settings (4 warps, 16 per thread) were 1.5-1.8x slower, and the
whole network with the new settings is not measured yet.  ``DepthwiseConv2D(
implementation="pallas")`` opts in; nothing uses it by default.
"""

from __future__ import annotations

import functools

__all__ = [
    "depthwise_conv2d",
    "xla_depthwise_conv2d",
    "reference_depthwise_conv2d",
    "default_blocks",
]


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# Launch settings, from a sweep on an H200 (2026-11-27, BENCHMARKS.md): speed followed the
# elements each thread holds per tile (its registers: ``block_h`` accumulators, the tile, the
# taps).  At 8 per thread and 8 warps the kernel ran ConvNeXt-T's stage 0 / 1 depthwise 7x7 in
# 0.86 / 0.45 ms against cuDNN's 1.09 / 0.58 ms; at 16 per thread (4 warps) in 1.95 / 0.88 ms.
NUM_WARPS = 8
TILE_ELEMENTS = 8 * 32 * NUM_WARPS  # a (W, block_c) tile: 8 values per thread
BLOCK_H = 4  # output rows per program (1 and 8 were slower at stage 0 / 1)


def default_blocks(height: int, width: int, channels: int) -> tuple[int, int]:
    """``(block_h, block_c)`` for an input of this size.

    Triton tiles need power-of-two sides: a tile is ``(next_pow2(W), block_c)``.  ``block_c``
    makes the tile about ``TILE_ELEMENTS`` values (8 per thread at ``NUM_WARPS`` warps), at
    least 16 and at most 256 channels, and is the largest such power of two that divides the
    channels, so no lane is masked along C (ConvNeXt-T at 224: 96 -> 32, 192 -> 64,
    384 -> 128, 768 -> 256); a channel count with no such divisor gets one block with its
    last channel repeated.  ``block_h`` is ``BLOCK_H`` rows, fewer for smaller inputs.
    """
    target = max(16, min(256, TILE_ELEMENTS // _next_power_of_2(width)))
    block_c = target
    while block_c >= 16 and channels % block_c:
        block_c //= 2
    if block_c < 16:  # odd channel counts: one wide block (last channel repeated), not 1-wide
        block_c = min(target, _next_power_of_2(channels))
    block_h = max(1, min(BLOCK_H, _next_power_of_2(height)))
    return block_h, block_c


def reference_depthwise_conv2d(x, kernel, bias=None):
    """The same function with XLA's convolution (float32 sums): the kernel's reference."""
    import jax.numpy as jnp
    from jax import lax

    if bias is None:
        bias = jnp.zeros(kernel.shape[-1:], jnp.float32)
    f32 = [a.astype(jnp.float32) for a in (x, kernel, bias)]
    return _xla_depthwise(*f32, precision=lax.Precision.HIGHEST).astype(x.dtype)


def _kernel_body(x_ref, k_ref, b_ref, o_ref, *, height, width, channels, kh, kw, bh, bw, bc):
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    n = pl.program_id(0)
    h0 = pl.program_id(1) * bh
    # Lanes past the last column / channel compute that last column / channel again and store
    # the same value there: no store needs a lane mask (Pallas' interpreter resolves a masked
    # store's duplicate indices in no defined order; Triton never writes masked lanes).  The
    # channel clamp is only written when needed: it would hide the channels' contiguity from
    # Triton, which vectorises the loads along them.
    chans = pl.program_id(2) * bc + jnp.arange(bc)
    if channels % bc:
        chans = jnp.minimum(chans, channels - 1)
    cols = jnp.minimum(jnp.arange(bw), width - 1)

    accs = [jnp.zeros((bw, bc), jnp.float32) for _ in range(bh)]
    # Column shift outermost: only that column's kh taps are live (registers), while each input
    # row's shifted tile is loaded once and added to every output row it reaches.
    for j in range(kw):
        taps = [k_ref[i, j, chans].astype(jnp.float32)[None, :] for i in range(kh)]
        src = cols + (j - kw // 2)
        col_ok = (src >= 0) & (src < width)
        src = jnp.clip(src, 0, width - 1)
        for r in range(bh + kh - 1):  # the input rows this block of output rows reads
            row = h0 + r - kh // 2
            ok = col_ok & (row >= 0) & (row < height)
            tile = plgpu.load(
                x_ref.at[n, jnp.clip(row, 0, height - 1), src[:, None], chans[None, :]],
                mask=jnp.broadcast_to(ok[:, None], (bw, bc)),
                other=0.0,
            ).astype(jnp.float32)
            for i in range(kh):
                o = r - i  # output row h0 + o reads input row h0 + o + i - kh // 2
                if 0 <= o < bh:
                    accs[o] = accs[o] + tile * taps[i]

    bias = b_ref[chans].astype(jnp.float32)[None, :]
    for o in range(bh):
        out_row = h0 + o
        plgpu.store(
            o_ref.at[n, jnp.minimum(out_row, height - 1), cols[:, None], chans[None, :]],
            (accs[o] + bias).astype(o_ref.dtype),
            mask=jnp.full((bw, bc), out_row < height),
        )


def _forward(x, kernel, bias, *, block_h, block_c, num_warps, interpret):
    import jax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    batch, height, width, channels = x.shape
    kh, kw, _ = kernel.shape
    bh, bc = default_blocks(height, width, channels)
    bh, bc = block_h or bh, block_c or bc
    body = functools.partial(
        _kernel_body,
        height=height,
        width=width,
        channels=channels,
        kh=kh,
        kw=kw,
        bh=bh,
        bw=_next_power_of_2(width),
        bc=bc,
    )
    call = pl.pallas_call(
        body,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(batch, pl.cdiv(height, bh), pl.cdiv(channels, bc)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=f"depthwise_{kh}x{kw}",
    )
    return call(x, kernel, bias)


def _differentiable(forward):
    """``forward(x, kernel, bias)`` as a depthwise convolution whose input gradient is
    ``forward`` again: a stride-1 ``"same"`` convolution's transpose is the same convolution
    of the gradient with the kernel flipped in both axes.  The kernel and bias gradients,
    reductions over the batch, are XLA's (cuDNN's on GPUs)."""
    import jax
    import jax.numpy as jnp

    @jax.custom_vjp
    def conv(x, kernel, bias):
        return forward(x, kernel, bias)

    def fwd(x, kernel, bias):
        return conv(x, kernel, bias), (x, kernel, bias)

    def bwd(residuals, grad):
        x, kernel, bias = residuals
        dx = forward(grad, kernel[::-1, ::-1], jnp.zeros_like(bias))
        _, vjp = jax.vjp(lambda k, b: _xla_depthwise(x, k, b), kernel, bias)
        return (dx, *vjp(grad))

    conv.defvjp(fwd, bwd)
    return conv


@functools.cache
def _with_gradient(block_h, block_c, num_warps, interpret):
    return _differentiable(
        functools.partial(
            _forward, block_h=block_h, block_c=block_c, num_warps=num_warps, interpret=interpret
        )
    )


@functools.cache
def _xla_with_gradient():
    return _differentiable(_xla_depthwise)


def xla_depthwise_conv2d(x, kernel, bias=None):
    """XLA's depthwise ``"same"`` convolution (cuDNN on GPUs), stride 1, NHWC, kernel
    ``(kh, kw, C)``, whose input gradient is the same *forward* convolution with the taps
    flipped, instead of the transposed convolution JAX's autodiff writes.

    Why: in a training step on an H200 (BENCHMARKS.md) XLA's autotuner ran the transposed
    depthwise convolution with cuDNN's ``conv2d_grouped_direct_kernel`` (6.2 ms per step),
    where the forward convolution runs ``conv2d_c1_k1_nhwc_specialized`` (4.7 ms) and timm its
    ``dgrad2d_c1_k1_nhwc_specialized`` (4.8 ms).  Written as a forward convolution, the input
    gradient is the same operation XLA already tuned for the forward pass.  Same function and
    gradients as the plain convolution (tested); ``DepthwiseConv2D(implementation="xla")``.
    """
    import jax.numpy as jnp

    _check(x, kernel)
    if bias is None:
        bias = jnp.zeros(kernel.shape[-1:], x.dtype)
    return _xla_with_gradient()(x, kernel, bias)


def _check(x, kernel):
    if x.ndim != 4:
        raise ValueError(f"depthwise_conv2d expects an NHWC batch, got shape {x.shape}.")
    if kernel.ndim != 3 or kernel.shape[2] != x.shape[3]:
        raise ValueError(
            f"kernel must be (kh, kw, channels) with channels = {x.shape[3]}, got {kernel.shape}."
        )
    kh, kw, _ = kernel.shape
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"'same' padding needs an odd kernel size, got {kh}x{kw}.")


def _xla_depthwise(x, kernel, bias, precision=None):
    """XLA's depthwise convolution in the input's dtype (what the gradient is taken of)."""
    from jax import lax

    kh, kw, channels = kernel.shape
    out = lax.conv_general_dilated(
        x,
        kernel.astype(x.dtype)[:, :, None, :],
        window_strides=(1, 1),
        padding=((kh // 2, kh // 2), (kw // 2, kw // 2)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=channels,
        precision=precision,
    )
    return out + bias.astype(x.dtype)


def depthwise_conv2d(
    x,
    kernel,
    bias=None,
    *,
    block_h: int | None = None,
    block_c: int | None = None,
    num_warps: int = NUM_WARPS,
    interpret: bool | None = None,
):
    """Depthwise ``"same"`` convolution, stride 1, of NHWC ``x`` with ``kernel`` ``(kh, kw, C)``.

    ``bias`` (``(C,)``) is added in float32 before the single rounding to ``x.dtype``.
    ``interpret``: run in Pallas' interpreter (default: when JAX's default backend is not a
    GPU) - exact but slow, for tests.  Differentiable (input gradient: this kernel with the
    kernel flipped; kernel and bias gradients: XLA's).
    Raises ``ValueError`` for shapes it does not handle.
    """
    import jax
    import jax.numpy as jnp

    _check(x, kernel)
    channels = kernel.shape[2]
    if bias is None:
        bias = jnp.zeros((channels,), x.dtype)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    if block_h is not None and block_h < 1:
        raise ValueError(f"block_h must be a positive number of rows, got {block_h}.")
    if block_c is not None and (block_c < 1 or block_c & (block_c - 1)):
        raise ValueError(f"block_c must be a power of two (a Triton tile side), got {block_c}.")
    return _with_gradient(block_h, block_c, num_warps, bool(interpret))(x, kernel, bias)
