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
transpose is the same convolution with the kernel flipped in both axes); the kernel gradient
is a Pallas kernel of its own (``_kernel_grad``: per image, block of channels and column tap,
the input rows times the output gradient summed in registers; XLA adds the images) for
feature maps of at most ``KERNEL_GRAD_PALLAS_MAX_PIXELS`` pixels and XLA's (cuDNN's) for larger
ones (``kernel_grad="auto"``, the default; ``"xla"`` / ``"pallas"`` or
``$CONVNEXT_DEPTHWISE_KERNEL_GRAD`` force one); the bias gradient is a sum.

Status: exact against ``lax.conv_general_dilated`` and its gradients in Pallas' interpreter
(any device) and lowered to Triton IR for CUDA (tests).  Timed on an H200 (BENCHMARKS.md):
at 16 warps and tiles of 2048 values, per-stage calls adding up to 7.1 ms per ConvNeXt-T
forward (batch 256) where cuDNN's add up to 8.7 ms; in the whole network (at 8 and 16
warps) 1.02-1.07x timm compiled for inference and 0.94-0.96x for the training step, where
cuDNN's kernel, as XLA's autotuner picks it, gave 0.62-1.03x.
``DepthwiseConv2D(implementation="auto")`` runs it on JAX with one NVIDIA GPU.  With 8 rows
per program (``BLOCK_H``, fifth session) inference ran at 1.10x timm (1.07x with 4, same
process); with the "auto" kernel gradient the training step at 1.12x timm (0.98x with cuDNN's
kernel gradient throughout, 1.00x with the Pallas one throughout).
"""

from __future__ import annotations

import functools

__all__ = [
    "depthwise_conv2d",
    "xla_depthwise_conv2d",
    "reference_depthwise_conv2d",
    "default_blocks",
    "kernel_grad_choice",
]


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# Launch settings, from sweeps on an H200 (2026-11-27, BENCHMARKS.md): speed followed the
# elements each thread holds per tile (its registers: ``block_h`` accumulators, the tile, the
# taps).  At 16 per thread (4 warps) the kernel ran ConvNeXt-T's stage 0 / 1 depthwise 7x7 in
# 1.95 / 0.88 ms, at 8 (8 warps) in 0.86 / 0.45 ms against cuDNN's 1.09 / 0.58 ms; in the next
# call, at 4 (16 warps) stages 0-3 took 0.77 / 0.47 / 0.30 / 0.23 ms, at 8 per thread
# 0.86 / 0.52 / 0.29 / 0.29 and cuDNN 0.91 / 0.71 / 0.33 / 0.26.
NUM_WARPS = 16
TILE_ELEMENTS = 2048  # a (W, block_c) tile: 4 values per thread at 16 warps
# Output rows per program.  At 4 warps 1 and 8 were slower than 4 at stages 0 / 1; at 16 warps
# 8 rows (12.25 tile loads per output row instead of 17.5) ran ConvNeXt-T 224 inference at
# 16,536 img/s against 16,109 with 4 (same H200 process, 2026-11-27), and the kernel gradient
# faster at every stage (0.59 / 0.34 / 0.17 / 0.09 ms against 0.72 / 0.36 / 0.18 / 0.15).
BLOCK_H = 8
# Columns per program: the width's next power of two, at most this.  A smaller cap splits a
# row into column blocks: fewer idle lanes where the width is far from a power of two
# (ConvNeXt-T at 384: 96 -> 128-wide tiles) and wider channel blocks.  Measured at 384 with
# a cap of 32 (H200, 2026-11-27): 5,488 img/s against 5,535 with whole rows - no gain.
MAX_BLOCK_W = 1024


def _block_w(width: int, block_w: int | None = None) -> int:
    return block_w or min(_next_power_of_2(width), MAX_BLOCK_W)


def suits_width(width: int) -> bool:
    """Whether the default launch settings run an input ``width`` pixels wide well: its tiles,
    ``(block_w, >= 16 channels)``, hold at most 8 values per thread (at 16 per thread the kernel
    ran 1.5-1.8x slower than cuDNN on an H200).  With the defaults: widths up to 256.  What
    ``DepthwiseConv2D(implementation="auto")`` asks before it picks the kernel."""
    return _block_w(width) * 16 <= 8 * 32 * NUM_WARPS


def default_blocks(
    height: int, width: int, channels: int, block_w: int | None = None
) -> tuple[int, int]:
    """``(block_h, block_c)`` for an input of this size (``block_w`` columns per program;
    default: the width's next power of two, at most ``MAX_BLOCK_W``).

    Triton tiles need power-of-two sides: a tile is ``(block_w, block_c)``.  ``block_c``
    makes the tile about ``TILE_ELEMENTS`` values (4 per thread at ``NUM_WARPS`` = 16), at
    least 16 and at most 256 channels, and is the largest such power of two that divides the
    channels, so no lane is masked along C (ConvNeXt-T at 224: 96 -> 32, 192 -> 64,
    384 -> 128, 768 -> 256); a channel count with no such divisor gets one block with its
    last channel repeated.  ``block_h`` is ``BLOCK_H`` rows, fewer for smaller inputs.
    """
    target = max(16, min(256, TILE_ELEMENTS // _block_w(width, block_w)))
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


def _row_tile(ref, n, row, cols, ok, chans, height):
    """``ref[n, row, cols, chans]`` as a float32 ``(len(cols), len(chans))`` tile, zero where
    ``ok`` (per column) is False; ``row`` is clamped into the image (its lanes masked by ``ok``)."""
    import jax.numpy as jnp
    from jax.experimental.pallas import triton as plgpu

    shape = (cols.shape[0], chans.shape[0])
    return plgpu.load(
        ref.at[n, jnp.clip(row, 0, height - 1), cols[:, None], chans[None, :]],
        mask=jnp.broadcast_to(ok[:, None], shape),
        other=0.0,
    ).astype(jnp.float32)


def _rows_met(x_ref, n, h0, src, col_ok, chans, height, bh, kh):
    """``(i, o, tile)`` for every output row ``h0 + o`` of a block and row tap ``i``: ``tile``
    is input row ``h0 + o + i - kh // 2`` at columns ``src`` (zero where ``col_ok`` is False or
    the row is outside the image).  Each of the ``bh + kh - 1`` input rows is loaded once."""
    for r in range(bh + kh - 1):
        row = h0 + r - kh // 2
        tile = _row_tile(x_ref, n, row, src, col_ok & (row >= 0) & (row < height), chans, height)
        for i in range(kh):
            if 0 <= r - i < bh:
                yield i, r - i, tile


def _kernel_body(
    x_ref, k_ref, b_ref, o_ref, *, height, width, channels, kh, kw, bh, bw, bc, w_blocks
):
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    n = pl.program_id(0)
    # Lanes past the last column / channel compute that last column / channel again and store
    # the same value there: no store needs a lane mask (Pallas' interpreter resolves a masked
    # store's duplicate indices in no defined order; Triton never writes masked lanes).  The
    # channel clamp is only written when needed: it would hide the channels' contiguity from
    # Triton, which vectorises the loads along them.
    chans = pl.program_id(2) * bc + jnp.arange(bc)
    if channels % bc:
        chans = jnp.minimum(chans, channels - 1)
    if w_blocks == 1:  # the whole row in one tile (written apart: the measured kernel)
        h0 = pl.program_id(1) * bh
        cols = jnp.minimum(jnp.arange(bw), width - 1)
    else:  # axis 1 enumerates (row block, column block) pairs
        h0 = (pl.program_id(1) // w_blocks) * bh
        cols = jnp.minimum((pl.program_id(1) % w_blocks) * bw + jnp.arange(bw), width - 1)

    accs = [jnp.zeros((bw, bc), jnp.float32) for _ in range(bh)]
    # Column shift outermost: only that column's kh taps are live (registers), while each input
    # row's shifted tile is loaded once and added to every output row it reaches.
    for j in range(kw):
        taps = [k_ref[i, j, chans].astype(jnp.float32)[None, :] for i in range(kh)]
        src = cols + (j - kw // 2)
        col_ok = (src >= 0) & (src < width)
        src = jnp.clip(src, 0, width - 1)
        for i, o, tile in _rows_met(x_ref, n, h0, src, col_ok, chans, height, bh, kh):
            accs[o] = accs[o] + tile * taps[i]

    bias = b_ref[chans].astype(jnp.float32)[None, :]
    for o in range(bh):
        out_row = h0 + o
        plgpu.store(
            o_ref.at[n, jnp.minimum(out_row, height - 1), cols[:, None], chans[None, :]],
            (accs[o] + bias).astype(o_ref.dtype),
            mask=jnp.full((bw, bc), out_row < height),
        )


def _forward(x, kernel, bias, *, block_h, block_c, block_w, num_warps, interpret):
    import jax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    batch, height, width, channels = x.shape
    kh, kw, _ = kernel.shape
    bw = _block_w(width, block_w)
    bh, bc = default_blocks(height, width, channels, bw)
    bh, bc = block_h or bh, block_c or bc
    w_blocks = pl.cdiv(width, bw)
    body = functools.partial(
        _kernel_body,
        height=height,
        width=width,
        channels=channels,
        kh=kh,
        kw=kw,
        bh=bh,
        bw=bw,
        bc=bc,
        w_blocks=w_blocks,
    )
    call = pl.pallas_call(
        body,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(batch, pl.cdiv(height, bh) * w_blocks, pl.cdiv(channels, bc)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=f"depthwise_{kh}x{kw}",
    )
    return call(x, kernel, bias)


def _kernel_grad_body(x_ref, g_ref, o_ref, *, height, width, channels, kh, kw, bh, bw, bc):
    """One image's share of the kernel gradient for one column tap ``j``:
    ``o[n, i, j, c] = sum_{h, w} x[n, h + i - kh // 2, w + j - kw // 2, c] * g[n, h, w, c]``.

    Walks the image in blocks of ``bh`` output rows (a loop, not the grid: the partial sums
    stay in registers as ``kh`` ``(W, C-block)`` tiles), loads each block's ``bh`` gradient
    rows once and each input row it reaches once, shifted by ``j``, like the forward kernel;
    sums over the columns once at the end."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    n = pl.program_id(0)
    chans = pl.program_id(1) * bc + jnp.arange(bc)
    if channels % bc:
        chans = jnp.minimum(chans, channels - 1)  # repeated last channel: same value stored
    j = pl.program_id(2)
    cols = jnp.arange(bw)
    in_width = cols < width  # columns past the image add nothing (unlike the forward, no clamp)
    src = cols + (j - kw // 2)
    col_ok = in_width & (src >= 0) & (src < width)
    src = jnp.clip(src, 0, width - 1)
    cols = jnp.minimum(cols, width - 1)

    def rows_block(b, accs):
        h0 = b * bh
        grads = [
            _row_tile(g_ref, n, h0 + o, cols, in_width & (h0 + o < height), chans, height)
            for o in range(bh)
        ]
        accs = list(accs)
        for i, o, tile in _rows_met(x_ref, n, h0, src, col_ok, chans, height, bh, kh):
            accs[i] = accs[i] + tile * grads[o]
        return tuple(accs)

    zeros = tuple(jnp.zeros((bw, bc), jnp.float32) for _ in range(kh))
    accs = jax.lax.fori_loop(0, pl.cdiv(height, bh), rows_block, zeros)
    for i in range(kh):
        plgpu.store(o_ref.at[n, i, j, chans], jnp.sum(accs[i], axis=0))


def _kernel_grad(x, grad, kernel_shape, *, block_h, block_c, num_warps, interpret):
    """``d loss / d kernel`` (float32, ``(kh, kw, C)``) of the depthwise ``"same"``
    convolution, from its input ``x`` and output gradient ``grad``: a Pallas kernel writes
    each image's sums, XLA adds them over the batch."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    batch, height, width, channels = x.shape
    kh, kw, _ = kernel_shape
    bh, bc = default_blocks(height, width, channels, _next_power_of_2(width))  # whole rows
    bh, bc = block_h or bh, block_c or bc
    body = functools.partial(
        _kernel_grad_body,
        height=height,
        width=width,
        channels=channels,
        kh=kh,
        kw=kw,
        bh=bh,
        bw=_next_power_of_2(width),
        bc=bc,
    )
    per_image = pl.pallas_call(
        body,
        out_shape=jax.ShapeDtypeStruct((batch, kh, kw, channels), jnp.float32),
        grid=(batch, pl.cdiv(channels, bc), kw),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=f"depthwise_{kh}x{kw}_kernel_grad",
    )(x, grad)
    return per_image.sum(axis=0)


KERNEL_GRADS = ("auto", "xla", "pallas")

# "auto" computes the kernel gradient of feature maps of at most this many pixels with the
# Pallas kernel, of larger ones with XLA's.  Measured on an H200 (2026-11-27, BENCHMARKS.md,
# ConvNeXt-T stages at batch 128): for the 7x7 map XLA's autotuner picked cuDNN's
# ``conv2d_grouped_direct_kernel``, 2.13 ms per call (6.2 ms of a 30 ms training step, in two
# sessions' processes), where the Pallas kernel took 0.093 ms; at 14x14, 28x28 and 56x56 cuDNN's
# ``wgrad2d_c1_k1_nhwc`` took 0.115 / 0.137 / 0.242 ms and the Pallas kernel 0.167 / 0.341 /
# 0.591 ms.
KERNEL_GRAD_PALLAS_MAX_PIXELS = 64


def kernel_grad_for(height: int, width: int, choice: str = "auto") -> str:
    """``"xla"`` or ``"pallas"``: who computes the kernel gradient of a ``height x width`` map
    under ``choice`` (``"auto"``: Pallas up to ``KERNEL_GRAD_PALLAS_MAX_PIXELS`` pixels)."""
    if choice != "auto":
        return choice
    return "pallas" if height * width <= KERNEL_GRAD_PALLAS_MAX_PIXELS else "xla"


def kernel_grad_choice(kernel_grad: str | None = None) -> str:
    """Who computes the Pallas path's kernel gradient: ``kernel_grad`` when given, else
    ``$CONVNEXT_DEPTHWISE_KERNEL_GRAD``, else ``"auto"`` (per feature-map size,
    ``kernel_grad_for``); ``"xla"`` is XLA's (cuDNN's on GPUs), ``"pallas"`` the Pallas kernel."""
    import os

    choice = kernel_grad or os.environ.get("CONVNEXT_DEPTHWISE_KERNEL_GRAD", "").strip().lower()
    choice = choice or "auto"
    if choice not in KERNEL_GRADS:
        raise ValueError(
            f"kernel gradient {choice!r} is not one of {KERNEL_GRADS} (the argument "
            "kernel_grad= or $CONVNEXT_DEPTHWISE_KERNEL_GRAD)."
        )
    return choice


def _differentiable(forward, kernel_grad=None):
    """``forward(x, kernel, bias)`` as a depthwise convolution whose input gradient is
    ``forward`` again: a stride-1 ``"same"`` convolution's transpose is the same convolution
    of the gradient with the kernel flipped in both axes.  ``kernel_grad(x.shape)``, when
    given, returns the function ``(x, grad, kernel_shape) -> float32 kernel gradient`` for
    that input, or None for XLA's (cuDNN's on GPUs); without it, XLA's.  The bias gradient is a
    sum XLA fuses."""
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
        grad_fn = kernel_grad(x.shape) if kernel_grad is not None else None
        if grad_fn is None:
            _, vjp = jax.vjp(lambda k, b: _xla_depthwise(x, k, b), kernel, bias)
            return (dx, *vjp(grad))
        dk = grad_fn(x, grad, kernel.shape).astype(kernel.dtype)
        db = grad.astype(jnp.float32).sum(axis=(0, 1, 2)).astype(bias.dtype)
        return dx, dk, db

    conv.defvjp(fwd, bwd)
    return conv


@functools.cache
def _with_gradient(block_h, block_c, block_w, num_warps, interpret, kernel_grad="auto"):
    launch = dict(block_h=block_h, block_c=block_c, num_warps=num_warps, interpret=interpret)
    pallas_grad = functools.partial(_kernel_grad, **launch)

    def kernel_grad_of(shape):  # per input shape, when the backward pass is traced
        return pallas_grad if kernel_grad_for(shape[1], shape[2], kernel_grad) == "pallas" else None

    return _differentiable(functools.partial(_forward, block_w=block_w, **launch), kernel_grad_of)


@functools.cache
def _xla_with_gradient():
    return _differentiable(_xla_depthwise)


def xla_depthwise_conv2d(x, kernel, bias=None):
    """XLA's depthwise ``"same"`` convolution (cuDNN on GPUs), stride 1, NHWC, kernel
    ``(kh, kw, C)``, whose input gradient is the same *forward* convolution with the taps
    flipped, instead of the transposed convolution JAX's autodiff writes.

    Written when a 6.2 ms cuDNN ``conv2d_grouped_direct_kernel`` in an H200 training step was
    read as the transposed (input-gradient) convolution: written as a forward convolution, the
    input gradient is the operation XLA already tuned for the forward pass.  Measured
    (BENCHMARKS.md): no gain (2,618 against 2,580 img/s), because that kernel is the *kernel*
    gradient.  Same function and gradients as the plain convolution (tested);
    ``DepthwiseConv2D(implementation="xla")``.
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
    block_w: int | None = None,
    num_warps: int | None = None,
    interpret: bool | None = None,
    kernel_grad: str | None = None,
):
    """Depthwise ``"same"`` convolution, stride 1, of NHWC ``x`` with ``kernel`` ``(kh, kw, C)``.

    ``bias`` (``(C,)``) is added in float32 before the single rounding to ``x.dtype``.
    Launch settings (default: ``default_blocks`` and the module's ``NUM_WARPS``, ``BLOCK_H``,
    ``MAX_BLOCK_W``, read at call time): ``block_h`` output rows, ``block_c`` channels and
    ``block_w`` columns per program (powers of two), ``num_warps``.
    ``interpret``: run in Pallas' interpreter (default: when JAX's default backend is not a
    GPU) - exact but slow, for tests.  Differentiable: the input gradient is this kernel with
    the kernel flipped; the kernel gradient XLA's (``kernel_grad="xla"``), a Pallas kernel of
    its own (``"pallas"``) or, the default, per feature-map size (``"auto"``: Pallas for maps of
    at most ``KERNEL_GRAD_PALLAS_MAX_PIXELS`` pixels, where cuDNN's pick was 20x slower;
    ``$CONVNEXT_DEPTHWISE_KERNEL_GRAD`` sets the default); the bias gradient a sum.
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
    if block_w is not None and (block_w < 1 or block_w & (block_w - 1)):
        raise ValueError(f"block_w must be a power of two (a Triton tile side), got {block_w}.")
    if num_warps is not None and (num_warps < 1 or num_warps & (num_warps - 1)):
        raise ValueError(f"num_warps must be a power of two, got {num_warps}.")
    num_warps = num_warps or NUM_WARPS  # read when called: the module's settings
    block_w = _block_w(x.shape[2], block_w)
    choice = kernel_grad_choice(kernel_grad)
    conv = _with_gradient(block_h, block_c, block_w, num_warps, bool(interpret), choice)
    return conv(x, kernel, bias)
