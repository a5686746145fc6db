"""Chunked GLA as Mosaic TPU Pallas kernels: a forward kernel and hand-written backward kernels (`jax.custom_vjp`).

Entry point: `gla_tpu(q, k, v, g, *, scale, initial_state, reverse, interpret=False)`, the same algorithm and
semantics as `gla_xla` (chunks of CHUNK=64 tokens, sub-chunks of SUB_CHUNK=16, float32 gates, states and
accumulation, every exponent a difference G_later - G_earlier <= 0). Keys of a query's own sub-chunk are taken
element-wise, one scan offset at a time (a sublane roll); earlier sub-chunks go through matmuls relative to the gate
at the query sub-chunk's first scanned row.

Tiling: heads packed into lanes, no padding
-------------------------------------------
q, k, g [B, T, H, K] and v, o [B, T, H, V] are viewed (free, contiguous reshapes) as [B, T, H*K] and [B, T, H*V].
A grid step reads one chunk of a group of heads: a [64, heads*K] tile, contiguous in HBM. Mosaic wants the last
two block dims to be multiples of (8, 128) or the full array dims, so a single dk=32 / dv=64 head (32 / 64 lanes)
cannot be a block, and would leave 3/4 of every vector register empty anyway.

The kernels therefore pack heads: a *lane group* is the smallest number of adjacent heads whose q/k/g and v
lanes are both multiples of 128 (4 heads for K=32, V=64: 128 and 256 lanes). Per-head products are done on the
packed tile with block-diagonal 0/1 matrices built in-kernel from iota:
  * head-sum matrices [heads*K, heads*V] / [heads*V, heads*K] turn an element-wise product on key (value) lanes
    into its per-head sum, broadcast over that head's value (key) lanes;
  * the running state of a lane group is one block-diagonal [heads*K, heads*V] float32 matrix in VMEM scratch
    (off-diagonal blocks stay exactly zero), so q @ state is a single matmul for all heads of the group;
  * intra-chunk scores use keys stacked per head, [heads*64, heads*K], each copy masked to one head's lanes.
Padding each head to 128 lanes was rejected: it costs an extra HBM copy of every input and output and 4x (K) /
2x (V) more vector work and VMEM. Packing costs MXU work instead (contractions run over the whole group's lanes,
and per-head sums become matmuls with 0/1 matrices), which a 128-deep MXU would largely spend on a 32-deep
single-head contraction anyway.

Grid blocks: if H is a multiple of the lane-group size, a grid step handles one lane group; otherwise (DiG-S has
H=6, DiG-XL H=18) a step handles all H heads (a block equal to the full lane dim, which is always legal) and
loops over lane groups inside, each starting at a 128-aligned lane, the last one smaller.
States cross HBM "stacked" as [B, H*K, V] (a free reshape of [B, H, K, V]) in blocks of (heads*K, V): V is the full
last dim, so these blocks are legal too, and no bytes are spent on the zero off-diagonal blocks.

Grid, order and padding
-----------------------
Grid (B, head blocks, chunks) with dimension semantics ("parallel", "parallel", "arbitrary"): the running state
lives in VMEM scratch and is carried along the sequential chunk axis. reverse=True reads chunk n-1-c at step c
through the index maps (no flipped copies); inside a chunk every "earlier / later" is by scan position, so the
cumsum matrix is upper instead of lower triangular, a query sub-chunk's reference gate is its last memory row, and
so on. In-chunk cumsums are triangular matmuls (Mosaic has no cumsum). T is zero-padded at the end to a multiple of
64: in forward order the padding comes after the last token and, with g = 0 and k = v = 0, leaves the state
alone; in reverse order it is scanned first and leaves the initial state alone. Padded outputs are sliced off.

Backward
--------
A first kernel recomputes the state entering every chunk, [B, T/64, H*K, V] float32 (no per-token states; for
V = 64 this is as large as k). A second kernel walks the chunks in reverse scan order with dL/dstate in VMEM
scratch and writes dq, dk, dv, dg and dL/dinitial_state. Per chunk, with G the in-chunk cumsum and h' the state
leaving the chunk, dg = (reverse in-chunk cumsum of q*dq - k*dk, a triangular matmul) + rowsum(h' * dh'), the
second term being the whole effect of later chunks; there is no whole-sequence running sum.

All matmuls run in float32 with Precision.HIGHEST (exact 0/1 selections, fla-level accuracy for bf16 inputs too);
bf16 MXU operands would be faster but have not been measured on a TPU.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

CHUNK = 64
SUB_CHUNK = 16
_SUBS_PER_CHUNK = CHUNK // SUB_CHUNK
_LANES = 128
_F32 = jnp.float32
_DIMENSION_SEMANTICS = ("parallel", "parallel", "arbitrary")


# ---------------------------------------------------------------------------------------------------------------
# Tiling plan (static)


@dataclasses.dataclass(frozen=True)
class _LaneGroup:
    """Heads [first, first + heads) of a grid block, side by side in the lanes of its tiles."""

    first: int
    heads: int
    key_dim: int
    value_dim: int

    @property
    def key_lanes(self) -> slice:
        """Lanes of the group in a [.., heads_per_block*K] tile; also its rows of a stacked [.., K, V] state."""
        return slice(self.first * self.key_dim, (self.first + self.heads) * self.key_dim)

    @property
    def value_lanes(self) -> slice:
        return slice(self.first * self.value_dim, (self.first + self.heads) * self.value_dim)

    @property
    def state_shape(self) -> tuple[int, int]:
        """Block-diagonal state of the group: [heads*K, heads*V]."""
        return self.heads * self.key_dim, self.heads * self.value_dim


@dataclasses.dataclass(frozen=True)
class _Tiling:
    heads_per_block: int
    lane_groups: tuple[_LaneGroup, ...]


def _plan_tiling(heads: int, key_dim: int, value_dim: int) -> _Tiling:
    group_size = math.lcm(_LANES // math.gcd(key_dim, _LANES), _LANES // math.gcd(value_dim, _LANES))
    heads_per_block = group_size if heads % group_size == 0 else heads
    groups = tuple(_LaneGroup(first, min(group_size, heads_per_block - first), key_dim, value_dim)
                   for first in range(0, heads_per_block, group_size))
    return _Tiling(heads_per_block, groups)


# ---------------------------------------------------------------------------------------------------------------
# In-kernel building blocks. Tiles of one lane group: q, k, g [CHUNK, heads*K]; v, do [CHUNK, heads*V].


def _dot(a, b, contracting=((1,), (0,))):
    return lax.dot_general(a, b, (contracting, ((), ())), precision=lax.Precision.HIGHEST,
                           preferred_element_type=_F32)


def _dot_nt(a, b):
    """a @ b.T"""
    return _dot(a, b, ((1,), (1,)))


def _dot_tn(a, b):
    """a.T @ b"""
    return _dot(a, b, ((0,), (0,)))


def _iota(shape, axis):
    return lax.broadcasted_iota(jnp.int32, shape, axis)


def _scan_position(shape, axis, reverse):
    """Scan position (0 = scanned first) of each row of a chunk, broadcast to `shape` along `axis`."""
    row = _iota(shape, axis)
    return CHUNK - 1 - row if reverse else row


def _row(x, index):
    """Row `index` of x as a [1, n] array (a masked sublane sum: no unaligned slicing)."""
    return jnp.sum(jnp.where(_iota(x.shape, 0) == index, x, 0.0), axis=0, keepdims=True)


def _scan_earlier(x, steps, reverse):
    """y[t] = x[token scanned `steps` (1..CHUNK-1, may be traced) steps before t]; rows wrap, callers mask them."""
    return pltpu.roll(x, CHUNK - steps if reverse else steps, 0)


def _scan_later(x, steps, reverse):
    """Inverse of `_scan_earlier`."""
    return pltpu.roll(x, steps if reverse else CHUNK - steps, 0)


def _query_sub_chunks(reverse):
    """(memory rows, reference row, scan start) of each query sub-chunk that has earlier sub-chunks to attend to.

    The reference row is the sub-chunk's first row in scan order; keys with scan position < scan start precede it.
    """
    for index in range(1, _SUBS_PER_CHUNK):
        start = SUB_CHUNK * (_SUBS_PER_CHUNK - 1 - index) if reverse else SUB_CHUNK * index
        reference = start + SUB_CHUNK - 1 if reverse else start
        yield slice(start, start + SUB_CHUNK), reference, SUB_CHUNK * index


def _in_memory_order(sub_chunk_rows, reverse, width):
    """Concatenates per-query-sub-chunk rows (in `_query_sub_chunks` order) into a [CHUNK, width] tile."""
    pieces = [jnp.zeros((SUB_CHUNK, width), _F32), *sub_chunk_rows]
    return jnp.concatenate(pieces[::-1] if reverse else pieces, axis=0)


class _Heads:
    """0/1 matrices and masks that do per-head work on the packed tiles of one lane group."""

    def __init__(self, group: _LaneGroup):
        self.group = group
        self.heads, self.key_dim, self.value_dim = group.heads, group.key_dim, group.value_dim
        self.value_width = group.state_shape[1]

    def _head_of(self, index, per_head):
        head = jnp.zeros(index.shape, jnp.int32)
        for h in range(1, self.heads):
            head = head + jnp.where(index >= h * per_head, 1, 0)
        return head

    def _same_head(self, rows_per_head, cols_per_head):
        shape = (self.heads * rows_per_head, self.heads * cols_per_head)
        same = self._head_of(_iota(shape, 0), rows_per_head) == self._head_of(_iota(shape, 1), cols_per_head)
        return same.astype(_F32)

    def key_to_value(self):
        """[heads*K, heads*V]: x @ it sums x over each head's key lanes onto that head's value lanes.

        Also the block-diagonal mask of a lane group's state.
        """
        return self._same_head(self.key_dim, self.value_dim)

    def value_to_key(self):
        """[heads*V, heads*K]: x @ it sums x over each head's value lanes onto that head's key lanes."""
        return self._same_head(self.value_dim, self.key_dim)

    def _tile_rows(self):
        """[V, heads*V] with ones at (j, h*V + j): copies a [.., V] block to every head's value lanes."""
        shape = (self.value_dim, self.value_width)
        col = _iota(shape, 1)
        return (col - self.value_dim * self._head_of(col, self.value_dim) == _iota(shape, 0)).astype(_F32)

    def expand_state(self, stacked):
        """Stacked per-head states [heads*K, V] -> block-diagonal [heads*K, heads*V]."""
        return self.key_to_value() * _dot(stacked, self._tile_rows())

    def compress_state(self, block_diagonal):
        """Inverse of `expand_state` (the off-diagonal blocks are zero, so summing the heads' lanes is exact)."""
        return _dot_nt(block_diagonal, self._tile_rows())

    def stack_per_head(self, x, per_head):
        """[CHUNK, heads*per_head] -> [heads*CHUNK, heads*per_head]: copy h keeps only head h's lanes."""
        lane_head = self._head_of(_iota(x.shape, 1), per_head)
        return jnp.concatenate([jnp.where(lane_head == h, x, 0.0) for h in range(self.heads)], axis=0)

    def unstack_per_head(self, stacked, per_head):
        """Inverse of `stack_per_head` for a [heads*CHUNK, heads*per_head] gradient: sums head h's lanes of copy h."""
        shape = (CHUNK, stacked.shape[1])
        lane_head = self._head_of(_iota(shape, 1), per_head)
        return sum(jnp.where(lane_head == h, stacked[h * CHUNK:(h + 1) * CHUNK], 0.0) for h in range(self.heads))


