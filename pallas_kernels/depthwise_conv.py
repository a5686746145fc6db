"""Depthwise 3x3 convolution over a grid of tokens: `depthwise_conv3x3`, with a fused Pallas kernel for GPUs.

x [N, T, D] holds the tokens of an H x W grid in raster order (T = H * W, W = `grid_width`); the op is the
zero-padded cross-correlation with one 3x3 filter per channel plus a bias, i.e. `lax.conv_general_dilated` with
feature_group_count=D on the [N, H, W, D] view.

Implementations, picked by name from `IMPLS`:
  "conv"     lax.conv_general_dilated (XLA's grouped convolution; cuDNN on GPUs);
  "shifted"  nine shifted multiply-adds in plain jnp, float32 products (XLA fuses them into a few passes; its
             gradients are the same sums, also fused);
  "pallas"   one Triton kernel forward and one backward (dx and the filter/bias gradients together), custom VJP;
  "auto"     "pallas" on GPU, "shifted" elsewhere.

Why a kernel: on an H100 the grouped convolution and, above all, its filter gradient cost ~0.9 ms per DiG-XL/2
block at 256 px for a 19 MB tensor that one pass over HBM moves in ~10 us.

Kernel layout
-------------
Each program owns a tile of consecutive tokens x a block of channels (`Tiles`, one for each kernel) and reads the
nine neighbours of its tokens as nine shifted tiles of the flat sequence (offsets dr * W + dc): the shifted tiles
overlap, so after the first one they come from cache. A tap whose neighbour lies outside the grid is masked: above
the first or below the last grid row (outside the sequence), or across the left or right edge (wrapping into the
previous or next row). On a GPU the masked rows of a tile may lie before the sequence's start or past its end:
Triton does not load them. Interpret mode slices instead (a slice starting before row 0 would be clamped, shifting
the tile), so there the sequence gets `_halo_rows` = W + 1 zero rows on both sides and the same kernels read it at
that offset.
The backward pass is one loop over the nine shifted tiles of dy: dx is the convolution of dy with the filter
rotated by 180 degrees, and the filter gradient of tap (dr, dc), the sum over tokens t of dy[t] * x[t + (dr, dc)],
is also the sum over s = t + (dr, dc) of x[s] * dy[s - (dr, dc)]: the program's own x tile times the dy tile that
dx's rotated tap (-dr, -dc) reads, with the same mask (both ends inside the grid, no wrap across an edge). So the
backward reads ten tiles, not nineteen. The products add up per element over a program's `Tiles.steps` token
tiles; then each program sums them over its tokens into [N, programs along T, 10, D] float32 partials (nine taps
and the bias) that XLA sums.
Both kernels walk their token tiles in a plain loop, their multiply-adds as fma instructions (`_multiply_add`).
Registers bound how many programs share a multiprocessor (an H100 profile of the backward's 8 x 64 tile on 4 warps
found 198 registers per thread: two programs per multiprocessor); loading the next step's tiles ahead of the math
or reading the filter taps in each step did not pay (docs/benchmarks.md).
Kernel names carry their tiles (e.g. depthwise_conv3x3_backward_t8_c64_w8_s16), so that a profile tells them
apart.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import dispatch
from pallas_kernels.mesh import per_batch_shard

_CHANNEL_BLOCKS = (128, 64, 32, 16)
_TAPS = tuple((row, col) for row in (-1, 0, 1) for col in (-1, 0, 1))  # (dr, dc), kernel index (dr+1, dc+1)
_CENTER = _TAPS.index((0, 0))  # tap i's opposite (-dr, -dc) is tap 8 - i


class Tiles(NamedTuple):
    """What one program of a kernel covers: `steps` consecutive tiles of `tokens` tokens (a power of two), walked
    in a loop, x the largest channel block of 128, 64, 32 or 16 that divides D and is at most `channels`; run by
    `num_warps` warps. In the backward kernel the filter-gradient products add up per element over the steps and
    are summed over tokens once at the end: `steps` divides the number of those cross-thread sums (and of the
    partials XLA adds up afterwards) at the cost of 10 accumulator tiles in registers."""
    tokens: int = 64
    channels: int = 128
    num_warps: int = 4
    steps: int = 1


# Fastest over DiG-S/2's and DiG-XL/2's 256 px shapes on an H100 (benchmarks/depthwise_conv_tiles.py;
# docs/benchmarks.md, 2026-12-07, "fma"): 8 steps of 16 x 64 forward (7.6 / 22.1 us, S / XL), 16 steps of 8 x 64 on
# 8 warps backward (22.2 / 53.3 us with the sum of its partials). With 10 accumulator tiles, the backward of a
# 32 x 128 or 64 x 64 tile on 2 warps ran 16-22x slower than the loops (an earlier sweep).
FORWARD_TILES = Tiles(16, 64, 8, 8)
BACKWARD_TILES = Tiles(8, 64, 8, 16)


def _check_inputs(x, kernel, bias, grid_width):
    if x.ndim != 3:
        raise ValueError(f"x must be [N, T, D] tokens, got shape {x.shape}")
    tokens, channels = x.shape[1:]
    if grid_width < 1 or tokens % grid_width:
        raise ValueError(f"grid_width={grid_width} must divide the number of tokens T={tokens}")
    if kernel.shape != (3, 3, channels):
        raise ValueError(f"kernel must be [3, 3, D] = (3, 3, {channels}), got {kernel.shape}")
    if bias.shape != (channels,):
        raise ValueError(f"bias must be [D] = ({channels},), got {bias.shape}")


def conv_reference(x, kernel, bias, *, grid_width):
    """XLA's grouped convolution on the [N, H, W, D] view; float32 accumulation, x's dtype out."""
    n, tokens, d = x.shape
    grid = x.reshape(n, tokens // grid_width, grid_width, d)
    y = lax.conv_general_dilated(grid, kernel[:, :, None, :].astype(x.dtype), window_strides=(1, 1),
                                 padding=((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 feature_group_count=d, preferred_element_type=jnp.float32)
    return (y + bias.astype(jnp.float32)).astype(x.dtype).reshape(n, tokens, d)


def conv_shifted(x, kernel, bias, *, grid_width):
    """The same function as nine shifted multiply-adds in float32 (fast on CPUs, where XLA's grouped conv is
    tens of times slower and its filter gradient is a dense D x D convolution)."""
    n, tokens, d = x.shape
    height, width = tokens // grid_width, grid_width
    padded = jnp.pad(x.reshape(n, height, width, d).astype(jnp.float32), ((0, 0), (1, 1), (1, 1), (0, 0)))
    kernel = kernel.astype(jnp.float32)
    y = sum(padded[:, 1 + dr:1 + dr + height, 1 + dc:1 + dc + width] * kernel[dr + 1, dc + 1] for dr, dc in _TAPS)
    return (y + bias.astype(jnp.float32)).astype(x.dtype).reshape(n, tokens, d)


# ----------------------------------------------------------------------------------------------------------------
# Pallas (Triton) kernels.


def _channel_block(channels, at_most=_CHANNEL_BLOCKS[0]):
    for block in _CHANNEL_BLOCKS:
        if block <= at_most and channels % block == 0:
            return block
    return None


def _halo_rows(grid_width, interpret):
    """Zero rows around the sequence in the kernels' inputs: none on a GPU (module docstring)."""
    return grid_width + 1 if interpret else 0


