"""rms_norm_swish_gate: both implementations against the formula left to autodiff, values and gradients; the Pallas
kernels in interpret mode on CPU, their real CUDA lowering, and the per-shard run under a data-parallel mesh."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels.output_gate import Tiles, gate_pallas, gate_reference, gate_xla, resolve_impl, rms_norm_swish_gate

EPS = 1e-6
interpreted = functools.partial(gate_pallas, interpret=True)


def _inputs(seed, shape, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 4)
    o, g, cotangent = (jax.random.normal(key, shape) * scale for key, scale in zip(keys, (3.0, 2.0, 1.0)))
    weight = 1 + 0.1 * jax.random.normal(keys[3], shape[-1:])
    return o.astype(dtype), g.astype(dtype), weight, cotangent.astype(dtype)


def _value_and_grads(gate, o, g, weight, cotangent):
    z, vjp = jax.vjp(lambda o, g, weight: gate(o, g, weight, EPS), o, g, weight)
    return (z, *vjp(cotangent))


def _rel_err(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


# Shapes: DiG's [N, T, H, V] with rows a multiple of the block and not, one row, V from 16 to 128.
@pytest.mark.parametrize("shape", [(2, 16, 3, 64), (1, 7, 5, 32), (1, 1, 1, 16), (3, 10, 128)])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_matches_autodiff_of_the_formula(impl, shape, dtype, tolerance):
    gate = interpreted if impl == "pallas" else gate_xla
    args = _inputs(sum(shape), shape, dtype)
    expected = _value_and_grads(gate_reference, *args)
    for name, ours, theirs in zip(("z", "do", "dg", "dweight"), _value_and_grads(gate, *args), expected):
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, name
        assert _rel_err(ours, theirs) < tolerance, name


@pytest.mark.parametrize("forward_tiles, backward_tiles", [(Tiles(1024, 2), Tiles(32768, 8)),
                                                           (Tiles(4096, 1), Tiles(2048, 4))])
def test_tiles_change_the_blocks_not_the_values(forward_tiles, backward_tiles):
    """Row blocks of 16 to 512 rows of V = 64, the rows (2 * 20 * 3 = 120) a multiple of none of them."""
    gate = functools.partial(interpreted, forward_tiles=forward_tiles, backward_tiles=backward_tiles)
    args = _inputs(7, (2, 20, 3, 64))
    for name, ours, theirs in zip(("z", "do", "dg", "dweight"), _value_and_grads(gate, *args),
                                  _value_and_grads(gate_reference, *args)):
        assert _rel_err(ours, theirs) < 1e-5, name


def test_xla_backward_keeps_only_the_inputs():
    o, g, weight, _ = _inputs(0, (2, 16, 3, 32))
    _, backward = jax.vjp(lambda o, g, weight: gate_xla(o, g, weight, EPS), o, g, weight)
    _, autodiff_backward = jax.vjp(lambda o, g, weight: gate_reference(o, g, weight, EPS), o, g, weight)
    assert sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(backward)) == o.nbytes + g.nbytes + weight.nbytes
    assert sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(autodiff_backward)) > 7 * o.nbytes


def test_lowers_for_cuda():
    """The real Triton lowering of the forward and backward kernels (no GPU needed)."""
    o = jax.ShapeDtypeStruct((2, 100, 6, 64), jnp.bfloat16)
    weight = jax.ShapeDtypeStruct((64,), jnp.float32)

    def value_and_vjp(o, g, weight):
        z, vjp = jax.vjp(lambda *a: gate_pallas(*a, EPS), o, g, weight)
        return z, vjp(z)

    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    module = export.export(jax.jit(value_and_vjp), platforms=["cuda"], disabled_checks=checks)(o, o, weight)
    assert module.mlir_module().count("__gpu$xla.gpu.triton") == 2


def test_runs_per_batch_shard_under_a_mesh():
    """With a data-parallel mesh active the kernels run per batch shard and the weight gradient is summed over
    all shards."""
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    args = _inputs(1, (8, 12, 2, 32))
    expected = _value_and_grads(gate_reference, *args)
    with jax.set_mesh(mesh):
        o, g = (jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp")))) for x in args[:2])
        ours = jax.jit(functools.partial(_value_and_grads, interpreted))(o, g, *args[2:])
    for name, a, b in zip(("z", "do", "dg", "dweight"), ours, expected):
        assert _rel_err(a, b) < 1e-5, name


def test_bad_arguments_are_named():
    o, g, weight, _ = _inputs(0, (1, 4, 2, 24))
    with pytest.raises(ValueError, match="o and g must have one shape"):
        rms_norm_swish_gate(o, g[..., :16], weight, eps=EPS)
    with pytest.raises(ValueError, match=r"weight must be \[V\] = \(24,\)"):
        rms_norm_swish_gate(o, g, weight[:16], eps=EPS)
    with pytest.raises(ValueError, match="impl must be"):
        rms_norm_swish_gate(o, g, weight, eps=EPS, impl="triton")
    with pytest.raises(ValueError, match="power of two >= 16, got V=24"):
        gate_pallas(o, g, weight, EPS)
    o, g, weight, _ = _inputs(0, (1, 4, 2, 32))
    with pytest.raises(ValueError, match=r"backward_tiles=Tiles\(elements=1536, num_warps=4\) must give a power"):
        gate_pallas(o, g, weight, EPS, backward_tiles=Tiles(1536, 4))
    with pytest.raises(ValueError, match="forward_tiles=.* at least one warp"):
        gate_pallas(o, g, weight, EPS, forward_tiles=Tiles(1024, 0))
    assert resolve_impl("auto", 64) == "xla"  # CPU
