"""The ambient mesh as the Pallas wrappers see it: which of its axes can split an array's leading (batch) axis.

A pallas_call is opaque to XLA's SPMD partitioner, so the ops run their kernels inside `jax.shard_map` over the
mesh active while they trace (`jax.set_mesh`). Axes already in manual mode (inside an enclosing shard_map) are
left alone: the arrays seen there are already per-device.
"""

import jax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

HEAD_AXIS_NAMES = ("model", "tensor", "heads")  # axes that split heads rather than the batch, by convention


def divisible_prefix(mesh, names, dim: int) -> tuple:
    """The longest run of `names` (in order) whose combined size divides `dim`."""
    axes, size = [], 1
    for name in names:
        if dim % (size * mesh.shape[name]) != 0:
            break
        axes.append(name)
        size *= mesh.shape[name]
    return tuple(axes)


def auto_axis_names(mesh) -> list:
    """The mesh's axes that are not manual, in mesh order."""
    return [name for name, kind in zip(mesh.axis_names, mesh.axis_types) if kind != AxisType.Manual]


def ambient_batch_axes(batch: int) -> tuple:
    """Axes of the ambient mesh (other than head axes) that split a batch of `batch`, or () without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return ()
    axes = divisible_prefix(mesh, [name for name in auto_axis_names(mesh) if name not in HEAD_AXIS_NAMES], batch)
    return axes if any(mesh.shape[name] > 1 for name in axes) else ()


def per_batch_shard(fn, batched: tuple, shared: tuple = ()):
    """fn(*batched, *shared) run on each batch shard of the ambient mesh, or directly without one.

    batched: arrays with the batch axis first, split over `ambient_batch_axes`; shared: arrays every shard gets
    whole. fn's outputs keep the batch axis first (per-shard sums come out stacked along it, for the caller to add).
    """
    batch_axes = ambient_batch_axes(batched[0].shape[0])
    if not batch_axes:
        return fn(*batched, *shared)
    specs = (P(batch_axes),) * len(batched) + (P(),) * len(shared)
    return jax.shard_map(fn, mesh=jax.sharding.get_abstract_mesh(), in_specs=specs, out_specs=P(batch_axes),
                         check_vma=False)(*batched, *shared)