@dataclasses.dataclass(frozen=True)
class _Gates:
    """Gate factors of one chunk, all with exponents <= 0."""

    cumulative: jax.Array  # G, inclusive cumsum of g in scan order, [CHUNK, heads*K]
    from_start: jax.Array  # exp(G)
    to_end: jax.Array  # exp(G_last - G)
    state_decay: jax.Array  # exp(G_last) on the rows of a [heads*K, heads*V] state

    @classmethod
    def of(cls, g, value_width, reverse):
        shape = (CHUNK, CHUNK)
        earlier_or_same = _scan_position(shape, 1, reverse) <= _scan_position(shape, 0, reverse)
        cumulative = _dot(earlier_or_same.astype(_F32), g)
        last = _row(cumulative, 0 if reverse else CHUNK - 1)
        chunk_total = _dot_tn(g, jnp.ones((CHUNK, value_width), _F32))
        return cls(cumulative, jnp.exp(cumulative), jnp.exp(last - cumulative), jnp.exp(chunk_total))


def _diagonal_weight(cumulative, steps, reverse):
    """exp(G_t - G_s) for the key s scanned `steps` (>= 1) before query t in t's sub-chunk, else 0."""
    same_sub_chunk = jnp.bitwise_and(_scan_position(cumulative.shape, 0, reverse), SUB_CHUNK - 1) >= steps
    exponent = cumulative - _scan_earlier(cumulative, steps, reverse)
    return jnp.exp(jnp.where(same_sub_chunk, exponent, -jnp.inf))


