"""depthwise_conv3x3: every implementation against XLA's grouped convolution, values and gradients; the Pallas
kernels in interpret mode on CPU, their real CUDA lowering, and the per-shard run under a data-parallel mesh."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels.depthwise_conv import Tiles, conv_pallas, conv_reference, depthwise_conv3x3, resolve_impl

interpreted = functools.partial(conv_pallas, interpret=True)


def _inputs(seed, batch, height, width, channels, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(keys[0], (batch, height * width, channels)).astype(dtype)
    kernel = jax.random.normal(keys[1], (3, 3, channels))
    bias = jax.random.normal(keys[2], (channels,))
    cotangent = jax.random.normal(keys[3], x.shape).astype(dtype)
    return x, kernel, bias, cotangent


def _value_and_grads(conv, x, kernel, bias, cotangent, width):
    y, vjp = jax.vjp(lambda x, kernel, bias: conv(x, kernel, bias, grid_width=width), x, kernel, bias)
    return (y, *vjp(cotangent))


def _rel_err(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


# Grids: square, wide, tall, one column, token counts off the 64-token block, one and several channel blocks.
@pytest.mark.parametrize("batch,height,width,channels", [(2, 8, 8, 32), (1, 5, 13, 48), (2, 11, 3, 16),
                                                         (1, 7, 1, 16), (1, 16, 16, 256)])
@pytest.mark.parametrize("impl", ["shifted", "pallas"])
def test_matches_grouped_conv_with_gradients(impl, batch, height, width, channels):
    conv = interpreted if impl == "pallas" else depthwise_conv3x3
    conv = functools.partial(conv, impl=impl) if impl != "pallas" else conv
    args = _inputs(height * width + channels, batch, height, width, channels)
    expected = _value_and_grads(conv_reference, *args, width)
    for name, ours, theirs in zip(("y", "dx", "dkernel", "dbias"), _value_and_grads(conv, *args, width), expected):
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, name
        assert _rel_err(ours, theirs) < 1e-5, name


@pytest.mark.parametrize("forward_tiles,backward_tiles", [(Tiles(16, 32, 1), Tiles(128, 16, 8)),
                                                          (Tiles(32, 64, 2), Tiles(8, 128, 4)),
                                                          (Tiles(8, 16, 2, steps=3), Tiles(8, 32, 4, steps=4)),
                                                          (Tiles(16, 64, 4, steps=8), Tiles(16, 64, 4, steps=8))])
def test_every_tiling_gives_the_same_values_and_gradients(forward_tiles, backward_tiles):
    """Token blocks smaller and larger than a grid row and than T, channel blocks smaller than D; several token
    tiles per program, the last program's partly and wholly past the end of the sequence (T = 99)."""
    args = _inputs(3, 2, 9, 11, 64)
    conv = functools.partial(interpreted, forward_tiles=forward_tiles, backward_tiles=backward_tiles)
    expected = _value_and_grads(conv_reference, *args, 11)
    for name, ours, theirs in zip(("y", "dx", "dkernel", "dbias"), _value_and_grads(conv, *args, 11), expected):
        assert _rel_err(ours, theirs) < 1e-5, name


def test_bfloat16_inputs_accumulate_in_float32():
    x, kernel, bias, cotangent = _inputs(0, 2, 8, 8, 32, jnp.bfloat16)
    ours = _value_and_grads(interpreted, x, kernel, bias, cotangent, 8)
    exact = _value_and_grads(conv_reference, x.astype(jnp.float32), kernel, bias, cotangent.astype(jnp.float32), 8)
    assert ours[0].dtype == ours[1].dtype == jnp.bfloat16
    for name, a, b in zip(("y", "dx", "dkernel", "dbias"), ours, exact):
        assert _rel_err(a, b) < 1e-2, name


def test_lowers_for_cuda():
    """The real Triton lowering of the forward and backward kernels (no GPU needed)."""
    x = jax.ShapeDtypeStruct((2, 100, 64), jnp.bfloat16)
    kernel, bias = jax.ShapeDtypeStruct((3, 3, 64), jnp.float32), jax.ShapeDtypeStruct((64,), jnp.float32)

    def value_and_vjp(x, kernel, bias):
        y, vjp = jax.vjp(lambda *a: conv_pallas(*a, grid_width=10), x, kernel, bias)
        return y, vjp(y)

    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    module = export.export(jax.jit(value_and_vjp), platforms=["cuda"], disabled_checks=checks)(x, kernel, bias)
    assert module.mlir_module().count("__gpu$xla.gpu.triton") == 2
    assert "stablehlo.pad" not in module.mlir_module()  # on a GPU the kernels mask the rows outside the sequence


def test_runs_per_batch_shard_under_a_mesh():
    """With a data-parallel mesh active the kernels run per batch shard and the filter gradient is summed over
    all shards."""
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    x, kernel, bias, cotangent = _inputs(1, 8, 4, 6, 16)
    expected = _value_and_grads(conv_reference, x, kernel, bias, cotangent, 6)
    with jax.set_mesh(mesh):
        placed = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
        ours = jax.jit(functools.partial(_value_and_grads, interpreted, width=6))(placed, kernel, bias, cotangent)
    for name, a, b in zip(("y", "dx", "dkernel", "dbias"), ours, expected):
        assert _rel_err(a, b) < 1e-5, name


def test_bad_arguments_are_named():
    x, kernel, bias, _ = _inputs(0, 1, 4, 4, 16)
    with pytest.raises(ValueError, match="grid_width=3 must divide"):
        depthwise_conv3x3(x, kernel, bias, grid_width=3)
    with pytest.raises(ValueError, match="kernel must be"):
        depthwise_conv3x3(x, kernel[:2], bias, grid_width=4)
    with pytest.raises(ValueError, match="impl must be"):
        depthwise_conv3x3(x, kernel, bias, grid_width=4, impl="cudnn")
    with pytest.raises(ValueError, match="multiple of 16"):
        conv_pallas(x[..., :12], kernel[..., :12], bias[:12], grid_width=4)
    with pytest.raises(ValueError, match="backward_tiles=.*power of two"):
        conv_pallas(x, kernel, bias, grid_width=4, backward_tiles=Tiles(tokens=48))
    with pytest.raises(ValueError, match="forward_tiles=.*channels >= 16"):
        conv_pallas(x, kernel, bias, grid_width=4, forward_tiles=Tiles(channels=8))
    with pytest.raises(ValueError, match="backward_tiles=.*steps >= 1"):
        conv_pallas(x, kernel, bias, grid_width=4, backward_tiles=Tiles(steps=0))
    assert resolve_impl("auto", 16) == "shifted"  # CPU
