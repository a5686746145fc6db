"""depthwise_conv3x3 on the GPU: accuracy of each implementation against float32 XLA convolution, and the time
of forward + backward (dx, filter and bias gradients) at DiG's shapes, with the HBM floor.

    python benchmarks/depthwise_conv.py --out conv.jsonl

Shapes (N, grid, D): DiG-S/2 and DiG-XL/2 at 256 px (batch 32, 16x16 tokens), DiG-S/2 at 1792 px and DiG-XL/2 at
2048 px (batch 1). The floor counts x and dy read once and y and dx written once at --hbm_tbps. Prints a table last.
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from results import op_benchmark, worst_relative_error

from pallas_kernels.depthwise_conv import IMPLS

SHAPES = {"S/256": (32, 16, 384), "XL/256": (32, 16, 1152), "S/1792": (1, 112, 384), "XL/2048": (1, 128, 1152)}


def inputs(key, n, grid, d, dtype):
    keys = jax.random.split(key, 4)
    x = jax.random.normal(keys[0], (n, grid * grid, d), jnp.float32).astype(dtype)
    kernel, bias = jax.random.normal(keys[1], (3, 3, d)), jax.random.normal(keys[2], (d,))
    return x, kernel, bias, jax.random.normal(keys[3], x.shape, jnp.float32).astype(dtype)


def value_and_grads(conv, grid, x, kernel, bias, dy):
    """(y, dx, dkernel, dbias) of conv(x, kernel, bias, grid_width=grid) for the cotangent dy."""
    y, vjp = jax.vjp(functools.partial(conv, grid_width=grid), x, kernel, bias)
    return (y, *vjp(dy))


def accuracy(impl, shape, dtype):
    """Worst relative L2 error over (y, dx, dkernel, dbias) against the float32 convolution on the same inputs."""
    n, grid, d = shape
    args = inputs(jax.random.key(n * grid + d), n, grid, d, dtype)
    ours = jax.jit(functools.partial(value_and_grads, IMPLS[impl], grid))(*args)
    upcast = [a.astype(jnp.float32) for a in args]
    return worst_relative_error(ours, jax.jit(functools.partial(value_and_grads, IMPLS["conv"], grid))(*upcast))


def time_ms(impl, shape, dtype, repeats=50):
    n, grid, d = shape
    sets = [inputs(jax.random.key(i), n, grid, d, dtype) for i in range(4)]  # rotate: no cache-resident reuse
    step = jax.jit(functools.partial(value_and_grads, IMPLS[impl], grid))
    jax.block_until_ready(step(*sets[0]))
    times = []
    for i in range(repeats):
        args = sets[i % len(sets)]
        jax.block_until_ready(args)
        start = time.perf_counter()
        jax.block_until_ready(step(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main():
    op_benchmark(__doc__, SHAPES, "pallas,conv,shifted",
                 lambda shape: 4 * shape[0] * shape[1] ** 2 * shape[2],  # x and dy in, y and dx out
                 accuracy, lambda impl, shape: time_ms(impl, shape, jnp.bfloat16))


if __name__ == "__main__":
    main()