def _with_halo(x, halo):
    return jnp.pad(x, ((0, 0), (halo, halo), (0, 0))) if halo else x


def _shifted_tile(x_ref, token_start, tap, grid_width, num_tokens, halo, token_block):
    """[token_block, channels] float32 tile of x at (token + dr * W + dc) for the program's tokens, zero where that
    neighbour is outside the grid; x_ref holds the sequence with `halo` rows on both sides."""
    dr, dc = _TAPS[tap]
    tokens = token_start + lax.broadcasted_iota(jnp.int32, (token_block,), 0)
    neighbours = tokens + dr * grid_width + dc
    valid = (tokens < num_tokens) & (neighbours >= 0) & (neighbours < num_tokens)
    if dc < 0:
        valid &= tokens % grid_width > 0
    elif dc > 0:
        valid &= tokens % grid_width < grid_width - 1
    start = token_start + halo + dr * grid_width + dc
    return plgpu.load(x_ref.at[pl.ds(start, token_block), :], mask=valid[:, None], other=0).astype(jnp.float32)


def _store_tokens(o_ref, token_start, num_tokens, tile):
    token_block = tile.shape[0]
    valid = token_start + lax.broadcasted_iota(jnp.int32, (token_block,), 0) < num_tokens
    plgpu.store(o_ref.at[pl.ds(token_start, token_block), :], tile.astype(o_ref.dtype), mask=valid[:, None])


def _multiply_add(a, b, c, interpret):
    """a * b + c in float32 with one rounding. For jnp's a * b + c Triton emits a multiply and an add (an H100
    profile of the backward counted no fused instructions): twice the instructions of an fma."""
    if interpret:
        return a * b + c
    a, b, c = jnp.broadcast_arrays(a, b, c)
    (out,) = plgpu.elementwise_inline_asm("fma.rn.f32 $0, $1, $2, $3;", args=[a, b, c], constraints="=f,f,f,f",
                                          pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(c.shape, jnp.float32)])
    return out


