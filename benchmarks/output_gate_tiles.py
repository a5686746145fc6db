"""The output gate kernels' tiles on the GPU: device time of the forward and the backward kernel (plus the XLA sum of
the weight-gradient partials) for each `pallas_kernels.output_gate.Tiles`, from a profiler trace.

    python benchmarks/output_gate_tiles.py --shapes S/256,XL/256 --out gate_tiles.jsonl

As depthwise_conv_tiles.py: every candidate runs forward + backward (bf16) back to back on rotating inputs inside
one trace per shape, its kernels carry their tiles in their names (rms_norm_swish_gate[_backward]_e<elements>_w<warps>),
and each candidate's values and gradients are checked against autodiff of the float32 formula first. Prints, per
shape, the fastest forward and backward tiles, then the tiles fastest over all shapes as a JSON line.
"""

import functools
import itertools
import re

import jax
import jax.numpy as jnp
import tiles_sweep
from output_gate import SHAPES, inputs, value_and_grads

from pallas_kernels.output_gate import Tiles, gate_pallas, gate_reference

KERNEL_NAME = re.compile(r"^rms_norm_swish_gate(_backward)?_e(\d+)_w(\d+)")


def tiles_of(match) -> Tiles:
    """The tiles a KERNEL_NAME match carries."""
    return Tiles(*map(int, match.groups()[1:]))


def candidates(value_dim: int) -> list[Tiles]:
    """Row blocks of 1k to 32k elements on 1 to 8 warps, 8 to 128 elements per thread."""
    return [Tiles(elements, warps) for elements, warps in itertools.product((1024, 2048, 4096, 8192, 16384, 32768),
                                                                           (1, 2, 4, 8))
            if 8 <= elements // (32 * warps) <= 128 and elements >= 16 * value_dim]


def sweep(shape, calls: int) -> list[dict]:
    sets = [inputs(seed, shape, jnp.bfloat16) for seed in range(4)]
    expected = jax.jit(functools.partial(value_and_grads, gate_reference))(*[a.astype(jnp.float32) for a in sets[0]])

    def make_step(tiles):
        gate = functools.partial(gate_pallas, forward_tiles=tiles, backward_tiles=tiles)
        return jax.jit(functools.partial(value_and_grads, gate))

    return tiles_sweep.sweep_candidates(candidates(shape[-1]), make_step, sets, expected, calls, KERNEL_NAME, tiles_of)


if __name__ == "__main__":
    tiles_sweep.main(__doc__, SHAPES, sweep, "elements, warps")
