"""Chunked GLA as fused Pallas kernels for NVIDIA GPUs (Triton lowering), with a hand-written backward pass.

Entry point: `gla_triton(q, k, v, g, *, scale, initial_state, reverse, interpret=False)`, fla's chunk_gla
semantics (see `pallas_kernels.gla`). `interpret=True` runs the same kernels on any backend (tests use it on CPU).

Layout and chunking
-------------------
Tiles are read straight from q, k, g [B, T, H, K] and v, o [B, T, H, V]: a program's block is one (batch, head)
slice [T, K] (strided in HBM, no transposes), and it loads `CHUNK`-row tiles from it with masked loads, so T needs
no padding (rows past T read as zero: k = v = 0 and g = 0 leave the state alone, in either scan direction).
`reverse=True` walks the chunks from last to first and flips every in-chunk "earlier/later" (cumsums run upwards,
the causal mask is upper triangular); nothing is copied or flipped in memory. Likewise `column_major=True` (a
square grid of tokens scanned column by column, DiG's transposed blocks) only changes which rows a chunk's tiles
gather: rows are strided in HBM either way (one row of a [T, K] slice is K contiguous elements), and the arrays
stay in raster order, so the caller needs no transposes.
q, k and v may also lie in one wider array (`Columns`: the GLA layer's packed input projection, `gla_layer`): their
BlockSpecs then pick each head's column block of it, and with `packed_backward` the chunk-gradient kernel writes dq,
dk and dv into the same columns of one gradient array, so that the caller neither splits nor concatenates.

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
V blocks default to all of V (one program per (batch, head)): splitting V to give long sequences more programs
measured slower on an H100 (it repeats the key-side work per block). In-chunk cumsums are matmuls with a triangle
of ones (`_masked_row_sums`): with Triton's scan along the rows of a tile the chunk-gradient kernel was ~25% slower.

Chunk-parallel schedule (`TritonConfig(chunk_parallel=True)`, for few (batch, head) pairs at long T)
----------------------------------------------------------------------------------------------------
With one program per (batch, head), a small batch at long T leaves most SMs idle while each program walks its
chunks (DiG-S/2 at 1792 px, batch 1: 6 programs for 132 SMs, 196 chunks each). This schedule takes the two state
recurrences apart instead:
  * chunk summary: grid (B, H, chunks), fully parallel; each chunk's total gate G_last and its contribution to
    the carried state: (k e^(G_last - G))^T v for the forward's state, scale (q e^G)^T do for its gradient;
  * scan: grid (B, H, K / 16); walks the chunks doing only carry = diag(e^G_last) carry + contribution,
    elementwise on a [16, V] block of state rows (rows are independent), and writes the carry entering each chunk;
    its loads do not depend on the carry, so they pipeline;
  * output: grid (B, H, chunks), fully parallel; o of a chunk from its state, plus its guarded fix-up as for the
    chunk gradients.
The chunk-gradient kernels are the same in both schedules. By default (`TritonConfig.chunk_parallel=None`) a call
takes it where it measured faster, from the grid size (`_chunk_parallel_pays`).

Intra-chunk scores, exactly and cheaply
---------------------------------------
The factorisation A = (q e^G)(k e^-G)^T is exact in floating point as long as nothing overflows: every product
term is one exponent G_i - G_j <= 0 split in two factors, and bf16/f32 keep their relative precision at any
magnitude. It overflows only when |G| gets large inside one chunk: beyond `FACTORISED_GATE_LIMIT` (e^60 ~ 1e26,
far from the float32/bf16 limit of e^88), i.e. gates that wipe the state within a few tokens. For those chunks an
exact loop over key channels exponentiates each difference G_ik - G_jk directly (`_exact_intra_chunk`).

The kernels above run unguarded: factorised scores only, so no register is spent on the exact path. The forward
kernel reports each sequence's max |G|, and two fix-up kernels always follow: the guarded forward and the guarded
chunk-gradient kernel (both paths, the exact one selected per chunk), aliased to the unguarded outputs, which
redo the work for the (batch, head) pairs with a strong chunk and end at once for the others. The states and
their gradients never involve the intra-chunk scores, so they are computed once. Measured alternatives (H100):
a guarded kernel everywhere cost ~40% more in the chunk-gradient kernel; lax.cond at the JAX level copies its
predicate to the host and stalls the stream on every call; pl.when branches inside a kernel miscompiled (wrong dv);
and a lax.cond yielding tiles inside a kernel failed to compile ("operand does not dominate this use"). The
guarded code therefore uses a loop whose trip count is K or 0 plus a select, and the fix-ups a loop of 0 or N
trips.

Matmul operands are bf16 for bf16 inputs and float32 otherwise (TF32 on the GPU); accumulation, gates and carried
states are float32. Triton's `dot` needs every dimension >= 16, hence K and V powers of two >= 16: other head sizes
are zero-padded to the next one (`_with_dot_dims`, exact).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.token_grid import grid_side

CHUNK = 64
# jax.checkpoint name of the residuals only the forward kernels make (per-chunk states, gate strengths): a remat
# policy that saves it spares the backward pass a second run of the forward kernels. The others (q, k, v, g) are
# the op's inputs, which the caller's policy keeps or recomputes.
CHECKPOINT_NAME = "gla_chunk_states"
FACTORISED_GATE_LIMIT = 60.0
_MIN_DOT_DIM = 16
_SCAN_ROWS = 16  # state rows per program of the chunk-parallel scan (K is a power of two >= 16)
_CHUNK_PARALLEL_WARPS, _SCAN_STAGES = 4, 3  # launch parameters of the chunk-parallel kernels
# The automatic schedule choice (`_chunk_parallel_pays`): chunk-parallel for at most 1/4 as many sequential walks
# as SMs, each at least this many chunks long (T >= 4096).
_CHUNK_PARALLEL_MAX_SM_SHARE, _CHUNK_PARALLEL_MIN_CHUNKS = 4, 64
_LOG2_E = 1.4426950408889634


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """Launch parameters. value_block: V columns per program of the two sequential kernels (None: all of V;
    splitting V to fill the GPU at long T measured slower on an H100, see docs/gla_kernels.md); chunk_parallel:
    the chunk-parallel schedule (module docstring), None: picked from the grid size (`_chunk_parallel_pays`);
    num_warps / num_stages: Triton's, per kernel; forward_stages None: picked from the grid size
    (`_forward_stages`)."""

    value_block: int | None = None
    chunk_parallel: bool | None = None
    forward_warps: int = 4
    forward_stages: int | None = None
    state_grad_warps: int = 4
    state_grad_stages: int = 3
    chunk_grad_warps: int = 4
    chunk_grad_stages: int = 1


# What calls without a config get (chunk_gla's, hence the models'); benchmarks swap it to time a variant end to end.
DEFAULT_CONFIG = TritonConfig()


@dataclasses.dataclass(frozen=True)
class Columns:
    """A [B, T, H, X] sequence operand kept in place inside a wider array: head h is
    array[:, :, first + h X : first + (h + 1) X] of `array` [B, T, C]. The kernels read such operands (and the
    chunk-gradient kernel writes their gradients) where they lie, e.g. q, k and v inside one projection's output;
    `first` must be a multiple of the blocks read (X, or the V block for v)."""

    array: jax.Array
    first: int
    heads: int
    width: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (*self.array.shape[:2], self.heads, self.width)

    @property
    def dtype(self):
        return self.array.dtype


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one call."""

    seq_len: int
    scale: float
    reverse: bool
    grid_side: int | None  # a square grid scanned column by column (`_chunk_rows`), or None: raster order
    has_initial_state: bool
    value_block: int
    dot_dtype: jnp.dtype
    state_dtype: jnp.dtype
    bf16_gates: bool
    guarded: bool  # see `_intra_chunk`
    chunk_parallel: bool
    config: TritonConfig
    interpret: bool
    # The chunk-gradient kernel writes dq, dk and dv into one wide array: the first columns of head 0 of each, or
    # None for arrays of their own (`_grad_targets`).
    grad_columns: tuple[int, int, int] | None = None

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