def _forward_kernel(x_ref, w_ref, b_ref, y_ref, *, tiles, interpret, **grid):
    weights = [w_ref[tap].astype(jnp.float32)[None, :] for tap in range(len(_TAPS))]
    bias = b_ref[...].astype(jnp.float32)[None, :]
    load = _TileLoader(tiles, grid)

    def step(i, carry):
        y = bias
        for tile, weight in zip(load(x_ref, i, range(len(_TAPS))), weights):
            y = _multiply_add(tile, weight, y, interpret)
        _store_tokens(y_ref, load.token_start(i), grid["num_tokens"], y)
        return carry

    lax.fori_loop(0, tiles.steps, step, ())


def _backward_kernel(x_ref, dy_ref, w_rotated_ref, dx_ref, partials_ref, *, tiles, interpret, **grid):
    weights = [w_rotated_ref[tap].astype(jnp.float32)[None, :] for tap in range(len(_TAPS))]
    load = _TileLoader(tiles, grid)

    def step(i, sums):
        # x at the program's tokens (zero past the end), then dy at s + (dr, dc) for each tap.
        (x,), dys, sums = load(x_ref, i, (_CENTER,)), load(dy_ref, i, range(len(_TAPS))), list(sums)
        dx = jnp.zeros_like(x)
        for tap, (dy, weight) in enumerate(zip(dys, weights)):
            dx = _multiply_add(dy, weight, dx, interpret)
            # Filter tap (-dr, -dc) pairs x[s] with dy[s + (dr, dc)]: the tile dx just used (module docstring).
            sums[len(_TAPS) - 1 - tap] = _multiply_add(x, dy, sums[len(_TAPS) - 1 - tap], interpret)
            if tap == _CENTER:
                sums[len(_TAPS)] += dy
        _store_tokens(dx_ref, load.token_start(i), grid["num_tokens"], dx)
        return tuple(sums)

    zeros = jnp.zeros((tiles.tokens, x_ref.shape[-1]), jnp.float32)
    sums = lax.fori_loop(0, tiles.steps, step, (zeros,) * (len(_TAPS) + 1))
    for index, products in enumerate(sums):
        partials_ref[index] = jnp.sum(products, axis=0)


class _TileLoader:
    """Loads the shifted tiles (`_shifted_tile`) of a program's step i."""

    def __init__(self, tiles, grid):
        # Read outside the loop: interpret mode substitutes the program id only there.
        self.first_tile = pl.program_id(1) * tiles.steps
        self.grid, self.token_block = grid, tiles.tokens

    def token_start(self, i):
        return (self.first_tile + i) * self.token_block

    def __call__(self, ref, i, taps):
        return tuple(_shifted_tile(ref, self.token_start(i), tap, **self.grid, token_block=self.token_block)
                     for tap in taps)


def _programs_along_tokens(num_tokens, tiles: Tiles) -> int:
    return pl.cdiv(num_tokens, tiles.tokens * tiles.steps)


def _call(kernel, inputs, out_shape, grid_width, num_tokens, interpret, name, tiles: Tiles):
    """pallas_call over the grid (N, token blocks, channel blocks): `inputs` are sequences [N, T + 2 halo, D]
    then [9, D] filters / [D] vectors; outputs are [N, T, D] sequences or [N, token blocks, 10, D] partials."""
    n, _, d = inputs[0].shape
    block = _channel_block(d, tiles.channels)
    token_blocks = _programs_along_tokens(num_tokens, tiles)

    def spec(shape):
        if len(shape) == 3:  # a whole sequence per (batch element, channel block)
            return pl.BlockSpec((None, shape[1], block), lambda n, i, j: (n, 0, j))
        if len(shape) == 4:  # partial sums of one program
            return pl.BlockSpec((None, None, shape[2], block), lambda n, i, j: (n, i, 0, j))
        return pl.BlockSpec(shape[:-1] + (block,), lambda n, i, j: (0,) * (len(shape) - 1) + (j,))

    return pl.pallas_call(
        functools.partial(kernel, grid_width=grid_width, num_tokens=num_tokens,
                          halo=_halo_rows(grid_width, interpret), tiles=tiles, interpret=interpret),
        grid=(n, token_blocks, d // block), in_specs=[spec(x.shape) for x in inputs],
        out_specs=[spec(o.shape) for o in out_shape], out_shape=out_shape, interpret=interpret,
        name=f"{name}_t{tiles.tokens}_c{block}_w{tiles.num_warps}_s{tiles.steps}",
        compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=1),
    )(*inputs)


def _forward(x, filters, bias, *, grid_width, num_tokens, interpret, tiles):
    """y [N, T, D] from x (with its halo rows, see `_halo_rows`), filters [9, D] and bias [D]."""
    n, _, d = x.shape
    (y,) = _call(_forward_kernel, [x, filters, bias], [jax.ShapeDtypeStruct((n, num_tokens, d), x.dtype)],
                 grid_width, num_tokens, interpret, "depthwise_conv3x3", tiles)
    return y


