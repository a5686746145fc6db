"""Mesh, FSDP rules, the state memory report, and a sharded train step against one device (8 CPU devices)."""

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P
from multihost_worker import SMALL_FSDP_MIN_SIZE, put_batch, run_steps, tiny_config, tiny_trainer

from dig_jax.data import create_dataset, make_loader
from dig_jax.sharding import make_mesh, param_spec, report_state_memory

# The official count (675,953,952) less the fixed 256 x 1152 position embedding, which is not trained.
DIG_XL2_TRAINABLE_PARAMS = 675_953_952 - 256 * 1152


def test_make_mesh_lays_out_all_devices_and_rejects_sizes_that_do_not_fit():
    mesh = make_mesh(data=-1, fsdp=4)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "seq": 1}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
    assert dict(make_mesh(fsdp=2, seq=2).shape) == {"data": 2, "fsdp": 2, "seq": 2}
    with pytest.raises(ValueError, match="mesh.fsdp=3"):
        make_mesh(fsdp=3)
    with pytest.raises(ValueError, match="mesh.seq=3"):
        make_mesh(seq=3)
    with pytest.raises(ValueError, match="must equal the device count 8"):
        make_mesh(data=4, fsdp=4)


def test_param_spec_splits_the_largest_divisible_dimension_of_big_arrays_only():
    assert param_spec((1152, 6912), fsdp_size=8, fsdp_min_size=2 ** 18) == P(None, "fsdp")
    assert param_spec((4608, 1152), fsdp_size=8, fsdp_min_size=2 ** 18) == P("fsdp", None)
    assert param_spec((6,), fsdp_size=8, fsdp_min_size=1) == P()              # no dimension divisible by 8
    assert param_spec((1152,), fsdp_size=8, fsdp_min_size=2 ** 18) == P()     # small: replicated
    assert param_spec((1152, 6912), fsdp_size=1, fsdp_min_size=2 ** 18) == P()
    assert param_spec((), fsdp_size=8, fsdp_min_size=0) == P()


def test_fsdp8_puts_an_eighth_of_dig_xl2_params_and_optimizer_state_on_each_device():
    report = report_state_memory("DiG-XL/2", make_mesh(data=1, fsdp=8))
    params, opt_state, ema = report["params"].total_bytes, report["opt_state"].total_bytes, report["ema"].total_bytes
    assert params == 4 * DIG_XL2_TRAINABLE_PARAMS
    assert ema == params
    assert 2 * params <= opt_state < 2 * params + 1024  # Adam's two moments plus a step count
    for part, memory in report.items():
        eighth = memory.total_bytes / 8
        assert eighth <= memory.per_device_bytes < 1.03 * eighth, part  # only small arrays are replicated


def test_memory_report_without_fsdp_is_the_whole_state_on_every_device():
    report = report_state_memory("DiG-S/2", AbstractMesh((8, 1), ("data", "fsdp")))
    assert all(memory.per_device_bytes == memory.total_bytes for memory in report.values())


def _global_batches(config, count):
    source = create_dataset(config.data.name, split="train", image_size=config.data.image_size,
                            **config.data.kwargs.to_dict())
    loader = make_loader(source, global_batch_size=config.global_batch_size, seed=config.seed, shard_index=0,
                         shard_count=1)
    return [next(loader) for _ in range(count)]


def test_sharded_train_step_on_data2_fsdp4_matches_one_device_and_donates_the_state():
    config = tiny_config(num_steps=3, mesh_data=2, mesh_fsdp=4)
    batches = _global_batches(config, 3)
    one_losses, one_state = run_steps(make_mesh(1, 1, devices=jax.devices()[:1]), batches, SMALL_FSDP_MIN_SIZE)

    mesh = make_mesh(data=2, fsdp=4)
    state, step, frozen = tiny_trainer(mesh, SMALL_FSDP_MIN_SIZE)
    split = [x for x in jax.tree.leaves(state["params"]) if "fsdp" in x.sharding.spec]
    assert len(split) >= 10 and all(x.addressable_shards[0].data.size == x.size // 4 for x in split)
    losses = []
    for batch in batches:
        previous = state
        state, metrics = step(state, put_batch(batch, mesh), frozen)
        assert all(x.is_deleted() for x in jax.tree.leaves(previous))  # donated: updated in place
        losses.append(float(metrics["loss"]))

    np.testing.assert_allclose(losses, one_losses, rtol=2e-5)
    assert losses[0] != losses[-1]
    for sharded, single in zip(jax.tree.leaves(state), jax.tree.leaves(one_state), strict=True):
        np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-4, atol=1e-6)


def test_sequence_parallel_train_steps_match_one_device():
    """data=2 x fsdp=2 x seq=2: each image's 4 x 4 token grid split into two halves of rows, the batch over the
    other axes; losses and the final state match one device."""
    config = tiny_config(num_steps=2, mesh_data=2, mesh_fsdp=2, mesh_seq=2)
    batches = _global_batches(config, 2)
    one_losses, one_state = run_steps(make_mesh(1, 1, devices=jax.devices()[:1]), batches, SMALL_FSDP_MIN_SIZE)
    losses, state = run_steps(make_mesh(data=2, fsdp=2, seq=2), batches, SMALL_FSDP_MIN_SIZE)
    np.testing.assert_allclose(losses, one_losses, rtol=2e-5)
    for split, single in zip(jax.tree.leaves(state), jax.tree.leaves(one_state), strict=True):
        np.testing.assert_allclose(np.asarray(split), np.asarray(single), rtol=1e-4, atol=1e-6)