def _exp(x):
    """e^x as 2^(x log2 e): one hardware exp2 instead of libdevice's longer expf."""
    return jnp.exp2(x * _LOG2_E)


def _causal_mask(reverse, *, strict=False):
    """[CHUNK, CHUNK] bool: key row j is at or before (strict: before) query row i in scan order."""
    rows = lax.broadcasted_iota(jnp.int32, (CHUNK, CHUNK), 0)
    cols = lax.broadcasted_iota(jnp.int32, (CHUNK, CHUNK), 1)
    if strict:
        return rows < cols if reverse else rows > cols
    return rows <= cols if reverse else rows >= cols


def _masked_row_sums(mask, x, *, exact_in_bf16):
    """mask @ x for a [CHUNK, CHUNK] 0/1 mask (cumsums over rows), on the tensor cores.

    Triton's scan along the row axis of a tile is slow; a matmul with a triangle of ones is not. Operands are bf16
    with float32 accumulation: exact for bf16 x; a float32 x is split into two bf16 parts, x = hi + lo, which
    keeps 16 of its 24 mantissa bits (relative error ~2^-17 per term).
    """
    ones = mask.astype(jnp.bfloat16)
    hi = x.astype(jnp.bfloat16)
    sums = _dot(ones, hi, jnp.bfloat16)
    if not exact_in_bf16:
        sums += _dot(ones, x - hi.astype(jnp.float32), jnp.bfloat16)
    return sums


def _column(x, index):
    """Column `index` (traced) of a [CHUNK, K] tile, as a [CHUNK] vector."""
    cols = lax.broadcasted_iota(jnp.int32, x.shape, 1)
    return jnp.sum(jnp.where(cols == index, x, 0.0), axis=1)


def _factorised_intra_chunk(q, k, gates, d_scores, causal, dot_dtype):
    """Intra-chunk scores A (masked to causal) and, given dL/dA, the intra-chunk parts of dL/dq and dL/dk, from
    A = (q e^G)(k e^-G)^T. Only for chunks with max |G| <= FACTORISED_GATE_LIMIT (no overflow).

    q, k, gates: [CHUNK, K] float32 (gates = G); d_scores: [CHUNK, CHUNK] float32 already masked, or None in the
    forward pass. Returns (A, dq, dk), dq = dk = None when d_scores is None.
    """
    growth, decay = _exp(gates), _exp(-gates)
    q_gated, k_gated = q * growth, k * decay
    scores = jnp.where(causal, _dot(q_gated, k_gated, dot_dtype, transpose_b=True), 0.0)
    if d_scores is None:
        return scores, None, None
    dq = growth * _dot(d_scores, k_gated, dot_dtype)
    dk = decay * _dot(d_scores, q_gated, dot_dtype, transpose_a=True)
    return scores, dq, dk


def _exact_intra_chunk(q, k, gates, d_scores, causal, num_channels):
    """What `_factorised_intra_chunk` returns, for any gates: a loop over the first num_channels key channels (all
    K of them, or 0 to skip the work) that exponentiates each difference G_ik - G_jk (<= 0 where causal)
    directly. Slower; only for chunks with strong gates."""
    with_grads = d_scores is not None
    cols = lax.broadcasted_iota(jnp.int32, q.shape, 1)

    def add_channel(channel, carry):
        q_c, k_c, g_c = _column(q, channel), _column(k, channel), _column(gates, channel)
        decay = _exp(jnp.where(causal, g_c[:, None] - g_c[None, :], -jnp.inf))  # e^(G_i - G_j), j <= i
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
    results = lax.fori_loop(0, num_channels, add_channel, zeros)
    return results if with_grads else (results[0], None, None)


def _intra_chunk(q, k, gates, d_scores, causal, dot_dtype, guarded):
    """(A, dq, dk) as in `_factorised_intra_chunk`; guarded: right for any gates (see the module docstring).

    Guarded, the exact loop runs K times in chunks beyond FACTORISED_GATE_LIMIT and zero times in others, and a
    select keeps the exact results where it ran. No lax.cond: an scf.if yielding tensors failed to compile on an
    H100 ("operand does not dominate this use"), and one holding each path's stores miscompiled (wrong dv).
    """
    factorised = _factorised_intra_chunk(q, k, gates, d_scores, causal, dot_dtype)
    if not guarded:
        return factorised
    strong = _gate_strength(gates) > FACTORISED_GATE_LIMIT
    exact = _exact_intra_chunk(q, k, gates, d_scores, causal, strong.astype(jnp.int32) * q.shape[1])
    return tuple(None if f is None else jnp.where(strong, e, f) for e, f in zip(exact, factorised))


def _gate_strength(gates):
    """max |G| of a chunk: the factorised scores are exact while it is <= FACTORISED_GATE_LIMIT."""
    return jnp.max(jnp.max(jnp.abs(gates), axis=1), axis=0)


def _chunk_output(q, k, v, gates, state, causal, plan):
    """o of a chunk from the state entering it: scale * ((q e^G) h + tril(A) v)."""
    scores, _, _ = _intra_chunk(q, k, gates, None, causal, plan.dot_dtype, plan.guarded)
    return plan.scale * (_dot(q * _exp(gates), state, plan.dot_dtype) + _dot(scores, v, plan.dot_dtype))


def _next_state(state, k, v, gates, total, dot_dtype):
    """State leaving the chunk: diag(e^G_last) h + (k e^(G_last - G))^T v."""
    k_to_end = k * _exp(total[None, :] - gates)
    return _exp(total)[:, None] * state + _dot(k_to_end, v, dot_dtype, transpose_a=True)


