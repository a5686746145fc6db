"""The GLA layer's core on its packed input projection: `gated_gla`.

fla's GatedLinearAttention (DiG's sequence mixer) makes one projection of its input whose columns hold, side by
side, q [K], k [K], v [V], the output gate's g [V] and a small code from which the log forget gate [K] is made:

    projection [N, T, C]:  q | k | v | g | code          (each part head-major: head h is its h-th block)
    log_forget = forget_fn(code, forget_params)           [N, T, H, K/H] float32
    o          = chunk_gla(q, k, v, log_forget)           [N, T, H, V/H]
    z          = rms_norm_swish_gate(o, g, norm_weight)   [N, T, H, V/H]

Split into arrays, the forward pass copies every part out of the projection and the backward pass concatenates
their gradients back into one array for the projection's matmuls (in DiG-XL/2's 256 px step that concatenate took
1.19 ms, 42 us per block, H100). With the Triton kernels the "packed" path does neither: the kernels read q, k, v
and g where they lie, the gate's backward kernel writes dg into a new array in the projection's layout, the GLA
chunk-gradient kernel writes dq, dk and dv into its columns (aliased), and the code's gradient goes into the last
columns in place. `gated_gla_split` is the same function through the separate ops: the reference, and the path
wherever the kernels do not fit (other backends, head sizes, a sequence split over devices).
"""

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels import gla_triton, output_gate
from pallas_kernels.gla import chunk_gla
from pallas_kernels.gla import resolve_impl as resolve_gla_impl
from pallas_kernels.mesh import ambient_batch_axes, per_batch_shard
from pallas_kernels.output_gate import rms_norm_swish_gate

IMPLS = ("split", "packed")


@dataclasses.dataclass(frozen=True)
class _Layout:
    """What is static about one call: the projection's column layout and the op's options."""

    num_heads: int
    key_dim: int  # K, all heads
    value_dim: int  # V, all heads
    forget_fn: Callable
    reverse: bool
    column_major: bool
    eps: float
    output_name: str | None
    interpret: bool

    @property
    def key_width(self) -> int:
        return self.key_dim // self.num_heads

    @property
    def value_width(self) -> int:
        return self.value_dim // self.num_heads

    @property
    def scan_options(self) -> dict:
        """The keyword arguments of gla_triton.packed_forward and packed_backward."""
        return dict(scale=self.key_width ** -0.5, reverse=self.reverse, column_major=self.column_major,
                    interpret=self.interpret)

    @property
    def firsts(self) -> tuple[int, int, int, int, int]:
        """First columns of q, k, v, g and the code."""
        k, v = self.key_dim, self.value_dim
        return 0, k, 2 * k, 2 * k + v, 2 * k + 2 * v

    def columns(self, projection):
        """q, k, v as `gla_triton.Columns` of the projection."""
        q_first, k_first, v_first, _, _ = self.firsts
        return (gla_triton.Columns(projection, q_first, self.num_heads, self.key_width),
                gla_triton.Columns(projection, k_first, self.num_heads, self.key_width),
                gla_triton.Columns(projection, v_first, self.num_heads, self.value_width))

    def kernels_fit(self, projection) -> bool:
        q_first, k_first, v_first, g_first, _ = self.firsts
        mesh = jax.sharding.get_abstract_mesh()
        batch_shards = math.prod(mesh.shape[axis] for axis in ambient_batch_axes(projection.shape[0]))
        rows = projection.shape[0] // batch_shards * projection.shape[1]  # per batch shard: the kernels' view
        return (gla_triton.packs(self.key_width, self.value_width, (q_first, k_first, v_first))
                and output_gate.packed_gate_fits(rows, self.value_width, g_first))


