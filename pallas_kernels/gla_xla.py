"""Chunked GLA in plain jnp: the portable implementation, differentiated by JAX autodiff (with a hand-written
backward for the element-wise diagonal blocks only).

The sequence is cut into chunks of `CHUNK` tokens. With G the inclusive cumsum of g inside a chunk (float32) and
h_c the [K, V] state entering chunk c:

    h_{c+1} = diag(exp G_last) h_c + (k * exp(G_last - G))^T v
    o       = scale * (q * exp G) h_c  +  intra-chunk attention

Everything that does not depend on the state runs in parallel over chunks; only the [K, V] state recurrence is a
`lax.scan`, and the inter-chunk output is computed afterwards from the stacked entering states.

Overflow safety: G falls monotonically inside a chunk, so the textbook factorisation (q e^G)(k e^-G)^T needs
e^{-G}, which overflows for long chunks or strong gates. Every exponent here is a difference G_later - G_earlier
(<= 0). The intra-chunk scores use sub-chunks of `SUB_CHUNK` rows: a query sub-chunk i attends to earlier key
sub-chunks through the gate G_n at the first row of sub-chunk i,
    A = scale * (q * exp(G_q - G_n)) (k * exp(G_n - G_k))^T,
and to its own sub-chunk through an element-wise product with exp(G_t - G_s), masked to s <= t before the exp.
"""

import functools

import jax
import jax.numpy as jnp

CHUNK = 64
SUB_CHUNK = 16
_SUBS_PER_CHUNK = CHUNK // SUB_CHUNK


def gla_xla(q, k, v, g, *, scale, initial_state, reverse):
    """q, k, g: [B, T, H, K]; v: [B, T, H, V]; initial_state: [B, H, K, V] or None.

    Matmuls take their operands in q's dtype and accumulate in float32; gates and states are float32.
    Returns (o [B, T, H, V] in v's dtype, final_state [B, H, K, V] float32).
    """
    seq_len = q.shape[1]
    if reverse:
        # Flipping first and padding afterwards keeps the padding after the last scanned token in both directions.
        q, k, v, g = (jnp.flip(x, axis=1) for x in (q, k, v, g))
    q, k, v, g = (_pad_to_whole_chunks(x) for x in (q, k, v, g))
    o, final_state = _chunked_gla(q, k, v, g, scale=scale, initial_state=initial_state)
    o = o[:, :seq_len]
    if reverse:
        o = jnp.flip(o, axis=1)
    return o.astype(v.dtype), final_state


def _pad_to_whole_chunks(x):
    """Zero-pads the time axis of [B, T, H, D] up to a multiple of CHUNK.

    Zero padding is exact: padded tokens come last, and with g = 0 they do not decay the state while k = v = 0
    adds nothing to it, so the final state equals the state after the last real token.
    """
    padding = -x.shape[1] % CHUNK
    return jnp.pad(x, ((0, 0), (0, padding), (0, 0), (0, 0))) if padding else x


def _matmul(spec, a, b, operand_dtype):
    """einsum with operands cast to `operand_dtype` and float32 accumulation (full f32 precision for f32)."""
    precision = jax.lax.Precision.HIGHEST if operand_dtype == jnp.float32 else jax.lax.Precision.DEFAULT
    return jnp.einsum(spec, a.astype(operand_dtype), b.astype(operand_dtype), precision=precision,
                      preferred_element_type=jnp.float32)