# ----------------------------------------------------------------------------------------------------------------
# Chunk tiles in HBM.


def _chunk_of_step(step, plan):
    """Memory index of the chunk visited at scan step `step`."""
    return plan.num_chunks - 1 - step if plan.reverse else step


def _chunk_rows(chunk, plan):
    """(index, mask): the rows of a [T, D] block that chunk `chunk` covers, and a [CHUNK] bool mask of its positions
    inside the sequence (None when T is a whole number of chunks). In raster order the index is a slice of CHUNK
    rows; with `plan.grid_side` (a square grid scanned column by column) it is the gathered rows of the chunk's
    column-major positions p: row (p mod side) * side + p div side."""
    positions = chunk * CHUNK + lax.broadcasted_iota(jnp.int32, (CHUNK,), 0)
    mask = None if plan.seq_len % CHUNK == 0 else positions < plan.seq_len
    if plan.grid_side is None:
        return pl.ds(chunk * CHUNK, CHUNK), mask
    side = plan.grid_side
    return (positions % side) * side + positions // side, mask


def _view(ref, index, columns=None):
    """ref's rows at `index`: a slice, or row numbers gathered (an array index for both axes: interpret mode cannot
    mix an array index with a slice); every column, or the `columns` slice."""
    if isinstance(index, pl.Slice):
        return ref.at[index, slice(None) if columns is None else columns]
    start, width = (0, ref.shape[-1]) if columns is None else (columns.start, columns.size)
    return ref.at[index[:, None], start + lax.broadcasted_iota(jnp.int32, (1, width), 1)]


def _load(ref, rows, dtype=jnp.float32):
    """The rows (`_chunk_rows`) of a [T, D] block as `dtype`; rows past the sequence end read as zero. Tiles that
    only feed matmuls are loaded as the matmul operand dtype: a float32 copy would only take registers."""
    index, mask = rows
    view = _view(ref, index)
    tile = view[...] if mask is None else plgpu.load(view, mask=mask[:, None], other=0)
    return tile.astype(dtype)


def _store(ref, rows, tile, columns=None):
    index, mask = rows
    view = _view(ref, index, columns)
    tile = tile.astype(ref.dtype)
    if mask is None:
        view[...] = tile
    else:
        plgpu.store(view, tile, mask=mask[:, None])


def _gates(g_ref, rows, plan):
    """(G [CHUNK, K], G_last [K]) of a chunk."""
    g = _load(g_ref, rows)
    return _masked_row_sums(_causal_mask(plan.reverse), g, exact_in_bf16=plan.bf16_gates), jnp.sum(g, axis=0)


# ----------------------------------------------------------------------------------------------------------------
# Kernels.


def _forward_kernel(q_ref, k_ref, v_ref, g_ref, *refs, plan):
    refs = list(refs)
    initial_ref = refs.pop(0) if plan.has_initial_state else None
    o_ref, final_ref, *refs = refs
    strength_ref = None if plan.guarded else refs.pop(0)
    states_ref = refs[0] if refs else None
    causal = _causal_mask(plan.reverse)

    def step_fn(step, carry):
        state, strength = carry
        chunk = _chunk_of_step(step, plan)
        rows = _chunk_rows(chunk, plan)
        if states_ref is not None:
            states_ref[step] = state.astype(states_ref.dtype)
        q, k = _load(q_ref, rows), _load(k_ref, rows)
        v = _load(v_ref, rows, plan.dot_dtype)
        gates, total = _gates(g_ref, rows, plan)
        _store(o_ref, rows, _chunk_output(q, k, v, gates, state, causal, plan))
        if strength_ref is not None:  # elementwise here, reduced once after the loop
            strength = jnp.maximum(strength, jnp.abs(gates))
        return _next_state(state, k, v, gates, total, plan.dot_dtype), strength

    state = (initial_ref[...].astype(jnp.float32) if plan.has_initial_state
             else jnp.zeros(final_ref.shape, jnp.float32))
    strength = jnp.zeros((CHUNK, q_ref.shape[-1]), jnp.float32)
    state, strength = lax.fori_loop(0, plan.num_chunks, step_fn, (state, strength))
    final_ref[...] = state
    if strength_ref is not None:
        strength_ref[...] = _gate_strength(strength)


def _state_grad_kernel(q_ref, g_ref, do_ref, d_final_ref, d_states_ref, *d_initial_ref, plan):
    def step_fn(reverse_step, d_state):
        step = plan.num_chunks - 1 - reverse_step
        chunk = _chunk_of_step(step, plan)
        rows = _chunk_rows(chunk, plan)
        d_states_ref[step] = d_state.astype(d_states_ref.dtype)
        q, do = _load(q_ref, rows), _load(do_ref, rows, plan.dot_dtype)
        gates, total = _gates(g_ref, rows, plan)
        from_outputs = plan.scale * _dot(q * _exp(gates), do, plan.dot_dtype, transpose_a=True)
        return _exp(total)[:, None] * d_state + from_outputs

    d_state = lax.fori_loop(0, plan.num_chunks, step_fn, d_final_ref[...].astype(jnp.float32))
    if d_initial_ref:
        d_initial_ref[0][...] = d_state


def _grad_targets(out_refs, key_dim, value_dim, head, plan):
    """(dq, dk, dv) as (ref, columns) for `_store`, and dg's ref: from four output refs, or with plan.grad_columns
    from one [T, C] block of a wide array and dg's, dq, dk and dv going to `head`'s columns of it."""
    if plan.grad_columns is None:
        dq_ref, dk_ref, dv_ref, dg_ref = out_refs
        return (dq_ref, None), (dk_ref, None), (dv_ref, None), dg_ref
    wide_ref, dg_ref = out_refs
    q_first, k_first, v_first = plan.grad_columns
    return ((wide_ref, pl.ds(q_first + head * key_dim, key_dim)), (wide_ref, pl.ds(k_first + head * key_dim, key_dim)),
            (wide_ref, pl.ds(v_first + head * value_dim, value_dim)), dg_ref)