def _check_inputs(projection, norm_weight, num_heads, key_dim, value_dim):
    if projection.ndim != 3:
        raise ValueError(f"projection must be [N, T, C], got shape {projection.shape}")
    if key_dim % num_heads or value_dim % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide key_dim={key_dim} and value_dim={value_dim}")
    if projection.shape[-1] <= 2 * key_dim + 2 * value_dim:
        raise ValueError(f"projection must have more than 2 key_dim + 2 value_dim = {2 * key_dim + 2 * value_dim} "
                         f"columns (q, k, v, g, then the forget gate's code), got {projection.shape[-1]}")
    if norm_weight.shape != (value_dim // num_heads,):
        raise ValueError(f"norm_weight must be [V / H] = ({value_dim // num_heads},), got {norm_weight.shape}")


def gated_gla(projection, forget_params, norm_weight, *, num_heads: int, key_dim: int, value_dim: int,
              forget_fn: Callable, reverse: bool = False, column_major: bool = False, eps: float,
              impl: str = "auto", gla_impl: str = "auto", gate_impl: str = "auto", output_name: str | None = None,
              interpret: bool = False):
    """RMSNorm-swish-gated chunked GLA of the parts of one packed projection (module docstring).

    Args:
      projection: [N, T, C]: q in columns [0, K), k [K, 2K), v [2K, 2K + V), g [2K + V, 2K + 2V), the forget gate's
        code [2K + 2V, C); within each part head h is the h-th of num_heads equal blocks. bf16 or float32.
      forget_params: the pytree of arrays forget_fn reads (differentiated).
      norm_weight: [V / H] weight of the gate's RMSNorm.
      num_heads, key_dim, value_dim: H, K and V (all heads).
      forget_fn: (code [N, T, C - 2K - 2V], forget_params) -> log forget gate [N, T, K] float32 (<= 0).
      reverse, column_major: the scan order, as in `chunk_gla`; eps: the RMSNorm's.
      impl: "packed" (the Triton kernels on the projection in place; interpret=True runs them on any backend),
        "split" (`gated_gla_split` with gla_impl and gate_impl) or "auto": "packed" on GPUs where both ops would
        take their kernels and the shapes fit them, "split" elsewhere.
      output_name: a jax.checkpoint name given to o, for remat policies.

    Returns:
      z [N, T, H, V / H] in the projection's dtype. Differentiable w.r.t. projection, forget_params, norm_weight.
    """
    _check_inputs(projection, norm_weight, num_heads, key_dim, value_dim)
    layout = _Layout(num_heads, key_dim, value_dim, forget_fn, bool(reverse), bool(column_major), float(eps),
                     output_name, bool(interpret))
    if impl == "auto":
        kernels_chosen = (resolve_gla_impl(gla_impl) == "pallas" and jax.default_backend() == "gpu"
                          and output_gate.resolve_impl(gate_impl, value_dim // num_heads) == "pallas")
        impl = "packed" if kernels_chosen and layout.kernels_fit(projection) else "split"
    if impl not in IMPLS:
        raise ValueError(f"impl must be 'auto' or one of {list(IMPLS)}, got {impl!r}")
    if impl == "split":
        gla = functools.partial(chunk_gla, reverse=reverse, column_major=column_major, impl=gla_impl)
        return gated_gla_split(projection, forget_params, norm_weight, num_heads=num_heads, key_dim=key_dim,
                               value_dim=value_dim, forget_fn=forget_fn, gla=lambda *a: gla(*a)[0], eps=eps,
                               gate_impl=gate_impl, output_name=output_name)
    if not layout.kernels_fit(projection):
        raise ValueError(f"impl='packed' needs K / H and V / H powers of two >= 16 and N * T a multiple of the gate "
                         f"kernels' row blocks, got {projection.shape[:2]}, H={num_heads}, K={key_dim}, V={value_dim}")
    return _packed(projection, forget_params, norm_weight, layout)


def gated_gla_split(projection, forget_params, norm_weight, *, num_heads: int, key_dim: int, value_dim: int,
                    forget_fn: Callable, gla: Callable, eps: float, gate_impl: str = "auto",
                    output_name: str | None = None):
    """`gated_gla` through separate arrays and ops: gla(q, k, v, log_forget) -> o [N, T, H, V / H] is the scan
    (`chunk_gla` with its options, or its sequence-parallel form)."""
    parts = jnp.split(projection, np.cumsum((key_dim, key_dim, value_dim, value_dim)), axis=-1)
    # The parts leave the projection as separate arrays (the barrier): otherwise XLA:GPU lets the gate's backward
    # read g out of the whole projection, keeping it alive from the forward to the backward pass next to the copies
    # of q, k and v the GLA kernels keep (DiG-S/2 step, H200, 2026-12-03).
    q, k, v, g, code = lax.optimization_barrier(tuple(parts))
    heads = lambda x: x.reshape(*x.shape[:2], num_heads, -1)  # noqa: E731
    o = gla(heads(q), heads(k), heads(v), heads(forget_fn(code, forget_params)))
    if output_name:
        o = checkpoint_name(o, output_name)
    return rms_norm_swish_gate(o, heads(g), norm_weight, eps=eps, impl=gate_impl)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _packed(projection, forget_params, norm_weight, layout):
    return _packed_forward(projection, forget_params, norm_weight, layout)[0]


def _packed_forward(projection, forget_params, norm_weight, layout):
    code = projection[..., layout.firsts[-1]:]
    log_forget, forget_vjp = jax.vjp(layout.forget_fn, code, forget_params)
    log_forget = log_forget.reshape(*log_forget.shape[:2], layout.num_heads, -1)

    def kernels(projection, log_forget, norm_weight):
        o, gla_residuals = gla_triton.packed_forward(*layout.columns(projection), log_forget, **layout.scan_options)
        if layout.output_name:
            o = checkpoint_name(o, layout.output_name)
        z = output_gate.packed_gate_forward(o, projection, norm_weight, g_first=layout.firsts[3], eps=layout.eps,
                                            interpret=layout.interpret)
        return z, o, *gla_residuals

    z, o, states, strength = per_batch_shard(kernels, (projection, log_forget), (norm_weight,))
    return z, (projection, norm_weight, log_forget, o, states, strength, forget_vjp)


def _packed_backward(layout, residuals, dz):
    projection, norm_weight, log_forget, o, states, strength, forget_vjp = residuals

    def kernels(projection, log_forget, o, dz, states, strength, norm_weight):
        do, d_projection, d_norm_weight = output_gate.packed_gate_backward(
            o, projection, dz, norm_weight, g_first=layout.firsts[3], eps=layout.eps, interpret=layout.interpret)
        d_projection, d_log_forget = gla_triton.packed_backward(
            *layout.columns(projection), log_forget, (states, strength), do, d_projection, **layout.scan_options)
        return d_projection, d_log_forget, d_norm_weight

    d_projection, d_log_forget, d_norm_weight = per_batch_shard(
        kernels, (projection, log_forget, o, dz, states, strength), (norm_weight,))
    d_code, d_forget_params = forget_vjp(d_log_forget.reshape(*d_log_forget.shape[:2], -1))
    d_projection = lax.dynamic_update_slice_in_dim(d_projection, d_code.astype(projection.dtype),
                                                   layout.firsts[-1], axis=-1)
    return d_projection, d_forget_params, d_norm_weight.sum(0).astype(norm_weight.dtype)


_packed.defvjp(_packed_forward, _packed_backward)