def _chunked_gla(q, k, v, g, *, scale, initial_state):
    """Forward scan over whole chunks. q, k, g: [B, N*CHUNK, H, K]; v: [B, N*CHUNK, H, V]."""
    batch, padded_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    n_chunks = padded_len // CHUNK
    operand_dtype = q.dtype

    # [B, N*C, H, D] -> [B*H*N, C, D]: one leading batch axis, so every matmul is a plain batched one. (Besides,
    # XLA:CPU in jaxlib 0.10.2 crashes running the gradient of some dots with several batch axes, one of size 1.)
    def to_chunks(x):
        x = x.reshape(batch, n_chunks, CHUNK, heads, x.shape[-1]).transpose(0, 3, 1, 2, 4)
        return x.reshape(batch * heads * n_chunks, CHUNK, x.shape[-1])

    q, k, v, g = (to_chunks(x) for x in (q, k, v, g))
    gate = jnp.cumsum(g.astype(jnp.float32), axis=1)  # G: [B*H*N, C, K], falling along C
    if initial_state is None:
        initial_state = jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32)
    entering_states, final_state = _scan_chunk_states(k, v, gate, initial_state.astype(jnp.float32),
                                                      operand_dtype)
    o = (_inter_chunk_output(q, gate, entering_states, scale, operand_dtype)
         + _intra_chunk_output(q, k, v, gate, scale, operand_dtype))
    o = o.reshape(batch, heads, n_chunks, CHUNK, value_dim).transpose(0, 2, 3, 1, 4)
    return o.reshape(batch, padded_len, heads, value_dim), final_state


def _scan_chunk_states(k, v, gate, initial_state, operand_dtype):
    """Runs h_{c+1} = diag(exp G_last) h_c + (k * exp(G_last - G))^T v over chunks.

    k, gate: [B*H*N, C, K]; v: [B*H*N, C, V]; initial_state: [B, H, K, V] f32.
    Returns (entering states [B*H*N, K, V], final state [B, H, K, V]), both f32.
    """
    batch, heads, key_dim, value_dim = initial_state.shape
    gate_last = gate[:, -1:]  # [B*H*N, 1, K]
    k_decayed_to_chunk_end = k.astype(jnp.float32) * jnp.exp(gate_last - gate)
    chunk_updates = _matmul("zck,zcv->zkv", k_decayed_to_chunk_end, v, operand_dtype)
    chunk_decays = jnp.exp(gate_last).reshape(batch, heads, -1, key_dim, 1)

    def step(state, decay_and_update):
        decay, update = decay_and_update
        return decay * state + update, state

    def chunks_first(x):  # [B, H, N, ...] -> [N, B, H, ...], the scanned axis first
        return jnp.moveaxis(x, 2, 0)

    final_state, entering_states = jax.lax.scan(
        step, initial_state,
        (chunks_first(chunk_decays), chunks_first(chunk_updates.reshape(batch, heads, -1, key_dim, value_dim))))
    return jnp.moveaxis(entering_states, 0, 2).reshape(-1, key_dim, value_dim), final_state


def _inter_chunk_output(q, gate, entering_states, scale, operand_dtype):
    """scale * (q * exp G) h_c for every chunk at once. q, gate: [B*H*N, C, K]. Returns [B*H*N, C, V] f32."""
    q_decayed_from_chunk_start = q.astype(jnp.float32) * jnp.exp(gate) * scale
    return _matmul("zck,zkv->zcv", q_decayed_from_chunk_start, entering_states, operand_dtype)


def _intra_chunk_output(q, k, v, gate, scale, operand_dtype):
    """tril(A) v inside each chunk. q, k, gate: [B*H*N, C, K]; v: [B*H*N, C, V]. Returns [B*H*N, C, V] f32."""
    q, k, gate = (x.reshape(-1, _SUBS_PER_CHUNK, SUB_CHUNK, x.shape[-1]).astype(jnp.float32) for x in (q, k, gate))
    scores = _earlier_sub_chunk_scores(q, k, gate, scale, operand_dtype) + _diagonal_block_scores(q, k, gate, scale)
    return _matmul("zts,zsv->ztv", scores.reshape(-1, CHUNK, CHUNK), v, operand_dtype)