def _key_factor(cumulative, reference, scan_start, reverse):
    """exp(G_ref - G_s) for keys s before scan position `scan_start`, else 0: [CHUNK, heads*K]."""
    before = _scan_position(cumulative.shape, 0, reverse) < scan_start
    return jnp.exp(jnp.where(before, _row(cumulative, reference) - cumulative, -jnp.inf))


def _intra_chunk_output(q, k, v, cumulative, heads, reverse):
    """sum over keys s scanned no later than query t in the chunk of A[t, s] v_s, per head: [CHUNK, heads*V]."""
    key_to_value = heads.key_to_value()

    # Keys in the query's own sub-chunk, element-wise, one scan offset at a time (offset 0: the token itself).
    def add_offset(steps, out):
        weight = _diagonal_weight(cumulative, steps, reverse)
        scores = _dot(q * _scan_earlier(k, steps, reverse) * weight, key_to_value)
        return out + scores * _scan_earlier(v, steps, reverse)

    out = lax.fori_loop(1, SUB_CHUNK, add_offset, _dot(q * k, key_to_value) * v)

    values = heads.stack_per_head(v, heads.value_dim)
    earlier_sub_chunks = []
    for rows, reference, scan_start in _query_sub_chunks(reverse):
        queries = q[rows] * jnp.exp(cumulative[rows] - _row(cumulative, reference))
        keys = heads.stack_per_head(k * _key_factor(cumulative, reference, scan_start, reverse), heads.key_dim)
        earlier_sub_chunks.append(_dot(_dot_nt(queries, keys), values))
    return out + _in_memory_order(earlier_sub_chunks, reverse, v.shape[1])


