"""rms_norm_swish_gate on the GPU: accuracy of each implementation against autodiff of the float32 formula, and the
time of forward + backward (do, dg and the weight gradient) at DiG's shapes, with the HBM floor.

    python benchmarks/output_gate.py --out gate.jsonl

Shapes [N, T, H, V]: DiG-S/2 and DiG-XL/2 at 256 px (batch 32), DiG-S/2 at 1792 px and DiG-XL/2 at 2048 px (batch
1). Times: `step_timing.time_calls` (back-to-back calls: dispatch overlaps execution, as in a training step). The
floor moves o, g and dz in and z, do and dg out once, bf16, at --hbm_tbps. Prints a table last.
"""

import functools
import math

import jax
import jax.numpy as jnp
from results import op_benchmark, worst_relative_error
from step_timing import time_calls

from pallas_kernels.output_gate import IMPLS, gate_reference

SHAPES = {"S/256": (32, 256, 6, 64), "XL/256": (32, 256, 18, 64), "S/1792": (1, 12544, 6, 64),
          "XL/2048": (1, 16384, 18, 64)}
EPS = 1e-6


def inputs(seed, shape, dtype):
    keys = jax.random.split(jax.random.key(seed), 4)
    o, g, dz = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys[:3])
    return o, g, 1 + 0.1 * jax.random.normal(keys[3], shape[-1:]), dz


def value_and_grads(gate, o, g, weight, dz):
    z, vjp = jax.vjp(lambda o, g, weight: gate(o, g, weight, EPS), o, g, weight)
    return (z, *vjp(dz))


def accuracy(impl, shape, dtype):
    """Worst relative L2 error over (z, do, dg, dweight) against autodiff of the formula in float32."""
    args = inputs(sum(shape), shape, dtype)
    ours = jax.jit(functools.partial(value_and_grads, IMPLS[impl]))(*args)
    exact = jax.jit(functools.partial(value_and_grads, gate_reference))(*[a.astype(jnp.float32) for a in args])
    return worst_relative_error(ours, exact)


def time_ms(impl, shape):
    return time_calls(jax.jit(functools.partial(value_and_grads, IMPLS[impl])), *inputs(0, shape, jnp.bfloat16))


def main():
    op_benchmark(__doc__, SHAPES, "pallas,xla", lambda shape: 6 * math.prod(shape),  # o, g, dz in; z, do, dg out
                 accuracy, time_ms)


if __name__ == "__main__":
    main()
