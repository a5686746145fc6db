"""impl="pallas": the backend's fused Pallas kernels, run per shard when a multi-device mesh is active.

Backends: "gpu" runs `gla_triton` (Triton lowering), "tpu" runs `gla_tpu` (Mosaic). Others raise: use
impl="xla" or "reference" there.

Sharding
--------
A pallas_call is opaque to the SPMD partitioner: under jit with sharded inputs XLA would gather everything onto
each device. So when a mesh with more than one device is active (`jax.set_mesh`, read back through
`jax.sharding.get_abstract_mesh()`), the kernel runs inside `jax.shard_map` over the batch and head axes, which is
exact because GLA never mixes batch elements or heads. The mesh axes are assigned as follows:
  * Explicit mesh axes: q's own sharding (its type) says which axes split B (dim 0) and H (dim 2); T and K must
    not be split (the scan runs along T).
  * Auto mesh axes: axes named in HEAD_AXIS_NAMES split H, all others split B, each taken in mesh order only while
    the dim stays divisible. An axis that splits neither (e.g. a batch of 1 on a data axis) replicates the work.
  * Manual mesh axes (inside an enclosing shard_map, e.g. the sequence axis of `sequence_parallel_chunk_gla`)
    already hold per-device blocks: they are left alone, and only the other axes split B and H.
shard_map reshards inputs whose layout differs from these specs, so the result is right for any input sharding.
"""

import functools

import jax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from pallas_kernels.gla_tpu import gla_tpu
from pallas_kernels.gla_triton import gla_triton
from pallas_kernels.mesh import HEAD_AXIS_NAMES, auto_axis_names, divisible_prefix
from pallas_kernels.token_grid import scan_columns_by_transposing


def gla_pallas(q, k, v, g, *, scale, initial_state, reverse, column_major=False):
    """q, k, g: [B, T, H, K]; v: [B, T, H, V]; initial_state: [B, H, K, V] float32 or None; column_major: scan
    the T = S * S tokens (raster order) of a square grid column by column (`chunk_gla`).

    Returns (o [B, T, H, V] in v's dtype, final_state [B, H, K, V] float32).
    """
    backend = jax.default_backend()
    kernel = functools.partial(_backend_kernel(backend), scale=scale, reverse=reverse)
    if not column_major:
        return shard_over_batch_and_heads(kernel, q, k, v, g, initial_state)
    if backend == "gpu":  # the Triton kernels gather the grid's columns themselves
        return shard_over_batch_and_heads(functools.partial(kernel, column_major=True), q, k, v, g, initial_state)
    return scan_columns_by_transposing(functools.partial(shard_over_batch_and_heads, kernel), q, k, v, g,
                                       initial_state)


def _backend_kernel(backend):
    if backend == "gpu":
        return gla_triton
    if backend == "tpu":
        return gla_tpu
    raise ValueError(f"impl='pallas' needs a GPU or TPU backend, got {backend!r}; use impl='xla' or 'reference'")


def shard_over_batch_and_heads(kernel, q, k, v, g, initial_state):
    """Calls kernel(q, k, v, g, initial_state=...) -> (o, final_state) on each (batch, head) shard of the active
    mesh, or directly when no mesh axis other than manual ones (of an enclosing shard_map) splits anything."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or all(mesh.shape[name] == 1 for name in auto_axis_names(mesh)):
        return kernel(q, k, v, g, initial_state=initial_state)
    batch_axes, head_axes = (axes or None for axes in _batch_and_head_axes(mesh, q))
    shard_map = functools.partial(jax.shard_map, mesh=mesh, axis_names=set(auto_axis_names(mesh)), check_vma=False)
    sequence_spec = P(batch_axes, None, head_axes, None)
    state_spec = P(batch_axes, head_axes, None, None)
    out_specs = (sequence_spec, state_spec)
    if initial_state is None:
        return shard_map(lambda q, k, v, g: kernel(q, k, v, g, initial_state=None),
                         in_specs=(sequence_spec,) * 4, out_specs=out_specs)(q, k, v, g)
    return shard_map(lambda q, k, v, g, h: kernel(q, k, v, g, initial_state=h),
                     in_specs=(sequence_spec,) * 4 + (state_spec,), out_specs=out_specs)(q, k, v, g, initial_state)


def _batch_and_head_axes(mesh, q):
    """(batch axes, head axes) as tuples of mesh axis names."""
    if any(axis_type == AxisType.Explicit for axis_type in mesh.axis_types):
        spec = tuple(jax.typeof(q).sharding.spec) + (None,) * q.ndim
        if spec[1] is not None or spec[3] is not None:
            raise ValueError(f"q must not be sharded along T or K (dims 1 and 3) for impl='pallas', "
                             f"got spec {spec[:4]}")
        return _as_axes(spec[0]), _as_axes(spec[2])
    batch, _, heads, _ = q.shape
    free_axes = auto_axis_names(mesh)
    head_axes = divisible_prefix(mesh, [name for name in free_axes if name in HEAD_AXIS_NAMES], heads)
    batch_axes = divisible_prefix(mesh, [name for name in free_axes if name not in HEAD_AXIS_NAMES], batch)
    return batch_axes, head_axes


def _as_axes(entry):
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)