def _chunk_grad_kernel(q_ref, k_ref, v_ref, g_ref, do_ref, states_ref, d_states_ref, *out_refs, plan, chunk=None,
                       head=None):
    # chunk (and head, when it matters) are given by the fix-up kernel, which loops over chunks.
    chunk = pl.program_id(2) if chunk is None else chunk
    head = pl.program_id(1) if head is None and plan.grad_columns is not None else head
    (dq_ref, dq_columns), (dk_ref, dk_columns), (dv_ref, dv_columns), dg_ref = _grad_targets(
        out_refs, q_ref.shape[-1], v_ref.shape[-1], head, plan)
    step = _chunk_of_step(chunk, plan)  # the map is its own inverse
    rows = _chunk_rows(chunk, plan)
    # Ordered so that tiles die early (fewer live registers): dv first, then dk, dq, dg.
    gates, total = _gates(g_ref, rows, plan)
    q, k = _load(q_ref, rows), _load(k_ref, rows)
    v, do = _load(v_ref, rows, plan.dot_dtype), _load(do_ref, rows, plan.dot_dtype)
    d_next_state = d_states_ref[step].astype(jnp.float32)
    dot = functools.partial(_dot, dot_dtype=plan.dot_dtype)

    # dL/dA: its diagonal (query row = key row, gate factor exactly 1) is applied directly below; the intra-chunk
    # paths see only the strictly causal part.
    d_scores = plan.scale * dot(do, v, transpose_b=True)
    eye = lax.broadcasted_iota(jnp.int32, d_scores.shape, 0) == lax.broadcasted_iota(jnp.int32, d_scores.shape, 1)
    d_diagonal = jnp.sum(jnp.where(eye, d_scores, 0.0), axis=1)[:, None]
    d_scores = jnp.where(_causal_mask(plan.reverse, strict=True), d_scores, 0.0)
    scores, dq_intra, dk_intra = _intra_chunk(q, k, gates, d_scores, _causal_mask(plan.reverse), plan.dot_dtype,
                                              plan.guarded)
    k_to_end = _exp(total[None, :] - gates)
    _store(dv_ref, rows, plan.scale * dot(scores, do, transpose_a=True) + dot(k * k_to_end, d_next_state),
           dv_columns)
    dk_to_next_state = k_to_end * dot(v, d_next_state, transpose_b=True)
    dk = dk_intra + dk_to_next_state + d_diagonal * q
    _store(dk_ref, rows, dk, dk_columns)
    state = states_ref[step].astype(jnp.float32)
    dq_open = plan.scale * _exp(gates) * dot(do, state, transpose_b=True) + dq_intra
    _store(dq_ref, rows, dq_open + d_diagonal * k, dq_columns)
    state_to_next = _exp(total) * jnp.sum(state * d_next_state, axis=1)
    _store(dg_ref, rows,
           _gate_grad(q * dq_open - k * dk_intra, k * dk_to_next_state, state_to_next, plan))


def _chunk_summary_kernel(x_ref, y_ref, g_ref, contributions_ref, totals_ref, *strength_ref, plan, to_end):
    """Chunk-parallel schedule: a chunk's share of a state recurrence, stored at its scan step: G_last, and the
    contribution (x e^(G_last - G))^T y (to_end: the forward's k and v, towards the state leaving the chunk) or
    scale (x e^G)^T y (the state gradient's q and dL/do, from the state entering it). Optionally its max |G|."""
    chunk = pl.program_id(2)
    step = _chunk_of_step(chunk, plan)
    rows = _chunk_rows(chunk, plan)
    gates, total = _gates(g_ref, rows, plan)
    x = _load(x_ref, rows)
    x = x * _exp(total[None, :] - gates) if to_end else plan.scale * x * _exp(gates)
    y = _load(y_ref, rows, plan.dot_dtype)
    contributions_ref[step] = _dot(x, y, plan.dot_dtype, transpose_a=True)
    totals_ref[step] = total
    if strength_ref:
        strength_ref[0][...] = _gate_strength(gates)


def _scan_kernel(totals_ref, contributions_ref, initial_ref, carries_ref, final_ref, *, plan, backwards):
    """Chunk-parallel schedule: carry = diag(e^G_last) carry + contribution over the scan steps (backwards: the
    last step first), on one block of state rows; writes the carry entering each step, and the last one."""

    def step_fn(i, carry):
        step = plan.num_chunks - 1 - i if backwards else i
        carries_ref[step] = carry.astype(carries_ref.dtype)
        return _exp(totals_ref[step])[:, None] * carry + contributions_ref[step]

    final_ref[...] = lax.fori_loop(0, plan.num_chunks, step_fn, initial_ref[...].astype(jnp.float32))


def _output_kernel(q_ref, k_ref, v_ref, g_ref, states_ref, o_ref, *, plan, chunk=None):
    """Chunk-parallel schedule: o of one chunk from the state entering it."""
    chunk = pl.program_id(2) if chunk is None else chunk  # given by the fix-up kernel, which loops over chunks
    rows = _chunk_rows(chunk, plan)
    q, k = _load(q_ref, rows), _load(k_ref, rows)
    v = _load(v_ref, rows, plan.dot_dtype)
    gates, _ = _gates(g_ref, rows, plan)
    state = states_ref[_chunk_of_step(chunk, plan)]
    _store(o_ref, rows, _chunk_output(q, k, v, gates, state, _causal_mask(plan.reverse), plan))


def _only_if_strong(kernel, num_outputs, repeats=1, index_name=None, with_head=False):
    """A fix-up kernel: runs `kernel` (a guarded one) `repeats` times where the sequence has a chunk beyond
    FACTORISED_GATE_LIMIT (strength ref, the first argument: the forward's max |G| of each V block of this (batch,
    head)), passing the repetition as keyword `index_name` if given, and does nothing otherwise. Its refs are the
    strength, kernel's inputs, the previous contents of its num_outputs outputs (aliased to them, so programs that do
    nothing keep the unguarded kernel's results), and the outputs. A loop, not an scf.if: see `_intra_chunk`.
    with_head: also pass head=program_id(1), read before the loop (interpret mode sees no program ids inside it)."""

    def fix_up(strength_ref, *refs, plan):
        inputs, outputs = refs[:-2 * num_outputs], refs[-num_outputs:]
        strong = jnp.max(strength_ref[...]) > FACTORISED_GATE_LIMIT
        head = {"head": pl.program_id(1)} if with_head else {}

        def run(index, carry):
            kernel(*inputs, *outputs, plan=plan, **head, **({index_name: index} if index_name else {}))
            return carry

        lax.fori_loop(0, strong.astype(jnp.int32) * repeats, run, 0)

    return fix_up


def _gate_grad(in_chunk_terms, to_next_state_terms, state_to_next, plan):
    """dL/dg of a chunk, summed so that no large terms cancel.

    dL/dg_t = sum over every (key s, query u) interaction that crosses t in scan order (s < t <= u). Grouped by
    where s and u sit: both in the chunk (the q*dq - k*dk of the intra-chunk terms, whose equal and opposite
    diagonal terms are left out: dq_open excludes them), s in the state entering the chunk (q*dq of that term),
    s in the chunk and u after it (exclusive prefix sum of k*dk towards the next state), and s before and u after
    the chunk (rowsum(e^G_last h * dL/dh_next)). Summing q*dq - k*dk over whole rows instead would subtract
    O(1) terms to get a small dg when gates are strong, and amplify rounding (bf16 states, TF32 dots) ~100x.

    in_chunk_terms: q*dq_open - k*dk_intra; to_next_state_terms: k*dk_to_next_state (both [CHUNK, K]);
    state_to_next: [K].
    """
    in_chunk = _masked_row_sums(_causal_mask(not plan.reverse), in_chunk_terms, exact_in_bf16=False)
    to_next_state = _masked_row_sums(_causal_mask(plan.reverse, strict=True), to_next_state_terms,
                                     exact_in_bf16=False)
    return in_chunk + to_next_state + state_to_next[None, :]


