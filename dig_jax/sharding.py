"""Device mesh and shardings for the train state and batches, and a per-device memory report of the state.

The mesh has axes ("data", "fsdp", "seq"):
- Batches are split over "data" and "fsdp", so every group of "seq" devices computes on global_batch / (data * fsdp)
  examples.
- Parameters, Adam moments and EMA weights with at least `fsdp_min_size` elements are split over "fsdp" along
  their largest dimension divisible by the fsdp size (FSDP / ZeRO-3): each device stores 1/fsdp of them. Smaller
  arrays (biases, norms, small tables) and scalars are replicated: splitting them saves little memory and costs a
  collective each.
- Over "data" everything in the state is replicated (plain data parallelism).
- "seq" (sequence parallelism, default size 1) splits each image's tokens by rows of the token grid inside DiG's
  block stack (dig_jax/models/sequence_parallel.py): batches and the state are replicated over it, and DiG passes
  GLA states, conv halo rows and grid transposes between its devices. For images whose activations do not fit one
  device (DiG-XL/2 at 2048 px and beyond: 16K+ tokens per image).
XLA's sharding propagation inserts the collectives. With fsdp > 1 and no sharding constraints inside the model it
may split some activations along the hidden axis instead of gathering the weight (it then warns "Involuntary full
rematerialization"): the result is the same, only slower.

    python -m dig_jax.sharding --model DiG-XL/2 --fsdp 8   # state memory per device, no accelerator needed
"""

import argparse
import dataclasses

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from dig_jax.config_base import paper_config
from dig_jax.models.sequence_parallel import SEQUENCE_AXIS
from dig_jax.train_state import abstract_train_state

AXES = ("data", "fsdp", SEQUENCE_AXIS)
BATCH_AXES = ("data", "fsdp")
DEFAULT_FSDP_MIN_SIZE = 2 ** 18  # elements; 1 MiB in float32


def make_mesh(data: int = -1, fsdp: int = 1, devices=None, seq: int = 1) -> Mesh:
    """A ("data", "fsdp", "seq") mesh over `devices` (default: all devices of all processes); data=-1 takes what
    fsdp and seq leave.

    Devices are laid out by `jax.make_mesh`: on TPU along the chip torus, so that neighbouring fsdp shards are
    neighbouring chips; on GPU and CPU in process order, so that with fsdp * seq <= devices per process the "seq"
    and "fsdp" collectives stay inside a host and "data" spans the hosts.
    """
    devices = jax.devices() if devices is None else list(devices)
    for name, size in (("fsdp", fsdp), ("seq", seq)):
        if size < 1 or len(devices) % size:
            raise ValueError(f"mesh.{name}={size} must be >= 1 and divide the device count {len(devices)}")
    data = len(devices) // (fsdp * seq) if data == -1 else data
    if data * fsdp * seq != len(devices):
        raise ValueError(f"mesh.data * mesh.fsdp * mesh.seq = {data} * {fsdp} * {seq} must equal the device count "
                         f"{len(devices)}")
    return jax.make_mesh((data, fsdp, seq), AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def batch_sharding(mesh: Mesh, *, stacked: bool = False) -> NamedSharding:
    """Batch axis split over every device: the leading one, or the second one of `stacked` leaves
    [steps, batch, ...] (the batches of several train steps run by one call)."""
    return NamedSharding(mesh, P(None, BATCH_AXES) if stacked else P(BATCH_AXES))


def under_mesh(mesh: Mesh, fn):
    """`fn` wrapped to run with `mesh` active (`jax.set_mesh`, which cannot be entered inside a jit trace).

    Ops that place themselves on the ambient mesh see it while `fn` traces: the Pallas GLA kernels run per shard
    inside a shard_map over it (XLA cannot partition a Pallas call itself). Wrap the jitted train step with it.
    """

    def call(*args, **kwargs):
        with jax.set_mesh(mesh):
            return fn(*args, **kwargs)

    return call


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


def state_shardings(abstract_state, mesh: Mesh | AbstractMesh, fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE):
    """NamedShardings for a pytree of arrays/ShapeDtypeStructs (params, optimizer state, EMA)."""
    fsdp_size = mesh.shape["fsdp"]

    def sharding(x):
        shape = getattr(x, "shape", ())
        return NamedSharding(mesh, param_spec(tuple(shape), fsdp_size, fsdp_min_size))

    return jax.tree.map(sharding, abstract_state)


@dataclasses.dataclass(frozen=True)
class StateMemory:
    """Bytes of one part of the train state: summed over its arrays, and what one device stores."""

    total_bytes: int
    per_device_bytes: int


def report_state_memory(config_or_model_name: ConfigDict | str, mesh: Mesh | AbstractMesh,
                        fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE) -> dict[str, StateMemory]:
    """Memory of the train state under `state_shardings` on `mesh`, computed from shapes only.

    Args:
      config_or_model_name: a training config, or a model name (the paper's ImageNet 256 recipe for it).
      mesh: a Mesh, or an AbstractMesh((data, fsdp, seq), AXES) to plan for devices one does not have.
      fsdp_min_size: as in `state_shardings`.

    Returns:
      {"params", "opt_state", "ema", "total"} -> StateMemory. Activations and XLA's temporary buffers are not
      included: they depend on the batch and the compiler (see the compiled step's memory_analysis()).
    """
    if isinstance(config_or_model_name, str):
        config_or_model_name = paper_config(config_or_model_name)
    state = abstract_train_state(config_or_model_name)
    shardings = state_shardings(state, mesh, fsdp_min_size)
    report = {part: _memory(state[part], shardings[part]) for part in ("params", "opt_state", "ema")}
    report["total"] = _memory(state, shardings)
    return report


def _memory(abstract_tree, shardings) -> StateMemory:
    leaves, shards = jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)
    total = sum(int(np.prod(x.shape, dtype=np.int64)) * x.dtype.itemsize for x in leaves)
    per_device = sum(int(np.prod(s.shard_shape(x.shape), dtype=np.int64)) * x.dtype.itemsize
                     for x, s in zip(leaves, shards, strict=True))
    return StateMemory(total, per_device)


def format_state_memory(report: dict[str, StateMemory]) -> str:
    lines = [f"{'part':<10} {'total GiB':>10} {'per device GiB':>15}"]
    for part, memory in report.items():
        lines.append(f"{part:<10} {memory.total_bytes / 2 ** 30:>10.3f} {memory.per_device_bytes / 2 ** 30:>15.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Train-state memory per device (params, Adam, EMA).")
    parser.add_argument("--model", default="DiG-XL/2", help="model name (dig_jax.models.MODELS)")
    parser.add_argument("--data", type=int, default=1, help="mesh data size")
    parser.add_argument("--fsdp", type=int, default=8, help="mesh fsdp size")
    parser.add_argument("--fsdp_min_size", type=int, default=DEFAULT_FSDP_MIN_SIZE)
    args = parser.parse_args()
    mesh = AbstractMesh((args.data, args.fsdp, 1), AXES)
    print(f"{args.model} on mesh data={args.data} x fsdp={args.fsdp}")
    print(format_state_memory(report_state_memory(args.model, mesh, args.fsdp_min_size)))


if __name__ == "__main__":
    main()
