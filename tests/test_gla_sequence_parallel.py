"""Sequence-parallel GLA on 2, 4 and 8 host devices against the unsharded op: outputs, final state and the
gradients of q, k, v, g and the initial state, in both scan directions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from pallas_kernels import chunk_gla, sequence_parallel_chunk_gla
from pallas_kernels import gla_pallas as gla_pallas_module
from pallas_kernels.gla_triton import gla_triton
from pallas_kernels.testing import STRONG_GATES, WEAK_GATES, make_inputs, rms_rel_err

NAMES = ("o", "final_state", "dq", "dk", "dv", "dg", "dinitial_state")
TOLERANCE = 1e-4  # float32 throughout: only the order of the sums differs from the unsharded op


def outputs_and_grads(gla, inputs, cotangents):
    """(o, final_state, dq, dk, dv, dg, dinitial_state) of gla(q, k, v, g, initial_state) -> (o, final_state)."""
    (o, final_state), vjp = jax.vjp(gla, *inputs)
    return (o, final_state, *vjp(cotangents))


def unsharded(inputs, cotangents, *, impl, reverse):
    gla = functools.partial(chunk_gla, output_final_state=True, reverse=reverse, impl=impl)
    return jax.jit(lambda inputs: outputs_and_grads(lambda *x: gla(*x[:4], initial_state=x[4]), inputs,
                                                    cotangents))(inputs)


def sharded(inputs, cotangents, mesh, *, impl, reverse, check_vma):
    """The op inside a shard_map that splits T over mesh axis "seq" (other mesh axes stay automatic)."""
    tokens = P(None, "seq")
    state_spec = () if inputs[4] is None else (P(),)  # an initial state of None is no argument

    def local_gla(q, k, v, g, *initial_state):
        return sequence_parallel_chunk_gla(q, k, v, g, axis_name="seq", initial_state=(initial_state or [None])[0],
                                           output_final_state=True, reverse=reverse, impl=impl)

    gla = jax.shard_map(local_gla, mesh=mesh, in_specs=(tokens,) * 4 + state_spec, out_specs=(tokens, P()),
                        axis_names={"seq"}, check_vma=check_vma)

    def run(inputs):
        o, final_state, *grads = outputs_and_grads(gla, inputs[:4] + inputs[4:] * bool(state_spec), cotangents)
        return (o, final_state, *grads, *([None] * (5 - len(grads))))

    with jax.set_mesh(mesh):
        return jax.jit(run)(inputs)


def random_cotangents(seed, batch, seq_len, heads, key_dim, value_dim):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((batch, seq_len, heads, value_dim), np.float32)),
            jnp.asarray(rng.standard_normal((batch, heads, key_dim, value_dim), np.float32)))


def assert_sharded_matches_unsharded(mesh, dims, *, impl, reverse, with_initial_state, gate_strength,
                                     check_vma=True):
    inputs = make_inputs(7, *dims, gate_strength=gate_strength, with_initial_state=with_initial_state)
    cotangents = random_cotangents(8, *dims)
    actual = sharded(inputs, cotangents, mesh, impl=impl, reverse=reverse, check_vma=check_vma)
    expected = unsharded(inputs, cotangents, impl=impl, reverse=reverse)
    errors = {name: rms_rel_err(a, e) for name, a, e in zip(NAMES, actual, expected) if e is not None}
    assert (actual[-1] is None) == (not with_initial_state)
    assert all(error < TOLERANCE for error in errors.values()), errors


def seq_mesh(devices):
    return jax.make_mesh((devices,), ("seq",), axis_types=(AxisType.Auto,), devices=jax.devices()[:devices])


# (devices, T per device, reverse, with_initial_state, gates, check_vma): T per device below, above and far from a
# multiple of the chunk size 64; weak gates carry the state across several devices; shard_map with and without its
# varying-axes type checks (the gathers and the gradient sums differ).
CASES = [
    (2, 70, False, True, WEAK_GATES, True),
    (2, 70, True, True, WEAK_GATES, False),
    (4, 37, False, False, WEAK_GATES, False),
    (4, 37, True, True, STRONG_GATES, True),
    (8, 20, True, False, WEAK_GATES, True),
    (8, 20, False, True, WEAK_GATES, False),
]


@pytest.mark.parametrize("devices, local_len, reverse, with_initial_state, gate_strength, check_vma", CASES)
def test_xla_impl_matches_unsharded(devices, local_len, reverse, with_initial_state, gate_strength, check_vma):
    dims = (2, devices * local_len, 2, 16, 32)
    assert_sharded_matches_unsharded(seq_mesh(devices), dims, impl="xla", reverse=reverse,
                                     with_initial_state=with_initial_state, gate_strength=gate_strength,
                                     check_vma=check_vma)


@pytest.mark.parametrize("reverse", [False, True])
def test_reference_impl_matches_unsharded(reverse):
    assert_sharded_matches_unsharded(seq_mesh(4), (1, 4 * 9, 2, 8, 16), impl="reference", reverse=reverse,
                                     with_initial_state=True, gate_strength=WEAK_GATES, check_vma=False)


def test_pallas_impl_matches_unsharded_with_a_batch_axis(monkeypatch):
    """impl="pallas" (the Triton kernels in interpret mode) on a ("data", "seq") mesh: the kernels' own shard_map
    splits the batch over "data" inside the sequence-parallel one. The kernels do not type-check varying manual
    axes, so the enclosing shard_map runs with check_vma=False."""
    monkeypatch.setattr(gla_pallas_module, "_backend_kernel",
                        lambda backend: functools.partial(gla_triton, interpret=True))
    mesh = jax.make_mesh((2, 2), ("data", "seq"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:4])
    assert_sharded_matches_unsharded(mesh, (2, 2 * 40, 2, 16, 16), impl="pallas", reverse=True,
                                     with_initial_state=True, gate_strength=WEAK_GATES, check_vma=False)