def _backward(x, dy, rotated_filters, *, grid_width, num_tokens, interpret, tiles):
    """(dx [N, T, D], filter and bias gradient partials [N, token blocks, 10, D] float32); x, dy with their halo."""
    n, _, d = x.shape
    out_shape = [jax.ShapeDtypeStruct((n, num_tokens, d), x.dtype),
                 jax.ShapeDtypeStruct((n, _programs_along_tokens(num_tokens, tiles), len(_TAPS) + 1, d),
                                      jnp.float32)]
    return _call(_backward_kernel, [x, dy, rotated_filters], out_shape, grid_width, num_tokens,
                 interpret, "depthwise_conv3x3_backward", tiles)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _conv_pallas(x, kernel, bias, grid_width, interpret, tiles):
    return _conv_pallas_forward(x, kernel, bias, grid_width, interpret, tiles)[0]


def _conv_pallas_forward(x, kernel, bias, grid_width, interpret, tiles):
    forward = functools.partial(_forward, grid_width=grid_width, num_tokens=x.shape[1], interpret=interpret,
                                tiles=tiles[0])
    x = _with_halo(x, _halo_rows(grid_width, interpret))
    # A pallas_call is opaque to XLA's SPMD partitioner: without this it would gather the batch onto every device.
    return per_batch_shard(forward, (x,), (kernel.reshape(len(_TAPS), -1), bias)), (x, kernel, bias)


def _conv_pallas_backward(grid_width, interpret, tiles, residuals, dy):
    x, kernel, bias = residuals
    d = kernel.shape[-1]
    backward = functools.partial(_backward, grid_width=grid_width, num_tokens=dy.shape[1], interpret=interpret,
                                 tiles=tiles[1])
    dx, partials = per_batch_shard(backward, (x, _with_halo(dy, _halo_rows(grid_width, interpret))),
                                   (kernel[::-1, ::-1].reshape(len(_TAPS), d),))
    sums = partials.sum(axis=(0, 1))
    return dx, sums[:len(_TAPS)].reshape(3, 3, d).astype(kernel.dtype), sums[len(_TAPS)].astype(bias.dtype)


_conv_pallas.defvjp(_conv_pallas_forward, _conv_pallas_backward)


def conv_pallas(x, kernel, bias, *, grid_width, interpret=False, forward_tiles: Tiles = FORWARD_TILES,
                backward_tiles: Tiles = BACKWARD_TILES):
    """The Triton kernels (interpret=True runs them on any backend). D must be a multiple of 16."""
    if _channel_block(x.shape[-1]) is None:
        raise ValueError(f"impl='pallas' needs D to be a multiple of 16, got D={x.shape[-1]}; use impl='shifted'")
    for name, tiles in (("forward_tiles", forward_tiles), ("backward_tiles", backward_tiles)):
        if tiles.tokens < 1 or tiles.tokens & (tiles.tokens - 1) or tiles.channels < _CHANNEL_BLOCKS[-1]:
            raise ValueError(f"{name}={tiles} needs tokens a power of two and channels >= {_CHANNEL_BLOCKS[-1]}")
        if tiles.steps < 1:
            raise ValueError(f"{name}={tiles} needs steps >= 1")
    return _conv_pallas(x, kernel, bias, grid_width, interpret, (forward_tiles, backward_tiles))


IMPLS = {"conv": conv_reference, "shifted": conv_shifted, "pallas": conv_pallas}


def resolve_impl(impl: str, channels: int | None = None) -> str:
    """Maps "auto" to the implementation for the default backend (and D, when given)."""
    fits = channels is None or _channel_block(channels) is not None
    return dispatch.resolve_impl(impl, IMPLS, kernel="pallas", fallback="shifted", kernel_fits=fits)


def depthwise_conv3x3(x, kernel, bias, *, grid_width: int, impl: str = "auto"):
    """Zero-padded depthwise 3x3 cross-correlation plus bias over raster tokens of an H x W grid.

    Args:
      x: [N, T, D] tokens, T = H * W in raster order; bf16 or f32 (products and sums in float32).
      kernel: [3, 3, D] filter per channel, indexed [row offset + 1, column offset + 1].
      bias: [D].
      grid_width: W.
      impl: "auto", "conv", "shifted" or "pallas".
    Returns:
      [N, T, D] in x's dtype.
    """
    _check_inputs(x, kernel, bias, grid_width)
    return IMPLS[resolve_impl(impl, x.shape[-1])](x, kernel, bias, grid_width=grid_width)
