"""The GLA op: the chunked XLA path against the token-by-token reference, and the public API's validation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gla import chunk_gla, resolve_impl
from pallas_kernels.testing import STRONG_GATES, WEAK_GATES, make_inputs, rms_rel_err

F32_TOLERANCE = 5e-3
BF16_TOLERANCE = 2e-2
GRAD_NAMES = ("dq", "dk", "dv", "dg", "dinitial_state")


@functools.partial(jax.jit, static_argnames=("impl", "reverse"))
def forward_and_grads(q, k, v, g, initial_state, o_cotangent, state_cotangent, *, impl, reverse):
    """Returns (o, final_state, (dq, dk, dv, dg, dinitial_state)) for the given cotangents of o and final_state."""

    def gla(q, k, v, g, initial_state):
        return chunk_gla(q, k, v, g, initial_state=initial_state, output_final_state=True, reverse=reverse,
                         impl=impl)

    (o, final_state), vjp = jax.vjp(gla, q, k, v, g, initial_state)
    return o, final_state, vjp((o_cotangent, state_cotangent))


def random_cotangents(seed, batch, seq_len, heads, key_dim, value_dim):
    """Standard-normal cotangents for o [B, T, H, V] and final_state [B, H, K, V]."""
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((batch, seq_len, heads, value_dim), np.float32)),
            jnp.asarray(rng.standard_normal((batch, heads, key_dim, value_dim), np.float32)))


def run_xla_and_reference(inputs, cotangents, reverse):
    """Runs the XLA path on `inputs` and the reference on their float32 upcast, with the same cotangents."""
    o_cotangent, state_cotangent = cotangents
    o_cotangent = o_cotangent.astype(inputs[2].dtype)  # o has v's dtype; both runs see the same rounded values
    xla = forward_and_grads(*inputs, o_cotangent, state_cotangent, impl="xla", reverse=reverse)
    inputs_f32 = [None if x is None else x.astype(jnp.float32) for x in inputs]
    reference = forward_and_grads(*inputs_f32, o_cotangent.astype(jnp.float32), state_cotangent, impl="reference",
                                  reverse=reverse)
    return xla, reference


def assert_close(xla, reference, tolerance):
    (o, final_state, grads), (o_ref, final_state_ref, grads_ref) = xla, reference
    errors = {"o": rms_rel_err(o, o_ref), "final_state": rms_rel_err(final_state, final_state_ref)}
    for name, grad, grad_ref in zip(GRAD_NAMES, grads, grads_ref):
        assert (grad is None) == (grad_ref is None), name
        if grad is not None:
            errors[name] = rms_rel_err(grad, grad_ref)
    assert all(error < tolerance for error in errors.values()), errors


# (B, T, H, K, V, reverse, with_initial_state): T = 1, T below / at / above one chunk of 64, several chunks.
# Each case is one compilation of each implementation; both gate strengths reuse it.
CASES = [
    (1, 1, 1, 32, 64, True, True),
    (2, 50, 2, 32, 64, True, False),
    (1, 50, 1, 16, 32, False, True),
    (1, 64, 3, 16, 32, False, True),
    (2, 130, 2, 32, 64, True, True),
    (1, 130, 3, 16, 32, False, False),
    (2, 256, 1, 32, 64, True, False),
    (1, 256, 2, 16, 32, False, True),
]


@pytest.mark.parametrize("gate_strength", [STRONG_GATES, WEAK_GATES], ids=["strong_gates", "weak_gates"])
@pytest.mark.parametrize("batch, seq_len, heads, key_dim, value_dim, reverse, with_initial_state", CASES)
def test_xla_matches_reference(batch, seq_len, heads, key_dim, value_dim, reverse, with_initial_state,
                               gate_strength):
    dims = (batch, seq_len, heads, key_dim, value_dim)
    inputs = make_inputs(seq_len, *dims, gate_strength=gate_strength,
                         with_initial_state=with_initial_state)
    cotangents = random_cotangents(seq_len + 1, *dims)
    assert_close(*run_xla_and_reference(inputs, cotangents, reverse), F32_TOLERANCE)


def test_xla_bf16_inputs_match_f32_reference():
    dims = (2, 130, 2, 32, 64)  # CASES' shape, so the reference compilation is reused
    inputs = make_inputs(0, *dims, gate_strength=STRONG_GATES, dtype=jnp.bfloat16,
                         with_initial_state=True)
    xla, reference = run_xla_and_reference(inputs, random_cotangents(1, *dims), reverse=True)
    o, final_state, grads = xla
    assert o.dtype == jnp.bfloat16
    assert final_state.dtype == jnp.float32
    assert [grad.dtype for grad in grads[:4]] == [jnp.bfloat16] * 4
    assert_close(xla, reference, BF16_TOLERANCE)


def test_xla_stays_finite_under_very_strong_gates():
    # G falls to -1280 across one chunk; a (q e^G)(k e^-G)^T factorisation would compute e^1280 = inf.
    dims = (1, 64, 3, 16, 32)  # CASES' shape, so both compilations are reused
    q, k, v, _, initial_state = make_inputs(2, *dims, gate_strength=1.0, with_initial_state=True)
    g = jnp.full_like(q, -20.0)
    xla, reference = run_xla_and_reference((q, k, v, g, initial_state), random_cotangents(3, *dims),
                                           reverse=False)
    o, final_state, (dq, dk, dv, dg, dinitial_state) = xla
    o_ref, final_state_ref, (dq_ref, dk_ref, dv_ref, dg_ref, dinitial_state_ref) = reference
    for x in (o, final_state, dq, dk, dv, dg, dinitial_state):
        assert np.isfinite(np.asarray(x)).all()
    errors = [rms_rel_err(*pair) for pair in ((o, o_ref), (final_state, final_state_ref), (dq, dq_ref), (dk, dk_ref),
                                              (dv, dv_ref), (dinitial_state, dinitial_state_ref))]
    assert max(errors) < F32_TOLERANCE, errors
    # The true dg is ~e^-20 small here, left over after O(1) terms cancel, so only an absolute bound is meaningful.
    np.testing.assert_allclose(dg, dg_ref, rtol=0, atol=1e-5)


def test_scale_defaults_to_inverse_sqrt_key_dim():
    key_dim = 16
    q, k, v, g, _ = make_inputs(5, 1, 3, 1, key_dim, 8, gate_strength=WEAK_GATES)
    o_default, final_state = chunk_gla(q, k, v, g, impl="reference")
    assert final_state is None  # output_final_state defaults to False
    o_unit_scale, _ = chunk_gla(q, k, v, g, scale=1.0, impl="reference")
    # o is linear in scale, so the default must be o(scale=1) * K ** -0.5.
    np.testing.assert_allclose(o_default, o_unit_scale * key_dim ** -0.5, rtol=1e-6)
    assert rms_rel_err(o_default, o_unit_scale) > 0.5


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU choice of impl='auto'")
def test_auto_resolves_to_xla_on_cpu():
    assert resolve_impl("auto") == "xla"


def _valid_inputs():
    q, k, v, g, initial_state = make_inputs(6, 1, 4, 2, 8, 16, gate_strength=WEAK_GATES,
                                            with_initial_state=True)
    return {"q": q, "k": k, "v": v, "g": g, "initial_state": initial_state}


# (argument, replacement, why it is wrong); each replacement makes chunk_gla raise a ValueError naming the argument.
INVALID_INPUTS = [
    ("k", jnp.zeros((1, 4, 2, 4)), "shape differs from q"),
    ("g", jnp.zeros((1, 5, 2, 8)), "shape differs from q"),
    ("v", jnp.zeros((1, 4, 3, 16)), "heads differ from q"),
    ("initial_state", jnp.zeros((1, 2, 8, 8)), "V differs from v"),
    ("q", jnp.zeros((1, 4, 2, 8), jnp.int32), "integer dtype"),
    ("k", jnp.zeros((1, 4, 2, 8), jnp.bfloat16), "dtype differs from q"),
    ("q", jnp.zeros((4, 2, 8)), "rank 3"),
    ("v", jnp.zeros((1, 1, 4, 2, 16)), "rank 5"),
]


@pytest.mark.parametrize("argument, replacement, why", INVALID_INPUTS, ids=[f"{a}-{w}" for a, _, w in INVALID_INPUTS])
def test_invalid_inputs_raise_naming_the_argument(argument, replacement, why):
    inputs = _valid_inputs()
    inputs[argument] = replacement
    with pytest.raises(ValueError, match=rf"^{argument} must"):
        chunk_gla(**inputs, impl="xla")


def test_unknown_impl_raises():
    with pytest.raises(ValueError, match="^impl must"):
        chunk_gla(**_valid_inputs(), impl="cuda")


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_column_major_scan_is_the_scan_of_the_transposed_grid(impl):
    q, k, v, g, initial_state = make_inputs(7, 2, 36, 2, 8, 16, gate_strength=WEAK_GATES, with_initial_state=True)
    o, final_state = chunk_gla(q, k, v, g, initial_state=initial_state, output_final_state=True, reverse=True,
                               column_major=True, impl=impl)
    transposed = [x.reshape(2, 6, 6, 2, -1).swapaxes(1, 2).reshape(x.shape) for x in (q, k, v, g)]  # 6 x 6 grid
    o_expected, final_expected = chunk_gla(*transposed, initial_state=initial_state, output_final_state=True,
                                           reverse=True, impl=impl)
    np.testing.assert_allclose(o.reshape(2, 6, 6, 2, -1).swapaxes(1, 2).reshape(o.shape), o_expected, rtol=1e-6)
    np.testing.assert_allclose(final_state, final_expected, rtol=1e-6)


def test_column_major_scan_needs_a_square_grid():
    q, k, v, g, _ = make_inputs(6, 1, 6, 2, 8, 16, gate_strength=WEAK_GATES)
    with pytest.raises(ValueError, match="square grid, got T=6"):
        chunk_gla(q, k, v, g, column_major=True, impl="xla")