# ----------------------------------------------------------------------------------------------------------------
# pallas_call wrappers.


def _compiler_params(num_warps, num_stages):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _array(x):
    """What a pallas_call takes for sequence operand x: the array itself, or the wide array of `Columns`."""
    return x.array if isinstance(x, Columns) else x


def _rows_spec(x, width=None, *, blocked=False):
    """BlockSpec of one (batch, head)'s [T, width] rows of sequence operand x ([B, T, H, X] array or `Columns`) on
    grids (B, H, ...), width X by default; blocked: the grid's third index picks which width-wide block of the
    head's X columns."""
    seq_len, head_width = x.shape[1], x.shape[3]
    width = width or head_width
    part = (lambda rest: rest[0]) if blocked else (lambda rest: 0)  # noqa: E731
    if isinstance(x, Columns):
        first, per_head = x.first // width, head_width // width
        return pl.BlockSpec((None, seq_len, width), lambda b, h, *rest: (b, 0, first + h * per_head + part(rest)))
    return pl.BlockSpec((None, seq_len, None, width), lambda b, h, *rest: (b, 0, h, part(rest)))


def _state_specs(key_dim, seq_len, block):
    """BlockSpecs of the sequential kernels' (grid (B, H, V blocks)) [K, Vblk] state and [N, K, Vblk] per-chunk
    states."""
    return (pl.BlockSpec((None, None, key_dim, block), lambda b, h, j: (b, h, 0, j)),
            pl.BlockSpec((None, None, pl.cdiv(seq_len, CHUNK), key_dim, block), lambda b, h, j: (b, h, 0, 0, j)))


def _sequential_in_specs(q, k, v, g, plan):
    """The sequential kernels' specs of q, k, v (its V block) and g."""
    return [_rows_spec(q), _rows_spec(k), _rows_spec(v, plan.value_block, blocked=True), _rows_spec(g)]


def _strength_spec(value_blocks):
    """The forward's max |G| per (batch, head, V block), read whole per (batch, head) by the fix-up kernels."""
    return pl.BlockSpec((None, None, value_blocks), lambda b, h, *_: (b, h, 0))


def _forward_call(q, k, v, g, initial_state, plan, with_states):
    """Unguarded forward: (o, final_state, strength [B, H, V blocks] (max |G| seen), states if with_states)."""
    batch, seq_len, heads, key_dim = q.shape
    value_dim, block = v.shape[-1], plan.value_block
    grid = (batch, heads, value_dim // block)
    state_spec, states_spec = _state_specs(key_dim, seq_len, block)
    in_specs, inputs = _sequential_in_specs(q, k, v, g, plan), [_array(x) for x in (q, k, v, g)]
    if plan.has_initial_state:
        in_specs.append(state_spec)
        inputs.append(initial_state)
    o_like = jax.ShapeDtypeStruct(v.shape, v.dtype)
    out_shape = [o_like, jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), jnp.float32),
                 jax.ShapeDtypeStruct(grid, jnp.float32)]
    out_specs = [_rows_spec(o_like, block, blocked=True), state_spec,
                 pl.BlockSpec((None, None, None), lambda b, h, j: (b, h, j))]
    if with_states:
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, plan.num_chunks, key_dim, value_dim),
                                              plan.state_dtype))
        out_specs.append(states_spec)
    return pl.pallas_call(
        functools.partial(_forward_kernel, plan=plan), grid=grid, in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, interpret=plan.interpret, name="gla_forward",
        compiler_params=_compiler_params(plan.config.forward_warps, plan.config.forward_stages),
    )(*inputs)


def _fix_up_forward_call(strength, q, k, v, g, initial_state, o, final_state, plan):
    """o and final_state, recomputed by the guarded forward for the (batch, head) pairs whose strength
    [B, H, V blocks] (from `_forward_call`) exceeds FACTORISED_GATE_LIMIT."""
    batch, seq_len, heads, key_dim = q.shape
    block = plan.value_block
    state_spec, _ = _state_specs(key_dim, seq_len, block)
    in_specs = [_strength_spec(strength.shape[-1]), *_sequential_in_specs(q, k, v, g, plan)]
    inputs = [strength, *(_array(x) for x in (q, k, v, g))]
    if plan.has_initial_state:
        in_specs.append(state_spec)
        inputs.append(initial_state)
    aliased, o_spec = len(inputs), _rows_spec(o, block, blocked=True)
    return pl.pallas_call(
        functools.partial(_only_if_strong(_forward_kernel, 2), plan=dataclasses.replace(plan, guarded=True)),
        grid=(batch, heads, v.shape[-1] // block), in_specs=in_specs + [o_spec, state_spec],
        out_specs=[o_spec, state_spec],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (o, final_state)],
        input_output_aliases={aliased: 0, aliased + 1: 1}, interpret=plan.interpret, name="gla_forward_fix_up",
        compiler_params=_compiler_params(plan.config.forward_warps, plan.config.forward_stages),
    )(*inputs, o, final_state)