def _intra_chunk_gradients(q, k, v, do, cumulative, heads, reverse):
    """Gradients of `_intra_chunk_output` w.r.t. q, k, v (G held fixed)."""
    key_to_value, value_to_key = heads.key_to_value(), heads.value_to_key()

    def add_offset(steps, grads):
        dq, dk, dv = grads
        weight = _diagonal_weight(cumulative, steps, reverse)
        weighted_key = _scan_earlier(k, steps, reverse) * weight
        scores = _dot(q * weighted_key, key_to_value)
        d_scores = _dot(do * _scan_earlier(v, steps, reverse), value_to_key)
        return (dq + d_scores * weighted_key,
                dk + _scan_later(d_scores * q * weight, steps, reverse),
                dv + _scan_later(scores * do, steps, reverse))

    scores, d_scores = _dot(q * k, key_to_value), _dot(do * v, value_to_key)
    dq, dk, dv = lax.fori_loop(1, SUB_CHUNK, add_offset, (d_scores * k, d_scores * q, scores * do))

    values = heads.stack_per_head(v, heads.value_dim)
    dq_earlier = []
    for rows, reference, scan_start in _query_sub_chunks(reverse):
        query_factor = jnp.exp(cumulative[rows] - _row(cumulative, reference))
        key_factor = _key_factor(cumulative, reference, scan_start, reverse)
        queries = q[rows] * query_factor
        keys = heads.stack_per_head(k * key_factor, heads.key_dim)
        scores = _dot_nt(queries, keys)
        d_scores = _dot_nt(do[rows], values)
        dq_earlier.append(_dot(d_scores, keys) * query_factor)
        dk = dk + heads.unstack_per_head(_dot_tn(d_scores, queries), heads.key_dim) * key_factor
        dv = dv + heads.unstack_per_head(_dot_tn(scores, do[rows]), heads.value_dim)
    return dq + _in_memory_order(dq_earlier, reverse, q.shape[1]), dk, dv


