"""The Mosaic TPU GLA kernels, checked on CPU.

Correctness runs the kernels in Pallas interpret mode against the token-by-token reference. Interpret mode accepts
ops that Mosaic rejects, so the TPU signal is `jax.export` for platform "tpu", which runs the real Pallas -> Mosaic
lowering of every kernel (the later Mosaic layout passes only run in libtpu, on a TPU).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret  # race flag: no public API
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import gla_tpu as kernels
from pallas_kernels.gla_reference import gla_reference
from pallas_kernels.testing import STRONG_GATES, WEAK_GATES, make_inputs, rms_rel_err

# fla's chunk_gla acceptance (RMS-relative error vs a step-by-step recurrence) for bf16; float32 matmuls at
# Precision.HIGHEST land near 1e-6, so float32 is held to a much tighter bound.
_TOLERANCES = {jnp.float32: (1e-4, 1e-4), jnp.bfloat16: (4e-3, 5e-3)}  # (outputs, gradients)


def _gla_and_vjp(fn, q, k, v, g, initial_state, cotangents, *, reverse):
    """(o, final_state) and the gradients w.r.t. q, k, v, g (and initial_state when given) for `cotangents`."""
    scale = q.shape[-1] ** -0.5
    if initial_state is None:
        outputs, vjp = jax.vjp(lambda *x: fn(*x, scale=scale, initial_state=None, reverse=reverse), q, k, v, g)
    else:
        outputs, vjp = jax.vjp(lambda *x: fn(*x[:4], scale=scale, initial_state=x[4], reverse=reverse),
                               q, k, v, g, initial_state)
    return outputs, vjp(cotangents)


def _interpreted_gla_tpu(*args, **kwargs):
    return kernels.gla_tpu(*args, **kwargs, interpret=True)


@pytest.mark.parametrize(
    "batch, seq_len, heads, dtype, gate_strength, with_initial_state, reverse",
    [
        # T not a multiple of 64, two head blocks of one lane group each (H % 4 == 0).
        (1, 100, 8, jnp.float32, 1.0, True, False),
        # Reverse scan; H = 6 puts all heads in one block with lane groups of 4 and 2 heads (as DiG-S).
        (2, 128, 6, jnp.float32, STRONG_GATES, True, True),
        (1, 80, 4, jnp.bfloat16, WEAK_GATES, False, True),
    ],
)
def test_matches_reference(batch, seq_len, heads, dtype, gate_strength, with_initial_state, reverse):
    key_dim, value_dim = 32, 64
    q, k, v, g, initial_state = make_inputs(seq_len, batch, seq_len, heads, key_dim, value_dim,
                                            gate_strength=gate_strength, dtype=dtype,
                                            with_initial_state=with_initial_state)
    rng = np.random.default_rng(1)
    cotangents = (jnp.asarray(rng.standard_normal(v.shape, np.float32), dtype),
                  jnp.asarray(rng.standard_normal((batch, heads, key_dim, value_dim), np.float32)))

    run = jax.jit(lambda *x: _gla_and_vjp(_interpreted_gla_tpu, *x, cotangents, reverse=reverse))
    (o, final_state), grads = run(q, k, v, g, initial_state)
    reference = jax.jit(lambda *x: _gla_and_vjp(gla_reference, *x, cotangents, reverse=reverse))
    (o_ref, final_ref), grads_ref = reference(q, k, v, g, initial_state)

    output_tol, grad_tol = _TOLERANCES[dtype]
    assert o.dtype == dtype and o.shape == o_ref.shape and final_state.dtype == jnp.float32
    assert rms_rel_err(o, o_ref) < output_tol
    assert rms_rel_err(final_state, final_ref) < output_tol
    names = ["dq", "dk", "dv", "dg", "d_initial_state"][:len(grads_ref)]
    for name, grad, grad_ref in zip(names, grads, grads_ref, strict=True):
        assert grad.dtype == grad_ref.dtype, name
        assert rms_rel_err(grad, grad_ref) < grad_tol, name


def test_tiling_plan_packs_heads_into_128_lane_groups():
    # DiG heads (K=32, V=64): 4 heads fill 128 key lanes and 256 value lanes.
    assert kernels._plan_tiling(12, 32, 64) == kernels._Tiling(4, (kernels._LaneGroup(0, 4, 32, 64),))
    # H not a multiple of 4 (DiG-XL): one block of all 18 heads, lane groups start at 128-aligned key lanes.
    xl = kernels._plan_tiling(18, 32, 64)
    assert xl.heads_per_block == 18
    assert [(group.first, group.heads) for group in xl.lane_groups] == [(0, 4), (4, 4), (8, 4), (12, 4), (16, 2)]
    assert all(group.key_lanes.start % 128 == 0 and group.value_lanes.start % 128 == 0 for group in xl.lane_groups)
    # 128-wide heads need no packing.
    assert kernels._plan_tiling(3, 128, 128).lane_groups == (kernels._LaneGroup(0, 1, 128, 128),)


def _kernel_layout_inputs(batch, seq_len):
    q, k, v, g, initial_state = make_inputs(0, batch, seq_len, 4, 32, 64, gate_strength=1.0, with_initial_state=True)
    problem = kernels._Problem.of(q, v)
    tokens = [kernels._to_kernel_layout(x, problem.chunks) for x in (q, k, v, g)]
    return problem, *tokens, initial_state.reshape(problem.states().shape)


# The TPU simulator with race detection, two cores sharing the "parallel" grid axes.
_RACE_DETECTION = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)


def _races_found(outputs):
    jax.block_until_ready(outputs)
    # The simulator keeps its race state at module level and resets it when a kernel starts.
    assert tpu_interpret.races is not None
    return tpu_interpret.races.races_found


def test_kernels_have_no_races_under_tpu_interpret_mode():
    problem, q, k, v, g, h0 = _kernel_layout_inputs(batch=2, seq_len=64)
    kwargs = {"reverse": False, "interpret": _RACE_DETECTION}

    o, final_state = kernels._run_forward(problem, q, k, v, g, h0, scale=0.5, **kwargs)
    assert not _races_found((o, final_state))
    chunk_states = kernels._run_chunk_states(problem, k, v, g, h0, **kwargs)
    assert not _races_found(chunk_states)
    np.testing.assert_array_equal(chunk_states[:, 0], h0)
    grads = kernels._run_backward(problem, q, k, v, g, o, chunk_states, final_state, scale=0.5, **kwargs)
    assert not _races_found(grads)
    assert all(np.isfinite(np.asarray(x)).all() for x in grads)


def test_race_detection_flags_two_cores_writing_one_block():
    """Control for the test above: the flag it reads does turn on for a racy kernel under the same parameters."""
    def racy_kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] + pl.program_id(0).astype(jnp.float32)

    x = jnp.zeros((8, 128), jnp.float32)
    outputs = pl.pallas_call(
        racy_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(2,),
        in_specs=[pl.BlockSpec(x.shape, lambda i: (0, 0))], out_specs=pl.BlockSpec(x.shape, lambda i: (0, 0)),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)), interpret=_RACE_DETECTION)(x)
    assert _races_found(outputs)


def _tpu_custom_calls(fn, *args):
    """Exports `jax.jit(fn)` for TPU (the real Mosaic lowering) and counts its Mosaic kernels."""
    module = export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()
    return module.count("stablehlo.custom_call @tpu_custom_call")


def _abstract_inputs(dtype, heads):
    batch, seq_len, key_dim, value_dim = 2, 100, 32, 64
    keys = jax.ShapeDtypeStruct((batch, seq_len, heads, key_dim), dtype)
    values = jax.ShapeDtypeStruct((batch, seq_len, heads, value_dim), dtype)
    state = jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), jnp.float32)
    return keys, keys, values, keys, state


@pytest.mark.parametrize("dtype, heads, reverse", [(jnp.float32, 18, False), (jnp.bfloat16, 12, True)])
def test_kernels_lower_for_tpu(dtype, heads, reverse):
    def forward(q, k, v, g, initial_state):
        return kernels.gla_tpu(q, k, v, g, scale=0.2, initial_state=initial_state, reverse=reverse)

    def loss(*inputs):
        o, final_state = forward(*inputs)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final_state)

    inputs = _abstract_inputs(dtype, heads)
    assert _tpu_custom_calls(forward, *inputs) == 1
    # The gradient needs only the backward kernels: chunk-state recomputation and the reverse scan.
    assert _tpu_custom_calls(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), *inputs) == 2


def test_tpu_export_rejects_ops_that_mosaic_cannot_lower():
    """Guards the check above: an in-kernel cumsum runs in interpret mode but must fail the TPU export."""
    def cumsum_kernel(x_ref, o_ref):
        o_ref[...] = jnp.cumsum(x_ref[...], axis=0)

    def cumsum(x, interpret=False):
        return pl.pallas_call(cumsum_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=interpret)(x)

    x = jnp.ones((8, 128), jnp.float32)
    np.testing.assert_array_equal(cumsum(x, interpret=True)[:, 0], np.arange(1, 9))
    with pytest.raises(NotImplementedError, match="cumsum"):
        export.export(jax.jit(cumsum), platforms=["tpu"])(jax.ShapeDtypeStruct(x.shape, x.dtype))