def _state_grad_call(q, g, do, d_final, plan):
    batch, seq_len, heads, key_dim = q.shape
    value_dim, block = do.shape[-1], plan.value_block
    state_spec, states_spec = _state_specs(key_dim, seq_len, block)
    out_shape = [jax.ShapeDtypeStruct((batch, heads, plan.num_chunks, key_dim, value_dim), plan.state_dtype)]
    out_specs = [states_spec]
    if plan.has_initial_state:
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), jnp.float32))
        out_specs.append(state_spec)
    return pl.pallas_call(
        functools.partial(_state_grad_kernel, plan=plan), grid=(batch, heads, value_dim // block),
        in_specs=[_rows_spec(q), _rows_spec(g), _rows_spec(do, block, blocked=True), state_spec],
        out_specs=out_specs, out_shape=out_shape, interpret=plan.interpret, name="gla_state_grad",
        compiler_params=_compiler_params(plan.config.state_grad_warps, plan.config.state_grad_stages),
    )(_array(q), g, do, d_final)


def _states_spec(plan, key_dim, value_dim):
    """BlockSpec of one (batch, head)'s [N, K, V] per-chunk states in the per-chunk kernels (grid (B, H, chunks),
    or (B, H) for their fix-ups)."""
    return pl.BlockSpec((None, None, plan.num_chunks, key_dim, value_dim), lambda b, h, *_: (b, h, 0, 0, 0))


def _skipping_inputs(kernel, num_inputs, num_skipped):
    """kernel called with the refs of `num_skipped` more inputs after its `num_inputs` own, which it ignores."""

    def wrapped(*refs, **kwargs):
        return kernel(*refs[:num_inputs], *refs[num_inputs + num_skipped:], **kwargs)

    return wrapped


def _per_chunk_call(kernel, name, inputs, in_specs, out_shape, out_specs, plan, compiler_params, fix_up=None,
                    into=()):
    """`kernel` (unguarded) over grid (B, H, chunks), one chunk per program, writing `out_shape`, its first outputs
    into the arrays `into` (aliased: what the kernel does not write keeps their contents); or, with fix_up =
    (strength, previous outputs), the guarded kernel for the flagged (batch, head) pairs, grid (B, H), each program
    walking its chunks (the others end at once)."""
    batch, _, heads, _ = inputs[0].shape
    grid, arrays = (batch, heads, plan.num_chunks), [_array(x) for x in inputs]
    if fix_up is not None:
        strength, previous = fix_up
        in_specs = [_strength_spec(strength.shape[-1])] + in_specs + out_specs
        aliases = {len(inputs) + 1 + i: i for i in range(len(previous))}
        arrays = [strength] + arrays + list(previous)
        kernel = _only_if_strong(kernel, len(previous), repeats=plan.num_chunks, index_name="chunk",
                                 with_head=plan.grad_columns is not None)
        grid, plan, name = (batch, heads), dataclasses.replace(plan, guarded=True), name + "_fix_up"
    else:
        aliases = {len(inputs) + i: i for i in range(len(into))}
        in_specs, arrays = in_specs + out_specs[:len(into)], arrays + list(into)
        kernel = _skipping_inputs(kernel, len(inputs), len(into)) if into else kernel
    return pl.pallas_call(
        functools.partial(kernel, plan=plan), grid=grid, in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, input_output_aliases=aliases, interpret=plan.interpret, name=name,
        compiler_params=compiler_params,
    )(*arrays)


def _chunk_grad_call(q, k, v, g, do, states, d_states, plan, fix_up=None, into=None):
    """(dq, dk, dv, dg) from the per-chunk states and their gradients (`_per_chunk_call`). With plan.grad_columns
    the first three go into the columns of one [B, T, C] array instead, `into` (aliased) or the previous one of
    fix_up: (that array, dg)."""
    key_dim, value_dim = q.shape[-1], v.shape[-1]
    states_spec = _states_spec(plan, key_dim, value_dim)
    in_specs = [*(_rows_spec(x) for x in (q, k, v, g, do)), states_spec, states_spec]
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v, g)]
    out_specs = [_rows_spec(x) for x in out_shape]
    if plan.grad_columns is not None:
        wide = into if fix_up is None else fix_up[1][0]
        out_shape = [jax.ShapeDtypeStruct(wide.shape, wide.dtype), out_shape[-1]]
        out_specs = [pl.BlockSpec((None, *wide.shape[1:]), lambda b, h, *_: (b, 0, 0)), out_specs[-1]]
    return _per_chunk_call(
        _chunk_grad_kernel, "gla_chunk_grad", [q, k, v, g, do, states, d_states], in_specs, out_shape, out_specs,
        plan, _compiler_params(plan.config.chunk_grad_warps, plan.config.chunk_grad_stages), fix_up,
        into=() if into is None else (into,))


def _output_call(q, k, v, g, states, plan, fix_up=None):
    """Chunk-parallel schedule: o from the per-chunk states (`_per_chunk_call`)."""
    key_dim, value_dim = q.shape[-1], v.shape[-1]
    o_like = jax.ShapeDtypeStruct(v.shape, v.dtype)
    (o,) = _per_chunk_call(
        _output_kernel, "gla_output", [q, k, v, g, states],
        [*(_rows_spec(x) for x in (q, k, v, g)), _states_spec(plan, key_dim, value_dim)],
        [o_like], [_rows_spec(o_like)], plan, _compiler_params(plan.config.forward_warps, 1), fix_up)
    return o


def _summary_call(x, y, g, plan, *, to_end, with_strength):
    """Chunk-parallel schedule: (contributions [B, H, N, K, V] float32, totals [B, H, N, K] float32, and with
    with_strength the max |G| of each (batch, head) [B, H, 1]), see `_chunk_summary_kernel`."""
    batch, _, heads, key_dim = x.shape
    value_dim, num_chunks = y.shape[-1], plan.num_chunks
    out_specs = [_states_spec(plan, key_dim, value_dim),
                 pl.BlockSpec((None, None, num_chunks, key_dim), lambda b, h, c: (b, h, 0, 0))]
    out_shape = [jax.ShapeDtypeStruct((batch, heads, num_chunks, key_dim, value_dim), jnp.float32),
                 jax.ShapeDtypeStruct((batch, heads, num_chunks, key_dim), jnp.float32)]
    if with_strength:
        out_specs.append(pl.BlockSpec((None, None, None), lambda b, h, c: (b, h, c)))
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, num_chunks), jnp.float32))
    contributions, totals, *strength = pl.pallas_call(
        functools.partial(_chunk_summary_kernel, plan=plan, to_end=to_end), grid=(batch, heads, num_chunks),
        in_specs=[_rows_spec(x), _rows_spec(y), _rows_spec(g)], out_specs=out_specs,
        out_shape=out_shape, interpret=plan.interpret, name="gla_chunk_summary",
        compiler_params=_compiler_params(_CHUNK_PARALLEL_WARPS, 1),
    )(_array(x), _array(y), g)
    # One strength per (batch, head) for the fix-up kernels, which read it whole (N is rarely a power of two).
    return contributions, totals, *(jnp.max(s, axis=-1, keepdims=True) for s in strength)


def _scan_call(totals, contributions, initial, plan, *, backwards):
    """Chunk-parallel schedule: (carries entering each scan step [B, H, N, K, V] in plan.state_dtype, last
    carry [B, H, K, V] float32), see `_scan_kernel`; grid (B, H, K / _SCAN_ROWS)."""
    batch, heads, num_chunks, key_dim, value_dim = contributions.shape
    steps_spec = pl.BlockSpec((None, None, num_chunks, _SCAN_ROWS, value_dim), lambda b, h, r: (b, h, 0, r, 0))
    state_spec = pl.BlockSpec((None, None, _SCAN_ROWS, value_dim), lambda b, h, r: (b, h, r, 0))
    return pl.pallas_call(
        functools.partial(_scan_kernel, plan=plan, backwards=backwards), grid=(batch, heads, key_dim // _SCAN_ROWS),
        in_specs=[pl.BlockSpec((None, None, num_chunks, _SCAN_ROWS), lambda b, h, r: (b, h, 0, r)), steps_spec,
                  state_spec],
        out_specs=[steps_spec, state_spec],
        out_shape=[jax.ShapeDtypeStruct(contributions.shape, plan.state_dtype),
                   jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), jnp.float32)],
        interpret=plan.interpret, name="gla_scan",
        compiler_params=_compiler_params(_CHUNK_PARALLEL_WARPS, _SCAN_STAGES),
    )(totals, contributions, initial)