def _next_state(k, v, gates, state, heads):
    """State leaving the chunk: diag(exp G_last) state + (k * exp(G_last - G))^T v, block-diagonal."""
    return gates.state_decay * state + heads.key_to_value() * _dot_tn(k * gates.to_end, v)


def _chunk_forward(q, k, v, g, state, heads, reverse):
    """One chunk of one lane group: q (already scaled), state block-diagonal. Returns (o, next state)."""
    gates = _Gates.of(g, heads.value_width, reverse)
    out = _intra_chunk_output(q, k, v, gates.cumulative, heads, reverse) + _dot(q * gates.from_start, state)
    return out, _next_state(k, v, gates, state, heads)


def _chunk_backward(q, k, v, g, do, state, d_next_state, heads, reverse):
    """Gradients of one chunk given dL/d(state leaving it). Returns (dq, dk, dv, dg, dL/d(state entering it)).

    q is already scaled and dq is w.r.t. the scaled q.
    """
    gates = _Gates.of(g, heads.value_width, reverse)
    dq, dk, dv = _intra_chunk_gradients(q, k, v, do, gates.cumulative, heads, reverse)
    dq = dq + gates.from_start * _dot_nt(do, state)
    dk = dk + gates.to_end * _dot_nt(v, d_next_state)
    dv = dv + _dot(k * gates.to_end, d_next_state)
    d_state = gates.state_decay * d_next_state + heads.key_to_value() * _dot_tn(q * gates.from_start, do)
    # dL/dG_t = q_t*dq_t - k_t*dk_t, and G_last also scales the state leaving the chunk: rowsum(h' * dh'). g_s
    # feeds every G_t scanned at or after s, G_last included, hence a reverse in-chunk cumsum plus that rowsum.
    next_state = _next_state(k, v, gates, state, heads)
    shape = (CHUNK, CHUNK)
    later_or_same = _scan_position(shape, 1, reverse) >= _scan_position(shape, 0, reverse)
    dg = (_dot(later_or_same.astype(_F32), q * dq - k * dk)
          + _dot_nt(jnp.ones((CHUNK, heads.value_width), _F32), next_state * d_next_state))
    return dq, dk, dv, dg, d_state


# ---------------------------------------------------------------------------------------------------------------
# Kernels. Grid (batch, head block, step); every kernel loops over the lane groups of its head block.


def _load(ref, lanes, scale=1.0):
    x = ref[:, lanes].astype(_F32)
    return x * scale if scale != 1.0 else x


def _start_carry(carry_ref, stacked_ref, heads):
    """At the first step, loads a lane group's stacked [heads*K, V] states into its block-diagonal carry."""
    @pl.when(pl.program_id(2) == 0)
    def _():
        carry_ref[...] = heads.expand_state(stacked_ref[heads.group.key_lanes, :])


def _finish_carry(carry_ref, stacked_ref, heads):
    """At the last step, writes a lane group's carry back as stacked [heads*K, V] states."""
    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
        stacked_ref[heads.group.key_lanes, :] = heads.compress_state(carry_ref[...])


