"""Inputs and error metric shared by the GLA tests (the XLA path and the kernels are checked the same way).

The inputs follow fla's own chunk_gla tests: q, k, v ~ U[0, 1) and g = logsigmoid(U[0, 1)) / n.
"""

import jax.numpy as jnp
import numpy as np

# Multipliers of logsigmoid(U[0, 1)) for the gates: fla's n = 0.1 (state forgotten within a few tokens) and
# n = 16 (state survives hundreds of tokens).
STRONG_GATES = 10.0
WEAK_GATES = 1 / 16


def make_inputs(seed, batch, seq_len, heads, key_dim, value_dim, *, gate_strength, dtype=jnp.float32,
                with_initial_state=False):
    """Random GLA inputs, drawn with numpy (jax.random would compile its generator anew for every shape).

    Args:
      seed: integer seed.
      batch, seq_len, heads, key_dim, value_dim: B, T, H, K, V.
      gate_strength: g = gate_strength * logsigmoid(U[0, 1)); larger forgets faster (see STRONG_GATES).
      dtype: dtype of q, k, v and g.
      with_initial_state: also draw an initial state ~ N(0, 1).

    Returns:
      (q, k, v, g, initial_state) as jax arrays: q, k, g [B, T, H, K]; v [B, T, H, V]; initial_state
      [B, H, K, V] float32 or None.
    """
    rng = np.random.default_rng(seed)
    qk_shape = (batch, seq_len, heads, key_dim)
    q = rng.random(qk_shape, np.float32)
    k = rng.random(qk_shape, np.float32)
    v = rng.random((batch, seq_len, heads, value_dim), np.float32)
    g = -gate_strength * np.logaddexp(0.0, -rng.random(qk_shape, np.float32))  # logsigmoid(x) = -log(1 + e^-x)
    initial_state = (jnp.asarray(rng.standard_normal((batch, heads, key_dim, value_dim), np.float32))
                     if with_initial_state else None)
    q, k, v, g = (jnp.asarray(x.astype(dtype)) for x in (q, k, v, g))
    return q, k, v, g, initial_state


def rms_rel_err(actual, expected):
    """||actual - expected|| / ||expected|| over all elements, in float64; 0 when both are all zeros."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"actual and expected must have the same shape, got {actual.shape} and {expected.shape}")
    difference = np.linalg.norm(actual - expected)
    reference = np.linalg.norm(expected)
    if reference == 0:
        return 0.0 if difference == 0 else float("inf")
    return float(difference / reference)
