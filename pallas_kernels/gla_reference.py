"""Token-by-token GLA recurrence: the ground truth every other implementation is tested against.

    S_t = diag(exp g_t) S_{t-1} + k_t^T v_t,    o_t = (scale * q_t) S_t

Per head, with S_t of shape [K, V]. Everything runs in float32. Slow (one `lax.scan` step per token), but
simple enough to check by eye.
"""

import jax
import jax.numpy as jnp


def gla_reference(q, k, v, g, *, scale, initial_state, reverse):
    """q, k, g: [B, T, H, K]; v: [B, T, H, V]; initial_state: [B, H, K, V] f32 or None.

    Returns (o [B, T, H, V] in v's dtype, final_state [B, H, K, V] f32).
    """
    batch, _, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    f32 = jnp.float32
    state = (jnp.zeros((batch, heads, key_dim, value_dim), f32) if initial_state is None
             else initial_state.astype(f32))

    def step(state, inputs):
        q_t, k_t, v_t, g_t = inputs  # [B, H, K] and [B, H, V]
        state = state * jnp.exp(g_t)[..., None] + k_t[..., None] * v_t[..., None, :]
        o_t = jnp.einsum("bhk,bhkv->bhv", q_t * scale, state, precision="highest")
        return state, o_t

    time_major = [jnp.moveaxis(x.astype(f32), 1, 0) for x in (q, k, v, g)]
    final_state, o = jax.lax.scan(step, state, time_major, reverse=reverse)
    return jnp.moveaxis(o, 0, 1).astype(v.dtype), final_state