def _forward_kernel(q_ref, k_ref, v_ref, g_ref, h0_ref, o_ref, final_ref, *state_refs, tiling, scale, reverse):
    for group, state_ref in zip(tiling.lane_groups, state_refs, strict=True):
        heads = _Heads(group)
        keys, values = group.key_lanes, group.value_lanes
        _start_carry(state_ref, h0_ref, heads)
        out, state_ref[...] = _chunk_forward(
            _load(q_ref, keys, scale), _load(k_ref, keys), _load(v_ref, values), _load(g_ref, keys), state_ref[...],
            heads, reverse)
        o_ref[:, values] = out.astype(o_ref.dtype)
        _finish_carry(state_ref, final_ref, heads)


def _chunk_states_kernel(k_ref, v_ref, g_ref, h0_ref, states_ref, *state_refs, tiling, reverse):
    for group, state_ref in zip(tiling.lane_groups, state_refs, strict=True):
        heads = _Heads(group)
        keys = group.key_lanes
        _start_carry(state_ref, h0_ref, heads)
        state = state_ref[...]
        states_ref[keys, :] = heads.compress_state(state)
        gates = _Gates.of(_load(g_ref, keys), heads.value_width, reverse)
        state_ref[...] = _next_state(_load(k_ref, keys), _load(v_ref, group.value_lanes), gates, state, heads)


def _backward_kernel(q_ref, k_ref, v_ref, g_ref, do_ref, states_ref, d_final_ref,
                     dq_ref, dk_ref, dv_ref, dg_ref, d_h0_ref, *d_state_refs, tiling, scale, reverse):
    for group, d_state_ref in zip(tiling.lane_groups, d_state_refs, strict=True):
        heads = _Heads(group)
        keys, values = group.key_lanes, group.value_lanes
        _start_carry(d_state_ref, d_final_ref, heads)
        dq, dk, dv, dg, d_state_ref[...] = _chunk_backward(
            _load(q_ref, keys, scale), _load(k_ref, keys), _load(v_ref, values), _load(g_ref, keys),
            _load(do_ref, values), heads.expand_state(states_ref[keys, :]), d_state_ref[...], heads, reverse)
        dq_ref[:, keys] = (dq * scale).astype(dq_ref.dtype)
        dk_ref[:, keys] = dk.astype(dk_ref.dtype)
        dv_ref[:, values] = dv.astype(dv_ref.dtype)
        dg_ref[:, keys] = dg.astype(dg_ref.dtype)
        _finish_carry(d_state_ref, d_h0_ref, heads)


# ---------------------------------------------------------------------------------------------------------------
# pallas_call wrappers on the kernel layout: tokens [B, T_padded, H*D], states [B, H*K, V].


@dataclasses.dataclass(frozen=True)
class _Problem:
    batch: int
    chunks: int
    heads: int
    key_dim: int
    value_dim: int
    tiling: _Tiling

    @classmethod
    def of(cls, q, v):
        batch, seq_len, heads, key_dim = q.shape
        value_dim = v.shape[-1]
        return cls(batch, pl.cdiv(seq_len, CHUNK), heads, key_dim, value_dim,
                   _plan_tiling(heads, key_dim, value_dim))

    @property
    def grid(self):
        return self.batch, self.heads // self.tiling.heads_per_block, self.chunks

    def _chunk_at(self, backward, reverse):
        """Maps a grid step to the chunk it reads: scan order, reversed for the backward pass."""
        if backward != reverse:
            return lambda step: self.chunks - 1 - step
        return lambda step: step

    def token_spec(self, dim, *, backward, reverse):
        chunk_at = self._chunk_at(backward, reverse)
        return pl.BlockSpec((None, CHUNK, self.tiling.heads_per_block * dim),
                            lambda b, h, step: (b, chunk_at(step), h))

    def state_spec(self):
        return pl.BlockSpec((None, self.tiling.heads_per_block * self.key_dim, self.value_dim),
                            lambda b, h, step: (b, h, 0))

    def chunk_state_spec(self, *, backward, reverse):
        chunk_at = self._chunk_at(backward, reverse)
        return pl.BlockSpec((None, None, self.tiling.heads_per_block * self.key_dim, self.value_dim),
                            lambda b, h, step: (b, chunk_at(step), h, 0))

    def tokens(self, dim, dtype):
        return jax.ShapeDtypeStruct((self.batch, self.chunks * CHUNK, self.heads * dim), dtype)

    def states(self):
        return jax.ShapeDtypeStruct((self.batch, self.heads * self.key_dim, self.value_dim), _F32)

    def state_scratch(self):
        return [pltpu.VMEM(group.state_shape, _F32) for group in self.tiling.lane_groups]

    def call(self, kernel, name, in_specs, out_specs, out_shape, interpret):
        return pl.pallas_call(
            kernel, out_shape=out_shape, grid=self.grid, in_specs=in_specs, out_specs=out_specs,
            scratch_shapes=self.state_scratch(), interpret=interpret, name=name,
            compiler_params=pltpu.CompilerParams(dimension_semantics=_DIMENSION_SEMANTICS))


