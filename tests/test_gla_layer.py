"""gated_gla: the packed kernels (interpret mode on CPU) against the split ops in plain XLA, values and gradients, in
both GLA schedules and with strong gates (the fix-up kernels); their real CUDA lowering (no concatenate of the
projection's gradient); the remat policy; the per-shard run under a mesh; argument errors."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dig_jax.models.layers import REMAT_POLICIES, SEQUENCE_MIXER_OUTPUT
from pallas_kernels import gla_triton
from pallas_kernels.gla_layer import gated_gla
from pallas_kernels.gla_triton import TritonConfig
from pallas_kernels.testing import rms_rel_err

EPS = 1e-6
CODE = 8  # columns of the forget gate's code


def weak_forget(code, params):
    """DiG's forget gate: log_sigmoid(code @ W + b) / 16."""
    kernel, bias = params
    return jax.nn.log_sigmoid((code @ kernel + bias).astype(jnp.float32)) / 16


def strong_forget(code, params):
    """Gates <= -2 per token: a chunk's cumulative gate passes the factorised path's limit, so the fix-up kernels
    redo every (batch, head)."""
    kernel, bias = params
    return 4 * jax.nn.log_sigmoid((code @ kernel + bias).astype(jnp.float32)) - 2


def make_inputs(seed, batch, seq_len, heads, key_width, value_width, dtype):
    key_dim, value_dim = heads * key_width, heads * value_width
    rng = np.random.default_rng(seed)
    projection = rng.standard_normal((batch, seq_len, 2 * key_dim + 2 * value_dim + CODE))
    forget_params = (0.3 * rng.standard_normal((CODE, key_dim)), 0.1 * rng.standard_normal(key_dim))
    norm_weight = 1 + 0.1 * rng.standard_normal(value_width)
    dz = rng.standard_normal((batch, seq_len, heads, value_width))
    as_jax = lambda x, d=dtype: jnp.asarray(x, d)  # noqa: E731
    return (as_jax(projection), jax.tree.map(as_jax, forget_params), as_jax(norm_weight, jnp.float32), as_jax(dz))


def layer(impl, heads, key_dim, value_dim, forget_fn=weak_forget, **options):
    return functools.partial(gated_gla, num_heads=heads, key_dim=key_dim, value_dim=value_dim, forget_fn=forget_fn,
                             eps=EPS, impl=impl, interpret=impl == "packed", **options)


def value_and_grads(fn, projection, forget_params, norm_weight, dz):
    z, vjp = jax.vjp(fn, projection, forget_params, norm_weight)
    return (z, *jax.tree.leaves(vjp(dz)))


NAMES = ("z", "d_projection", "d_forget_kernel", "d_forget_bias", "d_norm_weight")


@pytest.mark.parametrize("reverse, column_major", [(False, False), (True, True)], ids=["raster", "reversed_columns"])
@pytest.mark.parametrize("chunk_parallel", [False, True], ids=["sequential", "chunk_parallel"])
@pytest.mark.parametrize("forget_fn", [weak_forget, strong_forget], ids=["weak", "strong"])
@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-3), (jnp.bfloat16, 2e-2)], ids=["f32", "bf16"])
def test_packed_matches_split(reverse, column_major, chunk_parallel, forget_fn, dtype, tolerance, monkeypatch):
    """T = 144 (a 12 x 12 grid): three chunks, the last one partial."""
    monkeypatch.setattr(gla_triton, "DEFAULT_CONFIG", TritonConfig(chunk_parallel=chunk_parallel))
    batch, seq_len, heads, key_width, value_width = 2, 144, 2, 16, 64
    shape = dict(heads=heads, key_dim=heads * key_width, value_dim=heads * value_width, forget_fn=forget_fn,
                 reverse=reverse, column_major=column_major)
    args = make_inputs(seq_len + reverse, batch, seq_len, heads, key_width, value_width, dtype)
    ours = value_and_grads(layer("packed", **shape), *args)
    exact = value_and_grads(layer("split", gla_impl="xla", gate_impl="xla", **shape),
                            *jax.tree.map(lambda x: x.astype(jnp.float32), args))
    for name, a, e in zip(NAMES, ours, exact):
        assert a.dtype == (jnp.float32 if name == "d_norm_weight" else dtype), name
        assert rms_rel_err(a, e) < tolerance, name


def cuda_module(fn, *args):
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    return export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args).mlir_module()


