"""Sequence-parallel GLA: `chunk_gla` on a sequence split over the devices of a mesh axis.

Call `sequence_parallel_chunk_gla` inside `jax.shard_map` with T (dim 1 of q, k, v, g) split over `axis_name`:
device d holds tokens [d * T_d, (d + 1) * T_d) of a global sequence of D * T_d tokens (D = the axis size).

GLA's state is all that crosses a device boundary, and the state recurrence is linear in the state:

    S_t = diag(exp g_t) S_{t-1} + k_t^T v_t

so device d's final state, started from a state S_in, is diag(exp a_d) S_in + S_d, where a_d = sum of g over the
device's tokens ([B, H, K]) and S_d its final state from zero ([B, H, K, V]). Three steps:

  1. every device runs `chunk_gla` on its tokens from a zero state: local outputs o_d and (a_d, S_d);
  2. the (a_d, S_d) pairs are all-gathered (D * B * H * K * V floats: kilobytes per head) and every device folds
     them in scan order, in float32: S_in(d) = sum_{j<d} (prod_{j<i<d} exp a_i) S_j + (prod_{i<d} exp a_i) S_0,
     S_0 the global initial state; the fold over all D devices is the global final state;
  3. every device adds the contribution of its incoming state to its outputs:
         o_t += scale * (q_t * exp G_t) S_in(d),   G_t = sum of g over the device's tokens up to and including t,
     which is `chunk_gla`'s own inter-chunk term with S_in as the state entering the device.

The alternative to step 3, a second `chunk_gla` pass with initial_state=S_in(d), recomputes every intra-chunk
term: it doubles the forward FLOPs of the op (and its backward), where the correction costs one [T_d, K] x [K, V]
matmul per head plus an exp of the [T_d, K] cumulative gate (about the inter-chunk share of one pass, well under
half of it at K = 64). So the correction is used.

With reverse=True the scan runs from the last token to the first: the fold runs over devices D-1 down to 0, and
G_t sums g from the device's last token down to t.

The enclosing shard_map may check varying manual axes (check_vma=True, its default) or not; impl="pallas" needs
check_vma=False (the kernels' bodies are not typed for varying axes). Other mesh axes may stay automatic
(shard_map's axis_names): impl="pallas" then splits batch and heads over them inside (gla_pallas).

Gradients come from autodiff: through `chunk_gla`'s own VJP (every impl differentiates its outputs and final state
with respect to q, k, v and g), the all-gather (whose transpose is a reduce-scatter) and the fold. The
global initial state is an input of the fold only, so its gradient needs nothing from the implementations.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.gla import chunk_gla


def sequence_parallel_chunk_gla(q, k, v, g, *, axis_name, scale=None, initial_state=None, output_final_state=False,
                                reverse=False, impl="auto"):
    """`chunk_gla` on a sequence split over mesh axis `axis_name`; call it inside `jax.shard_map`.

    Args:
      q, k: this device's tokens [B, T_d, H, K]; v: [B, T_d, H, V]; g: [B, T_d, H, K] log forget gate (<= 0).
        The global sequence is the concatenation of the devices' tokens in `axis_name` index order. T_d need not
        be a multiple of the chunk size.
      axis_name: the mesh axis (manual inside the enclosing shard_map) that splits T.
      scale: multiplies q; defaults to K ** -0.5.
      initial_state: optional [B, H, K, V] state entering the first scanned token of the global sequence (the
        first device's first token, or the last device's last token when reverse), the same on every device.
      output_final_state: also return the state after the last scanned token of the global sequence.
      reverse: scan the global sequence from its last token to its first.
      impl: `chunk_gla`'s implementation for the local pass ("auto", "reference", "xla" or "pallas").

    Returns:
      (o, final_state): o is this device's [B, T_d, H, V] in v's dtype; final_state is [B, H, K, V] float32, the
      same on every device, or None unless output_final_state.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    batch, _, heads, key_dim = q.shape
    vma_checked = axis_name in jax.typeof(q).mat.varying  # shard_map(check_vma=True) types values varying or not
    zero_state = jnp.zeros((batch, heads, key_dim, v.shape[-1]), jnp.float32)
    if vma_checked:  # the impls' scans mix the state with the tokens: their carries must vary like the tokens
        zero_state = jax.lax.pcast(zero_state, axis_name, to="varying")
    o_local, state_local = chunk_gla(q, k, v, g, scale=scale, initial_state=zero_state, output_final_state=True,
                                     reverse=reverse, impl=impl)
    gate_local = _cumulative_gate(g, reverse)  # G_t: [B, T_d, H, K] f32
    decay_local = gate_local[:, 0 if reverse else -1]  # a_d: [B, H, K]
    entering_state, final_state = _exchange_states(decay_local, state_local, initial_state, axis_name, reverse,
                                                   vma_checked)
    q_decayed = q.astype(jnp.float32) * jnp.exp(gate_local) * scale
    o = (o_local.astype(jnp.float32) + _incoming_state_output(q_decayed, entering_state, q.dtype)).astype(v.dtype)
    return o, (final_state if output_final_state else None)