def _run_forward(problem, q, k, v, g, h0, *, scale, reverse, interpret):
    """Kernel layout in, (o [B, T_padded, H*V], final state [B, H*K, V]) out."""
    kernel = functools.partial(_forward_kernel, tiling=problem.tiling, scale=scale, reverse=reverse)
    key_spec = problem.token_spec(problem.key_dim, backward=False, reverse=reverse)
    value_spec = problem.token_spec(problem.value_dim, backward=False, reverse=reverse)
    return problem.call(
        kernel, "gla_tpu_forward",
        in_specs=[key_spec, key_spec, value_spec, key_spec, problem.state_spec()],
        out_specs=[value_spec, problem.state_spec()],
        out_shape=[problem.tokens(problem.value_dim, v.dtype), problem.states()],
        interpret=interpret)(q, k, v, g, h0)


def _run_chunk_states(problem, k, v, g, h0, *, reverse, interpret):
    """State entering every chunk (memory order): [B, chunks, H*K, V] float32."""
    kernel = functools.partial(_chunk_states_kernel, tiling=problem.tiling, reverse=reverse)
    key_spec = problem.token_spec(problem.key_dim, backward=False, reverse=reverse)
    value_spec = problem.token_spec(problem.value_dim, backward=False, reverse=reverse)
    out_shape = jax.ShapeDtypeStruct(
        (problem.batch, problem.chunks, problem.heads * problem.key_dim, problem.value_dim), _F32)
    return problem.call(
        kernel, "gla_tpu_chunk_states",
        in_specs=[key_spec, value_spec, key_spec, problem.state_spec()],
        out_specs=problem.chunk_state_spec(backward=False, reverse=reverse),
        out_shape=out_shape, interpret=interpret)(k, v, g, h0)


def _run_backward(problem, q, k, v, g, do, chunk_states, d_final, *, scale, reverse, interpret):
    """Returns (dq, dk, dv, dg) in the kernel layout and dL/d(initial state) [B, H*K, V]."""
    kernel = functools.partial(_backward_kernel, tiling=problem.tiling, scale=scale, reverse=reverse)
    key_spec = problem.token_spec(problem.key_dim, backward=True, reverse=reverse)
    value_spec = problem.token_spec(problem.value_dim, backward=True, reverse=reverse)
    return problem.call(
        kernel, "gla_tpu_backward",
        in_specs=[key_spec, key_spec, value_spec, key_spec, value_spec,
                  problem.chunk_state_spec(backward=True, reverse=reverse), problem.state_spec()],
        out_specs=[key_spec, key_spec, value_spec, key_spec, problem.state_spec()],
        out_shape=[problem.tokens(problem.key_dim, q.dtype), problem.tokens(problem.key_dim, k.dtype),
                   problem.tokens(problem.value_dim, v.dtype), problem.tokens(problem.key_dim, g.dtype),
                   problem.states()],
        interpret=interpret)(q, k, v, g, do, chunk_states, d_final)