def test_lowers_for_cuda_without_splitting_or_concatenating():
    """The real Triton lowering (no GPU needed) of DiG-S/2's layer: the projection is neither sliced into q, k, v, g
    nor its gradient concatenated; the code's gradient goes in with one dynamic_update_slice."""
    batch, seq_len, dim, heads = 2, 256, 384, 6
    shapes = (jax.ShapeDtypeStruct((batch, seq_len, 3 * dim + CODE), jnp.bfloat16),
              (jax.ShapeDtypeStruct((CODE, dim // 2), jnp.bfloat16), jax.ShapeDtypeStruct((dim // 2,), jnp.bfloat16)),
              jax.ShapeDtypeStruct((dim // heads,), jnp.float32),
              jax.ShapeDtypeStruct((batch, seq_len, heads, dim // heads), jnp.bfloat16))
    packed = functools.partial(gated_gla, num_heads=heads, key_dim=dim // 2, value_dim=dim, forget_fn=weak_forget,
                               eps=EPS, impl="packed", reverse=True, column_major=True)
    module = cuda_module(functools.partial(value_and_grads, packed), *shapes)
    assert re.findall(r'name = "(\w+?)(?:_e\d+_w\d+)?"', module) == [
        "gla_forward", "gla_forward_fix_up", "rms_norm_swish_gate", "rms_norm_swish_gate_backward",
        "gla_state_grad", "gla_chunk_grad", "gla_chunk_grad_fix_up"]
    assert "stablehlo.concatenate" not in module
    assert module.count("stablehlo.dynamic_update_slice") == 1
    slices = re.findall(r"stablehlo.slice .*", module)
    assert len(slices) == 1 and f"{3 * dim}:{3 * dim + CODE}]" in slices[0]  # the code only


def test_remat_matmuls_policy_runs_the_forward_kernels_once():
    """Under the models' remat "matmuls" policy (o named SEQUENCE_MIXER_OUTPUT, the states kept), the backward pass
    runs no forward kernel again."""
    batch, seq_len, heads, key_width, value_width = 1, 128, 2, 16, 32
    packed = layer("packed", heads, heads * key_width, heads * value_width, output_name=SEQUENCE_MIXER_OUTPUT)
    packed = functools.partial(packed, interpret=False)

    def loss(projection, forget_params, norm_weight):
        return jnp.sum(jnp.tanh(packed(projection, forget_params, norm_weight)))

    args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        make_inputs(0, batch, seq_len, heads, key_width, value_width, jnp.float32)[:3])
    kernels = lambda fn: re.findall(r'name = "(\w+?)(?:_e\d+_w\d+)?"', cuda_module(jax.grad(fn), *args))  # noqa: E731
    remat = kernels(jax.checkpoint(loss, policy=REMAT_POLICIES["matmuls"]))
    assert sorted(remat) == sorted(kernels(loss))
    assert remat.count("gla_forward") == 1


def test_runs_per_batch_shard_under_a_mesh():
    """With a data-parallel mesh active the kernels run per batch shard; the weight gradients sum over shards."""
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    heads, key_width, value_width = 2, 16, 16
    shape = dict(heads=heads, key_dim=heads * key_width, value_dim=heads * value_width)
    args = make_inputs(1, 8, 128, heads, key_width, value_width, jnp.float32)
    expected = value_and_grads(layer("split", gla_impl="xla", gate_impl="xla", **shape), *args)
    with jax.set_mesh(mesh):
        batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
        projection, dz = (jax.device_put(x, batch_sharding) for x in (args[0], args[3]))
        ours = jax.jit(functools.partial(value_and_grads, layer("packed", **shape)))(
            projection, args[1], args[2], dz)
    for name, a, e in zip(NAMES, ours, expected):
        assert rms_rel_err(a, e) < 1e-4, name


def test_auto_takes_the_split_ops_off_gpus():
    args = make_inputs(2, 1, 64, 2, 16, 32, jnp.float32)
    auto = layer("auto", 2, 32, 64)
    assert "pallas_call" not in str(jax.make_jaxpr(functools.partial(value_and_grads, auto))(*args))
    for a, e in zip(value_and_grads(auto, *args), value_and_grads(layer("split", 2, 32, 64), *args)):
        np.testing.assert_array_equal(a, e)


def test_bad_arguments_are_named():
    projection, forget_params, norm_weight, _ = make_inputs(0, 1, 64, 2, 16, 32, jnp.float32)
    call = lambda x=projection, w=norm_weight, **kw: layer("packed", **{"heads": 2, "key_dim": 32, "value_dim": 64,  # noqa: E731
                                                                         **kw})(x, forget_params, w)
    with pytest.raises(ValueError, match=r"projection must be \[N, T, C\]"):
        call(projection[0])
    with pytest.raises(ValueError, match="num_heads=3 must divide key_dim=32"):
        call(heads=3)
    with pytest.raises(ValueError, match="more than 2 key_dim \\+ 2 value_dim = 192 columns"):
        call(projection[..., :192])
    with pytest.raises(ValueError, match=r"norm_weight must be \[V / H\] = \(32,\)"):
        call(w=norm_weight[:16])
    with pytest.raises(ValueError, match="impl must be 'auto' or one of"):
        gated_gla(projection, forget_params, norm_weight, num_heads=2, key_dim=32, value_dim=64,
                  forget_fn=weak_forget, eps=EPS, impl="triton")
    with pytest.raises(ValueError, match="impl='packed' needs K / H and V / H powers of two"):
        call(key_dim=48, value_dim=64, x=jnp.zeros((1, 64, 232 + CODE)), w=jnp.ones(32))
