"""Device mesh and shardings for the train state and batches.

The mesh has axes ("data", "fsdp"). Batches are split over both axes. Parameters, optimizer state and EMA are
replicated over "data" and, for weights with at least `fsdp_min_size` elements, split over "fsdp" along their
largest dimension divisible by the fsdp size (FSDP / ZeRO-3); everything smaller is replicated.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A ("data", "fsdp") mesh over `devices` (default all); data=-1 takes what fsdp leaves."""
    devices = jax.devices() if devices is None else devices
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"mesh.fsdp={fsdp} must be >= 1 and divide the device count {len(devices)}")
    data = len(devices) // fsdp if data == -1 else data
    if data * fsdp != len(devices):
        raise ValueError(f"mesh.data * mesh.fsdp = {data} * {fsdp} must equal the device count {len(devices)}")
    return Mesh(np.asarray(devices).reshape(data, fsdp), ("data", "fsdp"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device."""
    return NamedSharding(mesh, P(BATCH_AXES))


def param_spec(shape, fsdp_size: int, fsdp_min_size: int) -> P:
    """Splits the largest dimension divisible by `fsdp_size` over "fsdp" for big arrays; replicates the rest."""
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < fsdp_min_size:
        return P()
    candidates = [axis for axis in np.argsort(shape)[::-1] if shape[axis] % fsdp_size == 0]
    if not candidates:
        return P()
    spec = [None] * len(shape)
    spec[candidates[0]] = "fsdp"
    return P(*spec)


def state_shardings(abstract_state, mesh: Mesh, fsdp_min_size: int = 2 ** 18):
    """NamedShardings for a pytree of arrays/ShapeDtypeStructs (params, optimizer state, EMA)."""
    fsdp_size = mesh.shape["fsdp"]

    def sharding(x):
        shape = getattr(x, "shape", ())
        return NamedSharding(mesh, param_spec(tuple(shape), fsdp_size, fsdp_min_size))

    return jax.tree.map(sharding, abstract_state)
