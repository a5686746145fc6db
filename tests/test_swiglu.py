"""swiglu: both backward implementations against autodiff of the formula; the Pallas kernel in interpret mode on
CPU, its real CUDA lowering, and its per-shard run under a data-parallel mesh."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels import dispatch
from pallas_kernels.swiglu import backward_pallas, swiglu, swiglu_reference


def _inputs(seed, shape, dtype):
    """x [..., 2I] with gates up to |g| ~ 12 (both tails of the sigmoid) and a cotangent [..., I]."""
    keys = jax.random.split(jax.random.key(seed))
    x = 4 * jax.random.normal(keys[0], shape)
    return x.astype(dtype), jax.random.normal(keys[1], (*shape[:-1], shape[-1] // 2)).astype(dtype)


# Rows a multiple of the kernel's 16-row block and not; I = 48, 384 and 16 (column blocks of 16, 128 and 16).
@pytest.mark.parametrize("shape", [(2, 5, 96), (1, 32, 768), (3, 7, 32)])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_autodiff_of_the_formula(impl, shape, dtype):
    x, cotangent = _inputs(sum(shape), shape, dtype)
    value, backward = jax.vjp(functools.partial(swiglu, impl=impl, interpret=True), x)
    np.testing.assert_array_equal(value, swiglu_reference(x))
    (gradient,) = backward(cotangent)
    assert gradient.shape == x.shape and gradient.dtype == dtype
    # float32 inside: against autodiff in float32, the bf16 result is off by its own rounding only.
    _, exact_backward = jax.vjp(swiglu_reference, x.astype(jnp.float32))
    (exact,) = exact_backward(cotangent.astype(jnp.float32))
    tolerance = 1e-6 if dtype == jnp.float32 else 8e-3
    np.testing.assert_allclose(gradient.astype(jnp.float32), exact, rtol=tolerance, atol=tolerance)


def test_xla_backward_writes_one_gradient_without_a_concatenate():
    x, cotangent = _inputs(0, (2, 5, 48), jnp.float32)
    text = jax.jit(lambda x, d: jax.vjp(functools.partial(swiglu, impl="xla"), x)[1](d)).lower(x, cotangent).as_text()
    assert "concatenate" not in text


def test_lowers_for_cuda():
    """The real Triton lowering of the backward kernel (no GPU needed)."""
    x = jax.ShapeDtypeStruct((2, 100, 2 * 3072), jnp.bfloat16)

    def value_and_vjp(x):
        z, vjp = jax.vjp(functools.partial(swiglu, impl="pallas"), x)
        return z, vjp(z)

    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    module = export.export(jax.jit(value_and_vjp), platforms=["cuda"], disabled_checks=checks)(x)
    assert module.mlir_module().count("__gpu$xla.gpu.triton") == 1


@pytest.mark.parametrize("inner, kernels", [(1024, 0), (3072, 1)])
def test_auto_takes_the_kernel_on_gpus_from_i_2048(monkeypatch, inner, kernels):
    """XLA's own backward where it measured faster (I = 1024), the kernel where XLA split it (I = 3072)."""
    monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "gpu")
    x = jax.ShapeDtypeStruct((2, 16, 2 * inner), jnp.bfloat16)

    def value_and_vjp(x):
        z, vjp = jax.vjp(swiglu, x)
        return z, vjp(z)

    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    module = export.export(jax.jit(value_and_vjp), platforms=["cuda"], disabled_checks=checks)(x)
    assert module.mlir_module().count("__gpu$xla.gpu.triton") == kernels


def test_runs_per_batch_shard_under_a_mesh():
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    x, cotangent = _inputs(1, (8, 12, 64), jnp.float32)
    expected = jax.vjp(swiglu_reference, x)[1](cotangent)
    with jax.set_mesh(mesh):
        x, cotangent = (jax.device_put(a, NamedSharding(mesh, P(("data", "fsdp")))) for a in (x, cotangent))
        ours = jax.jit(lambda x, d: jax.vjp(functools.partial(swiglu, impl="pallas", interpret=True), x)[1](d))(
            x, cotangent)
    np.testing.assert_allclose(ours[0], expected[0], rtol=1e-6, atol=1e-6)


def test_bad_arguments_are_named():
    x, cotangent = _inputs(0, (1, 4, 48), jnp.float32)
    with pytest.raises(ValueError, match="an even last axis"):
        swiglu(x[..., :47])
    with pytest.raises(ValueError, match="impl must be"):
        swiglu(x, impl="triton")
    with pytest.raises(ValueError, match="multiple of 16, got I=12"):
        backward_pallas(x[..., :24], cotangent[..., :12])
    value, backward = jax.vjp(swiglu, x[..., :24])  # "auto" on CPU, and any I: the "xla" path
    assert backward(cotangent[..., :12])[0].shape == (1, 4, 24)
