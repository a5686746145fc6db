"""One process of a local multi-process training job: runs the real `dig_jax.train.train` on a tiny config.
Also the tests' single-process reference: the trainer's state and jitted step, fed given batches.

test_multihost.py starts it as several processes on this machine (CPU devices, gloo collectives):
    XLA_FLAGS=--xla_force_host_platform_device_count=4 \
        python tests/multihost_worker.py WORKDIR --num_steps 4 --processes 2 --process_id 0 --port 12345 \
        --mesh_data 2 --mesh_fsdp 4
With --processes 1 it is an ordinary single-process run (no coordinator).
"""

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from ml_collections import ConfigDict  # noqa: E402

from dig_jax.config_base import base_config  # noqa: E402
from dig_jax.sharding import DEFAULT_FSDP_MIN_SIZE, batch_sharding  # noqa: E402
from dig_jax.train import build_trainer, train  # noqa: E402

GLOBAL_BATCH_SIZE = 16
# Small enough that the tiny model's kernels are all split by FSDP (the default, 2**18, leaves most whole).
SMALL_FSDP_MIN_SIZE = 1024


def tiny_config(num_steps: int, mesh_data: int, mesh_fsdp: int, mesh_seq: int = 1) -> ConfigDict:
    """A one-block DiG on 8x8 "shapes" images. hidden_size 256 makes the adaLN and MLP-in kernels (256 x 1536)
    big enough for FSDP to split them, so sharded arrays cross the process boundary in steps and checkpoints."""
    c = base_config()
    c.model.name = "DiG-S/2"
    c.model.input_size = 8
    c.model.in_channels = 3
    c.model.num_classes = 12
    c.model.options = dict(depth=1, hidden_size=256, num_heads=4, gla_impl="xla")
    c.data.name = "shapes"
    c.data.space = "pixel"
    c.data.image_size = 8
    c.data.kwargs = dict(num_images=256)
    c.data.worker_count = 0  # in-process reading: loader processes would only compete for the test machine's cores
    c.optimizer.learning_rate = 1e-3
    c.ema_decay = 0.9
    c.global_batch_size = GLOBAL_BATCH_SIZE
    c.num_steps = num_steps
    c.log_every = 1
    c.checkpoint_every = 2
    c.mesh.data = mesh_data
    c.mesh.fsdp = mesh_fsdp
    c.mesh.seq = mesh_seq
    c.sample.per_class = 0
    return c


@functools.cache
def _tiny_trainer(mesh, fsdp_min_size: int):
    """`train`'s model and jitted step for the tiny config on `mesh`; cached so that tests sharing a mesh compile
    once."""
    config = tiny_config(num_steps=1, mesh_data=mesh.shape["data"], mesh_fsdp=mesh.shape["fsdp"],
                         mesh_seq=mesh.shape["seq"])
    return build_trainer(config, mesh, fsdp_min_size)


def tiny_trainer(mesh, fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE):
    """A fresh train state of `tiny_config`'s model on `mesh`, and the jitted step, as `train` builds them.

    Returns (state, step, frozen); `step(state, put_batch(batch, mesh), frozen)` -> (state, metrics) runs one
    train step and donates `state`.
    """
    trainer = _tiny_trainer(mesh, fsdp_min_size)
    return trainer.initial_state(), trainer.train_steps, trainer.space.frozen


def put_batch(batch: dict, mesh):
    """A global numpy batch as the trainer's step takes it: stacked as one step's batch, placed over `mesh`."""
    return jax.device_put({key: value[None] for key, value in batch.items()}, batch_sharding(mesh, stacked=True))


def run_steps(mesh, batches, fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE):
    """One step of the tiny model per global batch on `mesh` (batches: {"image": float32 [global_batch, H, W, 3],
    "label": int32 [global_batch]} numpy dicts). Returns (losses as floats, final state)."""
    state, step, frozen = tiny_trainer(mesh, fsdp_min_size)
    losses = []
    for batch in batches:
        state, metrics = step(state, put_batch(batch, mesh), frozen)
        losses.append(float(metrics["loss"]))
    return losses, state


def concatenated(*per_host_batches) -> dict:
    """The global batch that per-host batches (in process order) make."""
    return {key: np.concatenate([b[key] for b in per_host_batches]) for key in per_host_batches[0]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--num_steps", type=int, required=True)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--process_id", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--mesh_data", type=int, default=-1)
    parser.add_argument("--mesh_fsdp", type=int, default=1)
    args = parser.parse_args()

    config = tiny_config(args.num_steps, args.mesh_data, args.mesh_fsdp)
    if args.processes > 1:
        config.distributed.coordinator_address = f"localhost:{args.port}"
        config.distributed.num_processes = args.processes
        config.distributed.process_id = args.process_id
    train(config, args.workdir)


if __name__ == "__main__":
    main()