# ----------------------------------------------------------------------------------------------------------------
# Differentiable op.


# The unguarded kernels are fast but only right for chunks with max |G| <= FACTORISED_GATE_LIMIT. Every call
# also launches the fix-up kernels, which redo the work with the guarded kernels for the (batch, head) pairs that
# have a stronger chunk and end at once for the others: no lax.cond, whose predicate would be copied to the host
# and stall the GPU stream on every call. The states and their gradients never involve the intra-chunk scores,
# so only o and the chunk gradients are redone.


def _forward(q, k, v, g, initial_state, plan, with_states):
    if plan.chunk_parallel:
        return _chunk_parallel_forward(q, k, v, g, initial_state, plan)
    o, final_state, strength, *states = _forward_call(q, k, v, g, initial_state, plan, with_states)
    o, final_state = _fix_up_forward_call(strength, q, k, v, g, initial_state, o, final_state, plan)
    return o, final_state, strength, states


def _chunk_parallel_forward(q, k, v, g, initial_state, plan):
    contributions, totals, strength = _summary_call(k, v, g, plan, to_end=True, with_strength=True)
    if initial_state is None:
        initial_state = jnp.zeros(contributions.shape[:2] + contributions.shape[3:], jnp.float32)
    states, final_state = _scan_call(totals, contributions, initial_state, plan, backwards=False)
    o = _output_call(q, k, v, g, states, plan)
    o = _output_call(q, k, v, g, states, plan, fix_up=(strength, (o,)))
    return o, final_state, strength, [states]


def _state_grads(q, g, do, d_final, plan):
    """(dL/d(state leaving each chunk) [B, H, N, K, V] in plan.state_dtype, dL/dinitial_state or None)."""
    if plan.chunk_parallel:
        contributions, totals = _summary_call(q, do, g, plan, to_end=False, with_strength=False)
        d_states, d_initial = _scan_call(totals, contributions, d_final, plan, backwards=True)
        return d_states, (d_initial if plan.has_initial_state else None)
    d_states, *d_initial = _state_grad_call(q, g, do, d_final, plan)  # d_initial only with an initial state
    return d_states, (d_initial[0] if d_initial else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _gla(q, k, v, g, initial_state, plan):
    o, final_state, _, _ = _forward(q, k, v, g, initial_state, plan, with_states=False)
    return o, final_state


def _forward_for_backward(q, k, v, g, initial_state, plan):
    """(o, final_state, kernel residuals): the forward with the per-chunk states and gate strengths that
    `_backward` reads, named CHECKPOINT_NAME for remat policies."""
    o, final_state, strength, (states,) = _forward(q, k, v, g, initial_state, plan, with_states=True)
    return o, final_state, tuple(checkpoint_name(x, CHECKPOINT_NAME) for x in (states, strength))


def _backward(q, k, v, g, kernel_residuals, do, d_final, plan, into=None):
    """((dq, dk, dv, dg), or with plan.grad_columns (into, dg): see `_chunk_grad_call`; dL/dinitial_state or None)."""
    states, strength = kernel_residuals
    do = do.astype(v.dtype)
    d_states, d_initial = _state_grads(q, g, do, d_final.astype(jnp.float32), plan)
    inputs = (q, k, v, g, do, states, d_states)
    grads = _chunk_grad_call(*inputs, plan, into=into)
    return tuple(_chunk_grad_call(*inputs, plan, fix_up=(strength, grads))), d_initial


def _gla_forward(q, k, v, g, initial_state, plan):
    o, final_state, kernel_residuals = _forward_for_backward(q, k, v, g, initial_state, plan)
    return (o, final_state), (q, k, v, g, kernel_residuals)


def _gla_backward(plan, residuals, cotangents):
    q, k, v, g, kernel_residuals = residuals
    grads, d_initial = _backward(q, k, v, g, kernel_residuals, *cotangents, plan)
    return *grads, d_initial


_gla.defvjp(_gla_forward, _gla_backward)


@functools.cache
def _multiprocessor_count() -> int | None:
    try:
        return getattr(jax.devices("gpu")[0], "core_count", None)
    except RuntimeError:  # no GPU backend (interpret mode)
        return None


def _forward_stages(num_programs: int) -> int:
    """Pipeline depth of the forward kernel. It also sets how many programs share an SM (shared memory is
    ~20 KB per stage): 3 stages fit three, 4 two, 6 one. With many programs per SM (short sequences) three at
    once hide latency best; with few (long sequences, small batch x heads), fewer and deeper programs are
    faster, as long as one program per SM does not leave a mostly idle last round: on an H100 at T=4096, 6
    stages took the forward from 1.54x to 1.46x its HBM floor for 2.9 programs per SM, and 4 stages from 1.54x
    to 1.36x for 4.4; for 1.1 programs per SM (XL, T=16384) 6 stages took 0.86 ms against 3 stages' 0.61 ms
    (docs/gla_kernels.md)."""
    multiprocessors = _multiprocessor_count()
    if multiprocessors is None:
        return 3
    per_multiprocessor = num_programs / multiprocessors
    if 1 <= per_multiprocessor <= 3 and math.ceil(per_multiprocessor) <= 1.1 * per_multiprocessor:
        return 6
    return 4 if 3 < per_multiprocessor <= 8 else 3


def _chunk_parallel_pays(num_programs: int, num_chunks: int) -> bool:
    """Whether the chunk-parallel schedule beats the sequential one for a grid of num_programs (batch, head,
    V block) walks of num_chunks chunks each: only when the walks leave most SMs idle and are long enough that
    their serial latency outweighs the schedule's extra kernels and HBM round trip of the chunk contributions.
    Measured on an H200 (132 SMs, docs/gla_kernels.md), forward + backward, sequential / chunk-parallel time:
    at T = 4096 (64 chunks) 2.63 for 6 programs, 2.05 for 12, 1.41 for 24, 0.99 for 48, 0.78 for 96; at
    T = 16384 2.69 / 1.74 / 1.27 / 0.99 for 6-48, 0.78 for 96; at T <= 1024 (<= 16 chunks) both take 0.07-0.15 ms,
    launch-bound, and chunk-parallel was the slower in 7 of 10 cases."""
    multiprocessors = _multiprocessor_count()
    if multiprocessors is None:
        return False
    return num_programs * _CHUNK_PARALLEL_MAX_SM_SHARE <= multiprocessors and num_chunks >= _CHUNK_PARALLEL_MIN_CHUNKS


def _is_dot_dim(n):
    return n >= _MIN_DOT_DIM and n & (n - 1) == 0


def _dot_dim(n):
    """The smallest power of two >= max(n, 16)."""
    return max(_MIN_DOT_DIM, 1 << (n - 1).bit_length())


def _with_dot_dims(q, k, v, g, initial_state, kernel):
    """kernel(...) on K and V zero-padded to powers of two >= 16, results cut back. Exact: padded key channels
    have k = q = 0 and g = 0, so their state rows stay zero and add nothing to o; padded value channels carry
    v = 0 and are cut from o and the final state (the caller's scale already uses the true K)."""
    key_dim, value_dim = q.shape[-1], v.shape[-1]
    key_pad, value_pad = _dot_dim(key_dim) - key_dim, _dot_dim(value_dim) - value_dim
    last = lambda x, pad: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])  # noqa: E731
    if initial_state is not None:
        initial_state = jnp.pad(initial_state, ((0, 0), (0, 0), (0, key_pad), (0, value_pad)))
    o, final_state = kernel(last(q, key_pad), last(k, key_pad), last(v, value_pad), last(g, key_pad),
                            initial_state=initial_state)
    return o[..., :value_dim], final_state[:, :, :key_dim, :value_dim]