def _incoming_state_output(q_decayed, state, operand_dtype):
    """q_decayed [B, T, H, K] @ state [B, H, K, V] per (batch, head) -> [B, T, H, V] float32; operands in
    `operand_dtype`, accumulated in float32, as in the impls' own inter-chunk term.

    One batch axis (B * H) for the matmul: XLA:CPU in jaxlib 0.10.2 fails to run some bfloat16 dots with two batch
    axes and a float32 result ("Unsupported element type for DotThunk").
    """
    batch, seq_len, heads, key_dim = q_decayed.shape
    value_dim = state.shape[-1]
    q_rows = q_decayed.transpose(0, 2, 1, 3).reshape(batch * heads, seq_len, key_dim).astype(operand_dtype)
    precision = jax.lax.Precision.HIGHEST if operand_dtype == jnp.float32 else jax.lax.Precision.DEFAULT
    o = jnp.einsum("ztk,zkv->ztv", q_rows, state.reshape(batch * heads, key_dim, value_dim).astype(operand_dtype),
                   precision=precision, preferred_element_type=jnp.float32)
    return o.reshape(batch, heads, seq_len, value_dim).transpose(0, 2, 1, 3)


def _cumulative_gate(g, reverse):
    """G_t over this device's tokens in scan order, float32: the inclusive cumsum of g from the first scanned
    token (the device's last token when reverse). Every exp(G_t) is <= 1."""
    return jax.lax.cumsum(g.astype(jnp.float32), axis=1, reverse=reverse)


def _exchange_states(decay, state, initial_state, axis_name, reverse, vma_checked):
    """(state entering this device [B, H, K, V], global final state [B, H, K, V]), both float32.

    decay: this device's a_d [B, H, K]; state: its final state from zero, S_d [B, H, K, V].
    """
    # Under shard_map's type checks the pairs are gathered as invariant over the axis (equal on every device), so
    # that the fold and the final state are invariant too (out_specs may leave the axis out); the transpose then
    # sums the cotangents of every device's uses through the implicit casts to varying. Unchecked, a plain
    # all-gather, whose transpose (a reduce-scatter) does that sum.
    gather_to = "invarying" if vma_checked else "varying"
    decays = jax.lax.all_gather(decay, axis_name, to=gather_to)  # [D, B, H, K]
    states = jax.lax.all_gather(state.astype(jnp.float32), axis_name, to=gather_to)  # [D, B, H, K, V]
    if reverse:  # fold from the last device to the first
        decays, states = decays[::-1], states[::-1]
    carry = jnp.zeros(state.shape, jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)

    def fold(carry, decay_and_state):
        decay, state = decay_and_state
        return jnp.exp(decay)[..., None] * carry + state, carry

    final_state, entering_states = jax.lax.scan(fold, carry, (decays, states))
    device = jax.lax.axis_index(axis_name)
    position = jax.lax.axis_size(axis_name) - 1 - device if reverse else device
    return entering_states[position], final_state