def _earlier_sub_chunk_scores(q, k, gate, scale, operand_dtype):
    """Scores of query sub-chunk i against key sub-chunks j < i, through G_n, the gate at sub-chunk i's first row.

    A[i, t, j, s] = scale * sum_k q[i, t, k] exp(G[i, t, k] - G_n[k]) * k[j, s, k] exp(G_n[k] - G[j, s, k]);
    both exponents are <= 0 for j < i, and the other blocks are masked to 0 (exponent -inf) before the exp.
    q, k, gate: [Z, C/S, S, K] f32. Returns [Z, C/S, S, C/S, S] f32 (query sub-chunk, row, key sub-chunk, column).
    """
    reference_gate = gate[:, :, :1]  # G_n: [Z, C/S (i), 1, K]
    q_rel = q * jnp.exp(gate - reference_gate) * scale
    sub_chunk = jnp.arange(_SUBS_PER_CHUNK)
    earlier = (sub_chunk[:, None] > sub_chunk[None, :])[:, :, None, None]  # [i, j, 1, 1]
    exponent = reference_gate[:, :, None] - gate[:, None]  # [Z, i, j, S, K]
    k_rel = k[:, None] * jnp.exp(jnp.where(earlier, exponent, -jnp.inf))
    return _matmul("zitk,zijsk->zitjs", q_rel, k_rel, operand_dtype)


def _diagonal_block_scores(q, k, gate, scale):
    """The SUB_CHUNK x SUB_CHUNK causal blocks on the diagonal, scored element-wise in f32.

    A[i, t, i, s] = scale * sum_k q[t, k] k[s, k] exp(G[t, k] - G[s, k]) for s <= t (rows t, s of sub-chunk i).
    The exponent is masked to -inf above the diagonal before the exp, so no positive exponent is ever evaluated
    (and its gradient is exactly 0). q, k, gate: [Z, C/S, S, K] f32.
    Returns the blocks placed on the diagonal: [Z, C/S, S, C/S, S] f32.
    """
    blocks = _diagonal_blocks(q, k, gate, scale)
    on_diagonal = jnp.eye(_SUBS_PER_CHUNK, dtype=jnp.float32)[:, None, :, None]  # [i, 1, j, 1]
    return blocks[:, :, :, None, :] * on_diagonal


def _causal_decay(gate):
    """exp(G[t, k] - G[s, k]) for s <= t, else 0: [Z, C/S, S_t, S_s, K] from gate [Z, C/S, S, K]."""
    gate_difference = gate[:, :, :, None] - gate[:, :, None, :]
    causal = jnp.tril(jnp.ones((SUB_CHUNK, SUB_CHUNK), bool))[:, :, None]
    return jnp.exp(jnp.where(causal, gate_difference, -jnp.inf))


# Hand-written backward: autodiff of the [Z, C/S, S, S, K] element-wise product makes XLA materialise several
# broadcast and transposed copies of that tensor, the costliest part of this op on CPU at short sequences.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _diagonal_blocks(q, k, gate, scale):
    """[Z, C/S, S_t, S_s]: scale * sum_k q[t] k[s] exp(G[t] - G[s]), 0 above the diagonal."""
    return jnp.sum(q[:, :, :, None] * k[:, :, None] * _causal_decay(gate), axis=-1) * scale


def _diagonal_blocks_fwd(q, k, gate, scale):
    return _diagonal_blocks(q, k, gate, scale), (q, k, gate)


def _diagonal_blocks_bwd(scale, residuals, d_blocks):
    # Recomputes the decay (one exp per element) instead of keeping the S x S x K tensor alive until the backward.
    q, k, gate = residuals
    weighted_decay = _causal_decay(gate) * (d_blocks * scale)[..., None]  # [Z, C/S, S_t, S_s, K]
    dq = jnp.sum(weighted_decay * k[:, :, None], axis=3)
    dk = jnp.sum(weighted_decay * q[:, :, :, None], axis=2)
    # G enters as +G[t] and -G[s], each scaling the term by itself: dG = q dq - k dk.
    return dq, dk, q * dq - k * dk


_diagonal_blocks.defvjp(_diagonal_blocks_fwd, _diagonal_blocks_bwd)
