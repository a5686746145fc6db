"""swiglu on the GPU: accuracy of each backward implementation against autodiff of the float32 formula, and the
time of forward + backward at DiG's SwiGLU shapes, with the HBM floor.

    python benchmarks/swiglu.py --out swiglu.jsonl

Shapes [N, T, 2I]: DiG-S/2 and DiG-XL/2 at 256 px (batch 32), DiG-S/2 at 1792 px and DiG-XL/2 at 2048 px (batch 1).
Times: `step_timing.time_calls`. The floor moves x in and the output out (forward), x and the output gradient in
and x's gradient out (backward) once, bf16, at --hbm_tbps. Prints a table last.
"""

import functools
import math

import jax
import jax.numpy as jnp
from results import op_benchmark, worst_relative_error
from step_timing import time_calls

from pallas_kernels.swiglu import IMPLS, swiglu, swiglu_reference

SHAPES = {"S/256": (32, 256, 2048), "XL/256": (32, 256, 6144), "S/1792": (1, 12544, 2048),
          "XL/2048": (1, 16384, 6144)}


def inputs(seed, shape, dtype):
    keys = jax.random.split(jax.random.key(seed))
    x = 4 * jax.random.normal(keys[0], shape, jnp.float32)
    return x.astype(dtype), jax.random.normal(keys[1], (*shape[:-1], shape[-1] // 2), jnp.float32).astype(dtype)


def value_and_grad(activation, x, d_out):
    z, vjp = jax.vjp(activation, x)
    return (z, *vjp(d_out))


def accuracy(impl, shape, dtype):
    """Worst relative L2 error over (z, dx) against autodiff of the formula in float32."""
    args = inputs(sum(shape), shape, dtype)
    ours = jax.jit(functools.partial(value_and_grad, functools.partial(swiglu, impl=impl)))(*args)
    exact = jax.jit(functools.partial(value_and_grad, swiglu_reference))(*[a.astype(jnp.float32) for a in args])
    return worst_relative_error(ours, exact)


def time_ms(impl, shape):
    step = jax.jit(functools.partial(value_and_grad, functools.partial(swiglu, impl=impl)))
    return time_calls(step, *inputs(0, shape, jnp.bfloat16))


def main():
    # Forward: x in, z out (1.5 x); backward: x and dz in, dx out (2.5 x): 4 x the elements of x.
    op_benchmark(__doc__, SHAPES, ",".join(IMPLS), lambda shape: 4 * math.prod(shape), accuracy, time_ms)


if __name__ == "__main__":
    main()