def _make_plan(q, v, g, *, scale, reverse, column_major, has_initial_state, interpret, config):
    """The static description of one call on q [B, T, H, K], v [B, T, H, V] (arrays or `Columns`) and g; K and V
    powers of two >= 16."""
    batch, seq_len, heads, _ = q.shape
    value_dim = v.shape[-1]
    config = config or DEFAULT_CONFIG
    value_block = config.value_block or value_dim
    if not (_is_dot_dim(value_block) and value_dim % value_block == 0):
        raise ValueError(f"config.value_block must be a power of two >= {_MIN_DOT_DIM} dividing V={value_dim}, "
                         f"got {value_block}")
    num_programs = batch * heads * (value_dim // value_block)
    if config.forward_stages is None:
        config = dataclasses.replace(config, forward_stages=_forward_stages(num_programs))
    if config.chunk_parallel is None:
        config = dataclasses.replace(
            config, chunk_parallel=_chunk_parallel_pays(num_programs, pl.cdiv(seq_len, CHUNK)))
    sixteen_bit = q.dtype in (jnp.bfloat16, jnp.float16)
    return _Plan(
        seq_len=seq_len, scale=float(scale), reverse=bool(reverse), has_initial_state=has_initial_state,
        grid_side=grid_side(seq_len) if column_major else None,
        value_block=value_block,
        # bf16 keeps float32's exponent range, which the factorised scores need; f16 would overflow at e^11.
        dot_dtype=jnp.dtype(jnp.bfloat16) if q.dtype == jnp.bfloat16 else jnp.dtype(jnp.float32),
        state_dtype=jnp.dtype(jnp.bfloat16) if sixteen_bit else jnp.dtype(jnp.float32),
        bf16_gates=g.dtype == jnp.bfloat16, guarded=False, chunk_parallel=config.chunk_parallel,
        config=config, interpret=bool(interpret))


def gla_triton(q, k, v, g, *, scale, initial_state, reverse, column_major=False, interpret=False, config=None):
    """Chunked GLA, forward and backward as Pallas Triton kernels.

    Args:
      q, k, g: [B, T, H, K]; v: [B, T, H, V]; q, k, v one float dtype (bf16 or f32), g any float dtype.
        K and V other than powers of two >= 16 (Triton dot tiles) are zero-padded to the next one.
      scale: multiplies q.
      initial_state: [B, H, K, V] float32 or None (zeros).
      reverse: scan from token T-1 down to token 0.
      column_major: the T = S * S tokens (raster order) are a square grid scanned column by column (`token_grid`):
        the kernels read and write its rows in that order, so the arrays stay in raster order, o included.
      interpret: run the kernels in Pallas interpret mode (any backend, slow).
      config: `TritonConfig` launch parameters; None uses DEFAULT_CONFIG.

    Returns:
      (o [B, T, H, V] in v's dtype, final_state [B, H, K, V] float32). Differentiable w.r.t. q, k, v, g and
      initial_state, with cotangents for both outputs.
    """
    key_dim, value_dim = q.shape[-1], v.shape[-1]
    if not (_is_dot_dim(key_dim) and _is_dot_dim(value_dim)):
        return _with_dot_dims(q, k, v, g, initial_state, functools.partial(
            gla_triton, scale=scale, reverse=reverse, column_major=column_major, interpret=interpret, config=config))
    plan = _make_plan(q, v, g, scale=scale, reverse=reverse, column_major=column_major,
                      has_initial_state=initial_state is not None, interpret=interpret, config=config)
    if initial_state is not None:
        initial_state = initial_state.astype(jnp.float32)
    return _gla(q, k, v, g, initial_state, plan)


def packs(key_dim: int, value_dim: int, firsts: tuple[int, int, int]) -> bool:
    """Whether `packed_forward` and `packed_backward` take heads of K and V channels whose q, k and v start at
    columns `firsts` of their wide array."""
    q_first, k_first, v_first = firsts
    return (_is_dot_dim(key_dim) and _is_dot_dim(value_dim) and q_first % key_dim == 0 and k_first % key_dim == 0
            and v_first % value_dim == 0)


def _packed_plan(q, v, g, **options):
    return _make_plan(q, v, g, has_initial_state=False, config=None, **options)


def packed_forward(q, k, v, g, *, scale, reverse, column_major=False, interpret=False):
    """The forward kernels reading q, k and v where they lie in one wide array (`Columns`; no initial state):
    (o [B, T, H, V] in v's dtype, residuals for `packed_backward`). Shapes as `packs` says. Not differentiable
    itself: the caller's custom VJP calls `packed_backward`."""
    plan = _packed_plan(q, v, g, scale=scale, reverse=reverse, column_major=column_major, interpret=interpret)
    o, _, kernel_residuals = _forward_for_backward(q, k, v, g, None, plan)
    return o, kernel_residuals


def packed_backward(q, k, v, g, residuals, do, into, *, scale, reverse, column_major=False, interpret=False):
    """The gradients of `packed_forward` for a cotangent do of o: dq, dk and dv written into the columns of `into`
    [B, T, C] that q, k and v occupy in theirs (aliased: its other columns are kept), and dg [B, T, H, K]:
    (into, dg)."""
    plan = dataclasses.replace(
        _packed_plan(q, v, g, scale=scale, reverse=reverse, column_major=column_major, interpret=interpret),
        grad_columns=(q.first, k.first, v.first))
    batch, _, heads, key_dim = q.shape
    d_final = jnp.zeros((batch, heads, key_dim, v.shape[-1]), jnp.float32)  # the final state is not an output
    grads, _ = _backward(q, k, v, g, residuals, do, d_final, plan, into=into)
    return grads
