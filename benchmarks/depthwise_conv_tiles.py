"""The depthwise conv kernels' tiles on the GPU: device time of the forward and the backward kernel (plus the XLA
work around the backward: filter rotation, summing the gradient partials) for each `Tiles`, from a profiler trace.

    python benchmarks/depthwise_conv_tiles.py --shapes S/256,XL/256 --out tiles.jsonl

Every candidate runs forward + backward (bf16) back to back on rotating inputs inside one trace per shape; its
kernels carry their tiles in their names (depthwise_conv3x3[_backward]_t<tokens>_c<channels>_w<warps>_s<steps>),
and an XLA kernel counts for the candidate whose Pallas kernel ran last before it. Each candidate's values and
gradients are checked against XLA's convolution first. Prints, per shape, the fastest forward and backward tiles, then
the tiles fastest over all shapes (sum of each shape's time relative to that shape's fastest) as a JSON line.
"""

import functools
import re

import jax
import jax.numpy as jnp
import tiles_sweep
from depthwise_conv import SHAPES, inputs, value_and_grads

from pallas_kernels.depthwise_conv import Tiles, conv_pallas, conv_reference

KERNEL_NAME = re.compile(r"^depthwise_conv3x3(_backward)?_t(\d+)_c(\d+)_w(\d+)_s(\d+)")


def tiles_of(match) -> Tiles:
    """The tiles a KERNEL_NAME match carries."""
    return Tiles(*map(int, match.groups()[1:]))


def candidates(channels: int) -> list[Tiles]:
    """Loops of 8 or 16 steps of 8 or 16 tokens on 2 to 8 warps holding 2 or 4 elements per thread, where the last
    sweeps' winners lay (the backward keeps 10 accumulator tiles: fewer elements per thread leave registers for more
    programs per multiprocessor), plus the forward's best one-tile program of earlier sweeps."""
    loops = [Tiles(8, 64, 4, 16), Tiles(8, 64, 8, 16), Tiles(8, 32, 2, 16), Tiles(16, 64, 8, 8)]
    return [t for t in [Tiles(64, 128, 8)] + loops if channels % t.channels == 0]


def sweep(shape, calls: int) -> list[dict]:
    n, grid, d = shape
    sets = [inputs(jax.random.key(i), n, grid, d, jnp.bfloat16) for i in range(4)]
    expected = jax.jit(functools.partial(value_and_grads, conv_reference, grid))(
        *[a.astype(jnp.float32) for a in sets[0]])

    def make_step(tiles):
        conv = functools.partial(conv_pallas, forward_tiles=tiles, backward_tiles=tiles)
        return jax.jit(functools.partial(value_and_grads, conv, grid))

    # Candidates' channel blocks divide D: the kernel names carry them as they are.
    return tiles_sweep.sweep_candidates(candidates(d), make_step, sets, expected, calls, KERNEL_NAME, tiles_of)


if __name__ == "__main__":
    tiles_sweep.main(__doc__, SHAPES, sweep, "tokens, channels, warps, steps")
