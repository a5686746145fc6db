"""gated_gla on the GPU: the packed kernels against the split ops (GLA and gate kernels on separate arrays), accuracy
and the time of forward + backward at DiG's GLA layer shapes.

    python benchmarks/gla_layer.py --hbm_tbps 3.35 --out gla_layer.jsonl

Shapes (N, T, D, H), the layer's projection [N, T, 3D + 16] with K = D/2, V = D: DiG-S/2 and DiG-XL/2 at 256 px
(batch 32), DiG-S/2 at 1792 px and DiG-XL/2 at 2048 px (batch 1). Accuracy: the worst relative error over
(z, the projection's gradient, the forget gate's and the norm's weight gradients) against the plain-XLA split path
in float32. Times: `step_timing.time_calls`. The floor is a rough one: forward reads q, k, v, g and writes o and z
(5D per token), backward reads them with dz, writes and reads dL/do and writes the projection's gradient (10D),
bf16 at --hbm_tbps; the GLA states are left out. Prints a table last.

The plain-XLA reference is ill-conditioned on these inputs: with q and k drawn N(0, 1), q . k is near 0 for some
sequences' first token, whose o then has a tiny RMS, and the gate's backward divides by it; dq and dk of those rows
dominate the error of both paths alike (docs/benchmarks.md). Packed against split is the comparison that tests the
packing.
"""

import functools

import jax
import jax.numpy as jnp
from results import op_benchmark, worst_relative_error
from step_timing import time_calls

from dig_jax.models.dig import GATE_LOW_RANK, RMS_NORM_EPS, log_forget_from_code
from pallas_kernels.gla_layer import IMPLS, gated_gla

SHAPES = {"S/256": (32, 256, 384, 6), "XL/256": (32, 256, 1152, 18), "S/1792": (1, 12544, 384, 6),
          "XL/2048": (1, 16384, 1152, 18)}


def inputs(seed, shape, dtype):
    n, t, d, heads = shape
    keys = jax.random.split(jax.random.key(seed), 5)
    projection = jax.random.normal(keys[0], (n, t, 3 * d + GATE_LOW_RANK), jnp.float32)
    forget_params = (0.3 * jax.random.normal(keys[1], (GATE_LOW_RANK, d // 2)),
                     0.1 * jax.random.normal(keys[2], (d // 2,)))
    norm_weight = 1 + 0.1 * jax.random.normal(keys[3], (d // heads,))
    dz = jax.random.normal(keys[4], (n, t, heads, d // heads))
    cast = lambda x: x.astype(dtype)  # noqa: E731
    return cast(projection), jax.tree.map(cast, forget_params), norm_weight, cast(dz)


def value_and_grads(shape, impl, projection, forget_params, norm_weight, dz, **impls):
    layer = functools.partial(gated_gla, num_heads=shape[3], key_dim=shape[2] // 2, value_dim=shape[2],
                              forget_fn=log_forget_from_code, eps=RMS_NORM_EPS, impl=impl, **impls)
    z, vjp = jax.vjp(layer, projection, forget_params, norm_weight)
    return (z, *jax.tree.leaves(vjp(dz)))


def accuracy(impl, shape, dtype):
    args = inputs(sum(shape), shape, dtype)
    ours = jax.jit(functools.partial(value_and_grads, shape, impl))(*args)
    exact = jax.jit(functools.partial(value_and_grads, shape, "split", gla_impl="xla", gate_impl="xla"))(
        *jax.tree.map(lambda x: x.astype(jnp.float32), args))
    return worst_relative_error(ours, exact)


def time_ms(impl, shape):
    return time_calls(jax.jit(functools.partial(value_and_grads, shape, impl)), *inputs(0, shape, jnp.bfloat16))


def main():
    op_benchmark(__doc__, SHAPES, ",".join(IMPLS), lambda shape: 15 * shape[0] * shape[1] * shape[2], accuracy,
                 time_ms)


if __name__ == "__main__":
    main()
