"""The backward pass of DiG's fused GLA input projection on the GPU, two ways: accuracy against float32 autodiff and
the time of forward + backward at DiG's shapes, with the HBM floor.

    python benchmarks/projection_gradient.py --out projection.jsonl

The model computes q, k, v, g and the forget gate's code as one matmul x [T, D] @ in_proj [D, 2K + 2V + 16]. Where
it splits the product (`pallas_kernels.gla_layer.gated_gla_split`) the parts' gradients come from different
kernels, so autodiff ("concatenate") writes them into one [T, 2K + 2V + 16] array before the two backward matmuls;
in the DiG-XL/2 step that concatenate cost 42 us per block (docs/benchmarks.md). On GPUs the model now takes the
packed path of `gated_gla`, whose kernels write the gradients into one array in place (benchmarks/gla_layer.py).
"per_part" has a custom VJP that reads the five gradients where they lie: dx as five matmuls summed, the kernel
gradient as five matmuls side by side.
"split_forward" is the other way round: the forward pass writes each part with a matmul of its own (no copies out
of the product, which the Pallas kernels that read the parts need as arrays of their own), the backward pass is
autodiff's (the concatenate, then one matmul for dx and one for the kernel gradient).
Shapes (tokens, D): DiG-S/2 and DiG-XL/2 at 256 px (batch 32), DiG-S/2 at 1792 px and DiG-XL/2 at 2048 px (batch 1).
The floor moves x and the five gradients in, the product and dx out once (bf16), and the kernel and its gradient
(float32). Prints a table last.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from results import op_benchmark, worst_relative_error
from step_timing import time_calls

from dig_jax.models.dig import gla_input_widths

SHAPES = {"S/256": (8192, 384), "XL/256": (8192, 1152), "S/1792": (12544, 384), "XL/2048": (16384, 1152)}


def _split(product, widths):
    return tuple(jnp.split(product, np.cumsum(widths[:-1]), axis=-1))


def project_concatenate(x, kernel, widths):
    return lax.optimization_barrier(_split(x @ kernel.astype(x.dtype), widths))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def project_per_part(x, kernel, widths):
    return project_concatenate(x, kernel, widths)


def _per_part_forward(x, kernel, widths):
    return project_concatenate(x, kernel, widths), (x, kernel)


def _per_part_backward(widths, residuals, d_parts):
    x, kernel = residuals
    kernels = _split(kernel.astype(x.dtype), widths)
    dx = sum(jnp.dot(d, k.T, preferred_element_type=jnp.float32) for d, k in zip(d_parts, kernels))
    d_kernel = jnp.concatenate([jnp.dot(x.T, d, preferred_element_type=jnp.float32) for d in d_parts], axis=-1)
    return dx.astype(x.dtype), d_kernel.astype(kernel.dtype)


project_per_part.defvjp(_per_part_forward, _per_part_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def project_split_forward(x, kernel, widths):
    return tuple(jnp.dot(x, k) for k in _split(kernel.astype(x.dtype), widths))


def _split_forward_forward(x, kernel, widths):
    return project_split_forward(x, kernel, widths), (x, kernel)


def _split_forward_backward(widths, residuals, d_parts):
    x, kernel = residuals
    d_product = jnp.concatenate(d_parts, axis=-1)
    dx = jnp.dot(d_product, kernel.astype(x.dtype).T, preferred_element_type=jnp.float32)
    d_kernel = jnp.dot(x.T, d_product, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), d_kernel.astype(kernel.dtype)


project_split_forward.defvjp(_split_forward_forward, _split_forward_backward)
IMPLS = {"concatenate": project_concatenate, "per_part": project_per_part, "split_forward": project_split_forward}


def _inputs(seed, shape, dtype):
    tokens, d = shape
    widths = gla_input_widths(d)
    keys = jax.random.split(jax.random.key(seed), 2 + len(widths))
    x = jax.random.normal(keys[0], (tokens, d), jnp.float32).astype(dtype)
    kernel = jax.random.normal(keys[1], (d, sum(widths)), jnp.float32) / np.sqrt(d)
    d_parts = tuple(jax.random.normal(key, (tokens, w), jnp.float32).astype(dtype) for key, w in zip(keys[2:], widths))
    return x, kernel, d_parts


def _value_and_grads(project, x, kernel, d_parts):
    widths = tuple(d.shape[-1] for d in d_parts)
    parts, vjp = jax.vjp(lambda x, kernel: project(x, kernel, widths), x, kernel)
    return (*parts, *vjp(d_parts))


def accuracy(impl, shape, dtype):
    """Worst relative L2 error over (the parts, dx, d_kernel) against autodiff of the matmul in float32."""
    args = _inputs(sum(shape), shape, dtype)
    ours = jax.jit(functools.partial(_value_and_grads, IMPLS[impl]))(*args)
    x, kernel, d_parts = args
    exact_args = (x.astype(jnp.float32), kernel, tuple(d.astype(jnp.float32) for d in d_parts))
    exact = jax.jit(functools.partial(_value_and_grads, project_concatenate))(*exact_args)
    return worst_relative_error(ours, exact)


def time_ms(impl, shape):
    return time_calls(jax.jit(functools.partial(_value_and_grads, IMPLS[impl])), *_inputs(0, shape, jnp.bfloat16))


def moved_elements(shape):
    """bf16-element equivalents: x, the gradients, the product and dx once; kernel and its gradient in float32."""
    tokens, d = shape
    columns = sum(gla_input_widths(d))
    return 2 * tokens * d + 2 * tokens * columns + 2 * 2 * d * columns


def main():
    op_benchmark(__doc__, SHAPES, "concatenate,per_part,split_forward", moved_elements, accuracy, time_ms)


if __name__ == "__main__":
    main()