def _to_kernel_layout(x, chunks):
    """[B, T, H, D] -> [B, chunks*CHUNK, H*D], zero-padded at the end of the sequence."""
    batch, seq_len, heads, dim = x.shape
    padding = chunks * CHUNK - seq_len
    if padding:
        x = jnp.pad(x, ((0, 0), (0, padding), (0, 0), (0, 0)))
    return x.reshape(batch, chunks * CHUNK, heads * dim)


def _from_kernel_layout(x, seq_len, heads):
    batch, padded_len, lanes = x.shape
    return x.reshape(batch, padded_len, heads, lanes // heads)[:, :seq_len]


# ---------------------------------------------------------------------------------------------------------------
# Differentiable op


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _gla(q, k, v, g, initial_state, scale, reverse, interpret):
    problem = _Problem.of(q, v)
    tokens = [_to_kernel_layout(x, problem.chunks) for x in (q, k, v, g)]
    h0 = initial_state.reshape(problem.states().shape)
    o, final = _run_forward(problem, *tokens, h0, scale=scale, reverse=reverse, interpret=interpret)
    return _from_kernel_layout(o, q.shape[1], problem.heads), final.reshape(initial_state.shape)


def _gla_fwd(q, k, v, g, initial_state, scale, reverse, interpret):
    return _gla(q, k, v, g, initial_state, scale, reverse, interpret), (q, k, v, g, initial_state)


def _gla_bwd(scale, reverse, interpret, residuals, cotangents):
    q, k, v, g, initial_state = residuals
    d_out, d_final = cotangents
    problem = _Problem.of(q, v)
    q2, k2, v2, g2, do2 = (_to_kernel_layout(x, problem.chunks) for x in (q, k, v, g, d_out.astype(v.dtype)))
    states_shape = problem.states().shape
    chunk_states = _run_chunk_states(problem, k2, v2, g2, initial_state.reshape(states_shape), reverse=reverse,
                                     interpret=interpret)
    dq, dk, dv, dg, d_h0 = _run_backward(
        problem, q2, k2, v2, g2, do2, chunk_states, d_final.astype(_F32).reshape(states_shape), scale=scale,
        reverse=reverse, interpret=interpret)
    seq_len = q.shape[1]
    grads = (_from_kernel_layout(x, seq_len, problem.heads) for x in (dq, dk, dv, dg))
    return (*grads, d_h0.reshape(initial_state.shape))


_gla.defvjp(_gla_fwd, _gla_bwd)


def gla_tpu(q, k, v, g, *, scale, initial_state, reverse, interpret=False):
    """Chunked gated linear attention on TPU (Mosaic), differentiable w.r.t. q, k, v, g and initial_state.

    Per batch element and head, S_t = diag(exp g_t) S_{t-1} + k_t^T v_t and o_t = (scale * q_t) S_t, scanned from
    token T-1 down to 0 when `reverse`.

    Args:
      q, k: [B, T, H, K]; v: [B, T, H, V], one float dtype (f32 or bf16); g: [B, T, H, K] log forget gate (<= 0).
      scale: python float multiplying q.
      initial_state: [B, H, K, V] state entering the first scanned token (float32), or None for zeros.
      reverse: scan the sequence backwards.
      interpret: False to compile with Mosaic (TPU only); True or a `pltpu.InterpretParams` to run the kernels
        in Pallas interpret mode (any backend).

    Returns:
      (o [B, T, H, V] in v's dtype, final_state [B, H, K, V] float32).
    """
    if q.ndim != 4 or k.shape != q.shape or g.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k, g must be [B, T, H, K] and v [B, T, H, V] with equal B, T, H; got q {q.shape}, "
                         f"k {k.shape}, g {g.shape}, v {v.shape}")
    batch, _, heads, key_dim = q.shape
    state_shape = (batch, heads, key_dim, v.shape[-1])
    if initial_state is None:
        initial_state = jnp.zeros(state_shape, _F32)
    elif initial_state.shape != state_shape:
        raise ValueError(f"initial_state must be [B, H, K, V] = {state_shape}, got {initial_state.shape}")
    return _gla(q, k, v, g, initial_state.astype(_F32), float(scale), bool(reverse), interpret)
