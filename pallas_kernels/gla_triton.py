"""Chunked GLA as fused Pallas kernels for NVIDIA GPUs (Triton lowering), with a hand-written backward pass.

Entry point: `gla_triton(q, k, v, g, *, scale, initial_state, reverse, interpret=False)`, fla's chunk_gla
semantics (see `pallas_kernels.gla`). `interpret=True` runs the same kernels on any backend (tests use it on CPU).

Layout and chunking
-------------------
Tiles are read straight from q, k, g [B, T, H, K] and v, o [B, T, H, V]: a program's block is one (batch, head)
slice [T, K] (strided in HBM, no transposes), and it loads `CHUNK`-row tiles from it with masked loads, so T needs
no padding (rows past T read as zero: k = v = 0 and g = 0 leave the state alone, in either scan direction).
`reverse=True` walks the chunks from last to first and flips every in-chunk "earlier/later" (cumsums run upwards,
the causal mask is upper triangular); nothing is copied or flipped in memory.

Per chunk, with G the inclusive cumsum of g in scan order inside the chunk (float32), G_last its total and h the
[K, V] float32 state entering the chunk:
    o      = scale * ((q e^G) h + tril(A) v),        A_ij = sum_k q_ik k_jk e^(G_ik - G_jk)
    h_next = diag(e^G_last) h + (k e^(G_last - G))^T v
Three kernels:
  * forward: grid (B, H, V blocks); walks the chunks carrying h in registers; writes o, the final state and (for
    the backward pass only) the state entering every chunk, [B, H, T/CHUNK, K, V] in bf16 for 16-bit inputs.
  * state gradient: grid (B, H, V blocks); walks the chunks in reverse scan order carrying dL/dh and writes it per
    chunk (the gradient w.r.t. the state leaving the chunk) and dL/dinitial_state.
  * chunk gradients: grid (B, H, chunks), fully parallel; from the stored h and dL/dh_next of its chunk writes dq,
    dk, dv and dg. dg is summed per chunk from terms that do not cancel (see `_gate_grad`): no running sum over
    the sequence, and no difference of large terms that bf16 states or TF32 dots would spoil.
The two sequential kernels split V across programs (their work is separable in V) so that long sequences, which
have few (batch, head) pairs, still fill the GPU; the parallel kernel has B * H * T/CHUNK programs anyway.

Intra-chunk scores, exactly and cheaply
---------------------------------------
The factorisation A = (q e^G)(k e^-G)^T is exact in floating point as long as nothing overflows: every product
term is one exponent G_i - G_j <= 0 split in two factors, and bf16/f32 keep their relative precision at any
magnitude. It overflows only when |G| gets large inside one chunk. So each chunk checks max |G|: up to
`FACTORISED_GATE_LIMIT` (e^60 ~ 1e26, far from the float32/bf16 limit of e^88) the two matmuls are used; beyond it
(gates that wipe the state within a few tokens) an exact loop over key channels exponentiates each difference
G_ik - G_jk directly. The loop's trip count is K in such chunks and 0 otherwise, and a select keeps its result:
a lax.cond here (an scf.if yielding tensors) made Triton fail to compile the kernel on an H100 ("operand does not
dominate this use"). Both paths are exact; the per-channel one is slower and runs only in those chunks.

Matmul operands are bf16 for bf16 inputs and float32 otherwise (TF32 on the GPU); accumulation, gates and carried
states are float32. Triton's `dot` needs every dimension >= 16, hence K and V powers of two >= 16.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

CHUNK = 64
FACTORISED_GATE_LIMIT = 60.0
_MIN_DOT_DIM = 16
# Sequential kernels aim for at least this many programs (an H100 has 132 SMs) before splitting V further.
_TARGET_SEQUENTIAL_PROGRAMS = 264


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """Launch parameters. value_block: V columns per program of the two sequential kernels (None: pick from the
    grid size); num_warps / num_stages: Triton's, per kernel."""

    value_block: int | None = None
    forward_warps: int = 4
    forward_stages: int = 2
    state_grad_warps: int = 4
    state_grad_stages: int = 2
    chunk_grad_warps: int = 4
    chunk_grad_stages: int = 1


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one call."""

    seq_len: int
    scale: float
    reverse: bool
    has_initial_state: bool
    value_block: int
    dot_dtype: jnp.dtype
    state_dtype: jnp.dtype
    config: TritonConfig
    interpret: bool

    @property
    def num_chunks(self) -> int:
        return pl.cdiv(self.seq_len, CHUNK)


# ----------------------------------------------------------------------------------------------------------------
# Per-chunk math. Plain jnp on [CHUNK, K] / [CHUNK, V] / [K, V] tiles, traced inside the kernels.


def _dot(a, b, dot_dtype, *, transpose_a=False, transpose_b=False):
    """a @ b with optional transposes, operands cast to dot_dtype, float32 accumulation."""
    contracting = ((0,) if transpose_a else (1,), (1,) if transpose_b else (0,))
    return lax.dot_general(a.astype(dot_dtype), b.astype(dot_dtype), (contracting, ((), ())),
                           preferred_element_type=jnp.float32)


def _scan_cumsum(x, reverse):
    """Inclusive cumsum over rows in scan order: top-down, or bottom-up when reverse."""
    prefix = jnp.cumsum(x, axis=0)
    if not reverse:
        return prefix
    return jnp.sum(x, axis=0)[None, :] - prefix + x


def _causal_mask(reverse, *, strict=False):
    """[CHUNK, CHUNK] bool: key row j is at or before (strict: before) query row i in scan order."""
    rows = lax.broadcasted_iota(jnp.int32, (CHUNK, CHUNK), 0)
    cols = lax.broadcasted_iota(jnp.int32, (CHUNK, CHUNK), 1)
    if strict:
        return rows < cols if reverse else rows > cols
    return rows <= cols if reverse else rows >= cols


def _max_abs(x):
    return jnp.max(jnp.max(jnp.abs(x), axis=1), axis=0)


def _column(x, index):
    """Column `index` (traced) of a [CHUNK, K] tile, as a [CHUNK] vector."""
    cols = lax.broadcasted_iota(jnp.int32, x.shape, 1)
    return jnp.sum(jnp.where(cols == index, x, 0.0), axis=1)


def _intra_chunk(q, k, gates, d_scores, causal, dot_dtype):
    """Intra-chunk scores A (masked to causal) and, given dL/dA, the intra-chunk parts of dL/dq and dL/dk.

    q, k, gates: [CHUNK, K] float32 (gates = G); d_scores: [CHUNK, CHUNK] float32 already masked, or None in the
    forward pass. Returns (A, dq, dk) with dq = dk = None when d_scores is None.
    """
    with_grads = d_scores is not None

    def factorised():
        q_gated = q * jnp.exp(gates)
        k_gated = k * jnp.exp(-gates)
        scores = jnp.where(causal, _dot(q_gated, k_gated, dot_dtype, transpose_b=True), 0.0)
        if not with_grads:
            return (scores,)
        dq = jnp.exp(gates) * _dot(d_scores, k_gated, dot_dtype)
        dk = jnp.exp(-gates) * _dot(d_scores, q_gated, dot_dtype, transpose_a=True)
        return scores, dq, dk

    def per_key_channel(num_channels):
        cols = lax.broadcasted_iota(jnp.int32, q.shape, 1)

        def add_channel(channel, carry):
            q_c, k_c, g_c = _column(q, channel), _column(k, channel), _column(gates, channel)
            decay = jnp.exp(jnp.where(causal, g_c[:, None] - g_c[None, :], -jnp.inf))  # e^(G_i - G_j), j <= i
            carry = (carry[0] + q_c[:, None] * k_c[None, :] * decay,) + carry[1:]
            if not with_grads:
                return carry
            weighted = d_scores * decay
            dq_c = jnp.sum(weighted * k_c[None, :], axis=1)
            dk_c = jnp.sum(weighted * q_c[:, None], axis=0)
            return (carry[0],
                    carry[1] + jnp.where(cols == channel, dq_c[:, None], 0.0),
                    carry[2] + jnp.where(cols == channel, dk_c[:, None], 0.0))

        zeros = (jnp.zeros((CHUNK, CHUNK), jnp.float32),)
        if with_grads:
            zeros += (jnp.zeros_like(q), jnp.zeros_like(k))
        return lax.fori_loop(0, num_channels, add_channel, zeros)

    # No lax.cond (see the module docstring): the exact loop runs zero times in ordinary chunks; where a chunk's
    # gates are too strong, the select discards the factorised results (possibly inf).
    strong = _max_abs(gates) > FACTORISED_GATE_LIMIT
    exact = per_key_channel(strong.astype(jnp.int32) * q.shape[1])  # (a scalar jnp.where lowers wrongly)
    results = tuple(jnp.where(strong, e, f) for e, f in zip(exact, factorised()))
    return results if with_grads else (results[0], None, None)


def _next_state(state, k, v, gates, total, dot_dtype):
    """State leaving the chunk: diag(e^G_last) h + (k e^(G_last - G))^T v."""
    k_to_end = k * jnp.exp(total[None, :] - gates)
    return jnp.exp(total)[:, None] * state + _dot(k_to_end, v, dot_dtype, transpose_a=True)


# ----------------------------------------------------------------------------------------------------------------
# Chunk tiles in HBM.


def _chunk_of_step(step, plan):
    """Memory index of the chunk visited at scan step `step`."""
    return plan.num_chunks - 1 - step if plan.reverse else step


def _valid_rows(chunk, plan):
    """[CHUNK] bool mask of rows inside the sequence, or None when T is a whole number of chunks."""
    if plan.seq_len % CHUNK == 0:
        return None
    return chunk * CHUNK + lax.broadcasted_iota(jnp.int32, (CHUNK,), 0) < plan.seq_len


def _load(ref, chunk, valid):
    """Rows of `chunk` from a [T, D] block as float32; rows past the sequence end read as zero."""
    view = ref.at[pl.ds(chunk * CHUNK, CHUNK), :]
    tile = view[...] if valid is None else plgpu.load(view, mask=valid[:, None], other=0)
    return tile.astype(jnp.float32)


def _store(ref, chunk, valid, tile):
    view = ref.at[pl.ds(chunk * CHUNK, CHUNK), :]
    tile = tile.astype(ref.dtype)
    if valid is None:
        view[...] = tile
    else:
        plgpu.store(view, tile, mask=valid[:, None])


def _gates(g_ref, chunk, valid, plan):
    """(G [CHUNK, K], G_last [K]) of a chunk."""
    g = _load(g_ref, chunk, valid)
    return _scan_cumsum(g, plan.reverse), jnp.sum(g, axis=0)


# ----------------------------------------------------------------------------------------------------------------
# Kernels.


def _forward_kernel(q_ref, k_ref, v_ref, g_ref, *refs, plan):
    refs = list(refs)
    initial_ref = refs.pop(0) if plan.has_initial_state else None
    o_ref, final_ref, *states_ref = refs
    causal = _causal_mask(plan.reverse)

    def step_fn(step, state):
        chunk = _chunk_of_step(step, plan)
        valid = _valid_rows(chunk, plan)
        if states_ref:
            states_ref[0][step] = state.astype(states_ref[0].dtype)
        q, k, v = (_load(ref, chunk, valid) for ref in (q_ref, k_ref, v_ref))
        gates, total = _gates(g_ref, chunk, valid, plan)
        scores, _, _ = _intra_chunk(q, k, gates, None, causal, plan.dot_dtype)
        o = _dot(q * jnp.exp(gates), state, plan.dot_dtype) + _dot(scores, v, plan.dot_dtype)
        _store(o_ref, chunk, valid, plan.scale * o)
        return _next_state(state, k, v, gates, total, plan.dot_dtype)

    state = (initial_ref[...].astype(jnp.float32) if plan.has_initial_state
             else jnp.zeros(final_ref.shape, jnp.float32))
    state = lax.fori_loop(0, plan.num_chunks, step_fn, state)
    final_ref[...] = state


def _state_grad_kernel(q_ref, g_ref, do_ref, d_final_ref, d_states_ref, *d_initial_ref, plan):
    def step_fn(reverse_step, d_state):
        step = plan.num_chunks - 1 - reverse_step
        chunk = _chunk_of_step(step, plan)
        valid = _valid_rows(chunk, plan)
        d_states_ref[step] = d_state.astype(d_states_ref.dtype)
        q, do = _load(q_ref, chunk, valid), _load(do_ref, chunk, valid)
        gates, total = _gates(g_ref, chunk, valid, plan)
        from_outputs = plan.scale * _dot(q * jnp.exp(gates), do, plan.dot_dtype, transpose_a=True)
        return jnp.exp(total)[:, None] * d_state + from_outputs

    d_state = lax.fori_loop(0, plan.num_chunks, step_fn, d_final_ref[...].astype(jnp.float32))
    if d_initial_ref:
        d_initial_ref[0][...] = d_state


def _chunk_grad_kernel(q_ref, k_ref, v_ref, g_ref, do_ref, states_ref, d_states_ref,
                       dq_ref, dk_ref, dv_ref, dg_ref, *, plan):
    chunk = pl.program_id(2)
    step = _chunk_of_step(chunk, plan)  # the map is its own inverse
    valid = _valid_rows(chunk, plan)
    q, k, v, do = (_load(ref, chunk, valid) for ref in (q_ref, k_ref, v_ref, do_ref))
    gates, total = _gates(g_ref, chunk, valid, plan)
    state = states_ref[step].astype(jnp.float32)
    d_next_state = d_states_ref[step].astype(jnp.float32)
    causal = _causal_mask(plan.reverse)
    dot = functools.partial(_dot, dot_dtype=plan.dot_dtype)

    # dL/dA on the diagonal (query row = key row, gate factor exactly 1) is applied directly below; the
    # intra-chunk kernels see only the strictly causal part.
    d_scores = plan.scale * dot(do, v, transpose_b=True)
    eye = lax.broadcasted_iota(jnp.int32, d_scores.shape, 0) == lax.broadcasted_iota(jnp.int32, d_scores.shape, 1)
    d_diagonal = jnp.sum(jnp.where(eye, d_scores, 0.0), axis=1)[:, None]
    d_scores = jnp.where(_causal_mask(plan.reverse, strict=True), d_scores, 0.0)
    scores, dq_intra, dk_intra = _intra_chunk(q, k, gates, d_scores, causal, plan.dot_dtype)
    k_to_end = jnp.exp(total[None, :] - gates)
    dq_from_state = plan.scale * jnp.exp(gates) * dot(do, state, transpose_b=True)
    dk_to_next_state = k_to_end * dot(v, d_next_state, transpose_b=True)
    dq = dq_from_state + dq_intra + d_diagonal * k
    dk = dk_intra + dk_to_next_state + d_diagonal * q
    dv = plan.scale * dot(scores, do, transpose_a=True) + dot(k * k_to_end, d_next_state)
    dg = _gate_grad(q, k, dq_from_state + dq_intra, dk_intra, dk_to_next_state, state, d_next_state, total, plan)
    for ref, tile in ((dq_ref, dq), (dk_ref, dk), (dv_ref, dv), (dg_ref, dg)):
        _store(ref, chunk, valid, tile)


def _gate_grad(q, k, dq_open, dk_intra, dk_to_next_state, state, d_next_state, total, plan):
    """dL/dg of a chunk, summed so that no large terms cancel.

    dL/dg_t = sum over every (key s, query u) interaction that crosses t in scan order (s < t <= u). Grouped by
    where s and u sit: both in the chunk (the q*dq - k*dk of the intra-chunk terms, whose equal and opposite
    diagonal terms are left out: dq_open excludes them), s in the state entering the chunk (q*dq of that term),
    s in the chunk and u after it (exclusive prefix sum of k*dk towards the next state), and s before and u after
    the chunk (rowsum(e^G_last h * dL/dh_next)). Summing q*dq - k*dk over whole rows instead would subtract
    O(1) terms to get a small dg when gates are strong, and amplify rounding (bf16 states, TF32 dots) ~100x.
    """
    in_chunk = _scan_cumsum(q * dq_open - k * dk_intra, not plan.reverse)
    k_to_next = k * dk_to_next_state
    to_next_state = _scan_cumsum(k_to_next, plan.reverse) - k_to_next
    state_to_next = jnp.exp(total) * jnp.sum(state * d_next_state, axis=1)
    return in_chunk + to_next_state + state_to_next[None, :]


# ----------------------------------------------------------------------------------------------------------------
# pallas_call wrappers.


def _compiler_params(num_warps, num_stages):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _forward_call(q, k, v, g, initial_state, plan, with_states):
    batch, seq_len, heads, key_dim = q.shape
    value_dim, block = v.shape[-1], plan.value_block
    grid = (batch, heads, value_dim // block)
    key_spec = pl.BlockSpec((None, seq_len, None, key_dim), lambda b, h, j: (b, 0, h, 0))
    value_spec = pl.BlockSpec((None, seq_len, None, block), lambda b, h, j: (b, 0, h, j))
    state_spec = pl.BlockSpec((None, None, key_dim, block), lambda b, h, j: (b, h, 0, j))
    in_specs = [key_spec, key_spec, value_spec, key_spec]
    inputs = [q, k, v, g]
    if plan.has_initial_state:
        in_specs.append(state_spec)
        inputs.append(initial_state)
    out_shape = [jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), jnp.float32)]
    out_specs = [value_spec, state_spec]
    if with_states:
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, plan.num_chunks, key_dim, value_dim),
                                              plan.state_dtype))
        out_specs.append(pl.BlockSpec((None, None, plan.num_chunks, key_dim, block),
                                      lambda b, h, j: (b, h, 0, 0, j)))
    return pl.pallas_call(
        functools.partial(_forward_kernel, plan=plan), grid=grid, in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, interpret=plan.interpret, name="gla_forward",
        compiler_params=_compiler_params(plan.config.forward_warps, plan.config.forward_stages),
    )(*inputs)


def _state_grad_call(q, g, do, d_final, plan):
    batch, seq_len, heads, key_dim = q.shape
    value_dim, block = do.shape[-1], plan.value_block
    key_spec = pl.BlockSpec((None, seq_len, None, key_dim), lambda b, h, j: (b, 0, h, 0))
    value_spec = pl.BlockSpec((None, seq_len, None, block), lambda b, h, j: (b, 0, h, j))
    state_spec = pl.BlockSpec((None, None, key_dim, block), lambda b, h, j: (b, h, 0, j))
    out_shape = [jax.ShapeDtypeStruct((batch, heads, plan.num_chunks, key_dim, value_dim), plan.state_dtype)]
    out_specs = [pl.BlockSpec((None, None, plan.num_chunks, key_dim, block), lambda b, h, j: (b, h, 0, 0, j))]
    if plan.has_initial_state:
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), jnp.float32))
        out_specs.append(state_spec)
    return pl.pallas_call(
        functools.partial(_state_grad_kernel, plan=plan), grid=(batch, heads, value_dim // block),
        in_specs=[key_spec, key_spec, value_spec, state_spec], out_specs=out_specs, out_shape=out_shape,
        interpret=plan.interpret, name="gla_state_grad",
        compiler_params=_compiler_params(plan.config.state_grad_warps, plan.config.state_grad_stages),
    )(q, g, do, d_final)


def _chunk_grad_call(q, k, v, g, do, states, d_states, plan):
    batch, seq_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    key_spec = pl.BlockSpec((None, seq_len, None, key_dim), lambda b, h, c: (b, 0, h, 0))
    value_spec = pl.BlockSpec((None, seq_len, None, value_dim), lambda b, h, c: (b, 0, h, 0))
    states_spec = pl.BlockSpec((None, None, plan.num_chunks, key_dim, value_dim), lambda b, h, c: (b, h, 0, 0, 0))
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v, g)]
    return pl.pallas_call(
        functools.partial(_chunk_grad_kernel, plan=plan), grid=(batch, heads, plan.num_chunks),
        in_specs=[key_spec, key_spec, value_spec, key_spec, value_spec, states_spec, states_spec],
        out_specs=[key_spec, key_spec, value_spec, key_spec], out_shape=out_shape,
        interpret=plan.interpret, name="gla_chunk_grad",
        compiler_params=_compiler_params(plan.config.chunk_grad_warps, plan.config.chunk_grad_stages),
    )(q, k, v, g, do, states, d_states)


# ----------------------------------------------------------------------------------------------------------------
# Differentiable op.


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _gla(q, k, v, g, initial_state, plan):
    o, final_state = _forward_call(q, k, v, g, initial_state, plan, with_states=False)
    return o, final_state


def _gla_forward(q, k, v, g, initial_state, plan):
    o, final_state, states = _forward_call(q, k, v, g, initial_state, plan, with_states=True)
    return (o, final_state), (q, k, v, g, states)


def _gla_backward(plan, residuals, cotangents):
    q, k, v, g, states = residuals
    do, d_final = cotangents
    d_states, *d_initial = _state_grad_call(q, g, do.astype(v.dtype), d_final.astype(jnp.float32), plan)
    dq, dk, dv, dg = _chunk_grad_call(q, k, v, g, do.astype(v.dtype), states, d_states, plan)
    return dq, dk, dv, dg, (d_initial[0] if plan.has_initial_state else None)


_gla.defvjp(_gla_forward, _gla_backward)


def _is_dot_dim(n):
    return n >= _MIN_DOT_DIM and n & (n - 1) == 0


def _pick_value_block(batch, heads, value_dim):
    """Largest V block (>= 16) that gives the sequential kernels enough programs to fill the GPU."""
    block = value_dim
    while block > _MIN_DOT_DIM and batch * heads * (value_dim // block) < _TARGET_SEQUENTIAL_PROGRAMS:
        block //= 2
    return block


def gla_triton(q, k, v, g, *, scale, initial_state, reverse, interpret=False, config=None):
    """Chunked GLA, forward and backward as Pallas Triton kernels.

    Args:
      q, k, g: [B, T, H, K]; v: [B, T, H, V]; q, k, v one float dtype (bf16 or f32), g any float dtype.
        K and V must be powers of two >= 16 (Triton dot tiles).
      scale: multiplies q.
      initial_state: [B, H, K, V] float32 or None (zeros).
      reverse: scan from token T-1 down to token 0.
      interpret: run the kernels in Pallas interpret mode (any backend, slow).
      config: `TritonConfig` launch parameters; None uses the defaults.

    Returns:
      (o [B, T, H, V] in v's dtype, final_state [B, H, K, V] float32). Differentiable w.r.t. q, k, v, g and
      initial_state, with cotangents for both outputs.
    """
    batch, seq_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    for name, dim in (("K (q.shape[-1])", key_dim), ("V (v.shape[-1])", value_dim)):
        if not _is_dot_dim(dim):
            raise ValueError(f"impl='pallas' on GPU needs {name} to be a power of two >= {_MIN_DOT_DIM}, got {dim}; "
                             "use impl='xla' for other head sizes")
    config = config or TritonConfig()
    value_block = config.value_block or _pick_value_block(batch, heads, value_dim)
    if not (_is_dot_dim(value_block) and value_dim % value_block == 0):
        raise ValueError(f"config.value_block must be a power of two >= {_MIN_DOT_DIM} dividing V={value_dim}, "
                         f"got {value_block}")
    sixteen_bit = q.dtype in (jnp.bfloat16, jnp.float16)
    plan = _Plan(
        seq_len=seq_len, scale=float(scale), reverse=bool(reverse), has_initial_state=initial_state is not None,
        value_block=value_block,
        # bf16 keeps float32's exponent range, which the factorised scores need; f16 would overflow at e^11.
        dot_dtype=jnp.dtype(jnp.bfloat16) if q.dtype == jnp.bfloat16 else jnp.dtype(jnp.float32),
        state_dtype=jnp.dtype(jnp.bfloat16) if sixteen_bit else jnp.dtype(jnp.float32),
        config=config, interpret=bool(interpret))
    if initial_state is not None:
        initial_state = initial_state.astype(jnp.float32)
    return _gla(q, k, v, g, initial_state, plan)

