"""The GLA output gate, fla's FusedRMSNormSwishGate: RMSNorm(o) * weight * swish(g) over the last axis.

    z = o / sqrt(mean(o^2) + eps) * weight * g * sigmoid(g)      (float32 inside, o's dtype out)

Implementations, picked by name from `IMPLS`:
  "xla"     the formula in jnp with a custom VJP that keeps only o, g and weight (autodiff kept seven float32
            arrays the size of o);
  "pallas"  one Triton kernel forward and one backward (do, dg and per-program partial sums of the weight
            gradient), custom VJP; V a power of two >= 16;
  "auto"    "pallas" on GPU where V allows it, "xla" elsewhere.
`gate_reference` is the formula left to autodiff (the tests' ground truth).

Why a kernel: XLA:GPU splits the gate into a row reduction, an rsqrt and an elementwise pass forward and three
fusions backward; in DiG-XL/2 at 256 px (H200) the gate cost 0.11-0.18 ms per block forward + backward, several
times what moving its arrays through HBM takes (docs/benchmarks.md).

Kernel layout: o, g [..., V] are read as rows [R, V]; each program owns a block of consecutive rows (`Tiles`; R is
zero-padded to a multiple when needed: a zero row gives z = 0 and, with dz = 0, no gradient). Kernel names carry
their tiles (e.g. rms_norm_swish_gate_backward_e8192_w4), so that a profile tells them apart.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import dispatch
from pallas_kernels.mesh import per_batch_shard

_MIN_VALUE_DIM = 16  # rows of V elements: Triton tiles are powers of two, kept to at least 16 lanes
_MIN_ROWS = 16


class Tiles(NamedTuple):
    """What one program of a gate kernel covers: `elements` / V rows (a power of two, at least 16), run by
    `num_warps` warps."""
    elements: int
    num_warps: int

    def rows(self, value_dim: int) -> int:
        return max(_MIN_ROWS, self.elements // value_dim)


# Fastest over DiG-S/2's and DiG-XL/2's 256 px shapes (V = 64) on an H100 among 17 tilings
# (benchmarks/output_gate_tiles.py, docs/benchmarks.md): forward 19.5 against 23.1 us, backward 36.7 against
# 46.8 us (DiG-XL/2) for the 8192-element blocks before them.
FORWARD_TILES = Tiles(1024, 4)
BACKWARD_TILES = Tiles(2048, 4)


def _check_inputs(o, g, weight):
    if o.shape != g.shape or o.dtype != g.dtype:
        raise ValueError(f"o and g must have one shape and dtype, got {o.shape} {o.dtype} and {g.shape} {g.dtype}")
    if weight.shape != o.shape[-1:]:
        raise ValueError(f"weight must be [V] = ({o.shape[-1]},), got {weight.shape}")


def gate_reference(o, g, weight, eps):
    o32 = o.astype(jnp.float32)
    normed = o32 * lax.rsqrt(jnp.mean(jnp.square(o32), -1, keepdims=True) + eps)
    g32 = g.astype(jnp.float32)
    return (normed * weight * g32 * jax.nn.sigmoid(g32)).astype(o.dtype)


def _gate_gradients(o32, g32, weight, dz32, eps):
    """(do, dg, d_weight per row) in float32 from float32 rows [..., V]."""
    inv_rms = lax.rsqrt(jnp.mean(jnp.square(o32), -1, keepdims=True) + eps)
    normed = o32 * inv_rms
    sigmoid = 1 / (1 + jnp.exp(-g32))
    d_scaled = dz32 * g32 * sigmoid  # dL/d(normed * weight)
    d_normed = d_scaled * weight
    do = inv_rms * (d_normed - normed * jnp.mean(d_normed * normed, -1, keepdims=True))
    dg = dz32 * normed * weight * sigmoid * (1 + g32 * (1 - sigmoid))  # swish'(g) = s (1 + g (1 - s))
    return do, dg, d_scaled * normed


# ----------------------------------------------------------------------------------------------------------------
# "xla": the formula with a hand-written backward pass.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gate_xla(o, g, weight, eps):
    return gate_reference(o, g, weight, eps)


def _xla_forward(o, g, weight, eps):
    return gate_reference(o, g, weight, eps), (o, g, weight)


def _xla_backward(eps, residuals, dz):
    o, g, weight = residuals
    do, dg, d_weight_rows = _gate_gradients(o.astype(jnp.float32), g.astype(jnp.float32), weight,
                                            dz.astype(jnp.float32), eps)
    d_weight = jnp.sum(d_weight_rows, axis=tuple(range(o.ndim - 1)))
    return do.astype(o.dtype), dg.astype(g.dtype), d_weight.astype(weight.dtype)


gate_xla.defvjp(_xla_forward, _xla_backward)


# ----------------------------------------------------------------------------------------------------------------
# "pallas": Triton kernels over blocks of rows.


def _forward_kernel(o_ref, g_ref, w_ref, z_ref, *, eps):
    o, g = o_ref[...].astype(jnp.float32), g_ref[...].astype(jnp.float32)
    inv_rms = lax.rsqrt(jnp.mean(o * o, axis=1, keepdims=True) + eps)
    swish = g / (1 + jnp.exp(-g))
    z_ref[...] = (o * inv_rms * w_ref[...][None, :] * swish).astype(z_ref.dtype)


def _backward_kernel(o_ref, g_ref, dz_ref, w_ref, do_ref, dg_ref, dw_ref, *, eps):
    do, dg, d_weight_rows = _gate_gradients(o_ref[...].astype(jnp.float32), g_ref[...].astype(jnp.float32),
                                            w_ref[...][None, :], dz_ref[...].astype(jnp.float32), eps)
    do_ref[...] = do.astype(do_ref.dtype)
    dg_ref[...] = dg.astype(dg_ref.dtype)
    dw_ref[...] = jnp.sum(d_weight_rows, axis=0)


class _Columns(NamedTuple):
    """A 2-D operand of a gate kernel: `array` [R, C] whose head h is columns [first + h V, first + (h + 1) V)."""
    array: jax.Array
    first: int = 0


def _rows_call(kernel, operands, vectors, outputs, *, heads, tiles, eps, interpret, name):
    """pallas_call over grid (row blocks of `tiles`, heads): `operands` are _Columns of [R, C] arrays (R a multiple
    of the block), `vectors` [V] float32; `outputs` are (ShapeDtypeStruct [R, C], first column) for arrays written by
    head, or ShapeDtypeStruct [programs, V] float32 for per-program sums (program = row block * heads + head)."""
    num_rows, value_dim = operands[0].array.shape[0], vectors[0].shape[0]
    block = tiles.rows(value_dim)

    def column_spec(first):
        first_block = first // value_dim
        return pl.BlockSpec((block, value_dim), lambda i, h: (i, first_block + h))

    program_spec = pl.BlockSpec((None, value_dim), lambda i, h: (i * heads + h, 0))
    out_shapes = [out[0] if isinstance(out, tuple) else out for out in outputs]
    return pl.pallas_call(
        functools.partial(kernel, eps=eps), grid=(num_rows // block, heads),
        in_specs=[column_spec(x.first) for x in operands]
        + [pl.BlockSpec((value_dim,), lambda i, h: (0,))] * len(vectors),
        out_specs=[column_spec(out[1]) if isinstance(out, tuple) else program_spec for out in outputs],
        out_shape=out_shapes, interpret=interpret, name=f"{name}_e{tiles.elements}_w{tiles.num_warps}",
        compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=1),
    )(*(x.array for x in operands), *vectors)


def _as_rows(x, tiles):
    """[..., V] -> [R, V] with R padded up to a multiple of the row block of `tiles`."""
    rows = x.reshape(-1, x.shape[-1])
    padding = -rows.shape[0] % tiles.rows(x.shape[-1])
    return jnp.pad(rows, ((0, padding), (0, 0))) if padding else rows


def _forward_call(o, g, weight, *, heads, tiles, eps, interpret):
    """z [R, C] (columns as o's) from _Columns o, g; `heads` blocks of V = weight's size per row."""
    (z,) = _rows_call(_forward_kernel, [o, g], [weight.astype(jnp.float32)],
                      [(jax.ShapeDtypeStruct(o.array.shape, o.array.dtype), o.first)], heads=heads, tiles=tiles,
                      eps=eps, interpret=interpret, name="rms_norm_swish_gate")
    return z


def _backward_call(o, g, dz, weight, *, heads, tiles, eps, interpret):
    """(do [R, C] as o, dg [R, C] as g (only g's columns written), d_weight [programs, V] partial sums)."""
    value_dim = weight.shape[0]
    programs = o.array.shape[0] // tiles.rows(value_dim) * heads
    return _rows_call(
        _backward_kernel, [o, g, dz], [weight.astype(jnp.float32)],
        [(jax.ShapeDtypeStruct(o.array.shape, o.array.dtype), o.first),
         (jax.ShapeDtypeStruct(g.array.shape, g.array.dtype), g.first),
         jax.ShapeDtypeStruct((programs, value_dim), jnp.float32)],
        heads=heads, tiles=tiles, eps=eps, interpret=interpret, name="rms_norm_swish_gate_backward")


def _pallas_forward_rows(o, g, weight, *, tiles, eps, interpret):
    z = _forward_call(_Columns(_as_rows(o, tiles)), _Columns(_as_rows(g, tiles)), weight, heads=1, tiles=tiles,
                      eps=eps, interpret=interpret)
    return z[:math.prod(o.shape[:-1])].reshape(o.shape)


def _pallas_backward_rows(o, g, dz, weight, *, tiles, eps, interpret):
    do, dg, d_weight = _backward_call(*(_Columns(_as_rows(x, tiles)) for x in (o, g, dz)), weight, heads=1,
                                      tiles=tiles, eps=eps, interpret=interpret)
    rows = math.prod(o.shape[:-1])
    # One [1, V] sum per batch shard: per_batch_shard stacks them along the batch axis.
    return do[:rows].reshape(o.shape), dg[:rows].reshape(g.shape), d_weight.sum(0, keepdims=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _gate_pallas(o, g, weight, eps, interpret, forward_tiles, backward_tiles):
    return _pallas_forward(o, g, weight, eps, interpret, forward_tiles, backward_tiles)[0]


def _pallas_forward(o, g, weight, eps, interpret, forward_tiles, backward_tiles):
    forward = functools.partial(_pallas_forward_rows, tiles=forward_tiles, eps=eps, interpret=interpret)
    return per_batch_shard(forward, (o, g), (weight,)), (o, g, weight)


def _pallas_backward(eps, interpret, forward_tiles, backward_tiles, residuals, dz):
    o, g, weight = residuals
    backward = functools.partial(_pallas_backward_rows, tiles=backward_tiles, eps=eps, interpret=interpret)
    do, dg, d_weight = per_batch_shard(backward, (o, g, dz), (weight,))
    return do, dg, d_weight.sum(0).astype(weight.dtype)


_gate_pallas.defvjp(_pallas_forward, _pallas_backward)


def _kernel_fits(value_dim):
    return value_dim >= _MIN_VALUE_DIM and value_dim & (value_dim - 1) == 0


def gate_pallas(o, g, weight, eps, *, interpret=False, forward_tiles=FORWARD_TILES, backward_tiles=BACKWARD_TILES):
    """The Triton kernels (interpret=True runs them on any backend), each over row blocks of its `Tiles`."""
    if not _kernel_fits(o.shape[-1]):
        raise ValueError(f"impl='pallas' needs V to be a power of two >= {_MIN_VALUE_DIM}, got V={o.shape[-1]}; "
                         "use impl='xla'")
    if o.ndim < 2:
        raise ValueError(f"impl='pallas' needs o as [N, ..., V] (batch first), got shape {o.shape}")
    for name, tiles in (("forward_tiles", forward_tiles), ("backward_tiles", backward_tiles)):
        rows = tiles.rows(o.shape[-1])
        if rows & (rows - 1) or tiles.num_warps < 1:
            raise ValueError(f"{name}={tiles} must give a power-of-two number of rows for V={o.shape[-1]} and "
                             "at least one warp")
    return _gate_pallas(o, g, weight, float(eps), bool(interpret), forward_tiles, backward_tiles)


def packed_gate_fits(rows: int, value_dim: int, g_first: int) -> bool:
    """Whether `packed_gate_forward` / `packed_gate_backward` take these shapes: V a kernel width, g's first column
    on a V boundary, and the N * T rows a whole number of both kernels' row blocks (no padding of the wide array)."""
    return (_kernel_fits(value_dim) and g_first % value_dim == 0
            and all(rows % tiles.rows(value_dim) == 0 for tiles in (FORWARD_TILES, BACKWARD_TILES)))


def packed_gate_forward(o, packed, weight, *, g_first: int, eps: float, interpret: bool = False):
    """The forward kernel with g read in place out of a wider array (no copy of g): o [N, T, H, V] and packed
    [N, T, C] whose columns [g_first, g_first + H V) are g, head-major as o -> z [N, T, H, V]. Shapes as
    `packed_gate_fits` says; run per batch shard by the caller."""
    n, t, heads, value_dim = o.shape
    z = _forward_call(_Columns(o.reshape(n * t, heads * value_dim)), _Columns(packed.reshape(n * t, -1), g_first),
                      weight, heads=heads, tiles=FORWARD_TILES, eps=eps, interpret=interpret)
    return z.reshape(o.shape)


def packed_gate_backward(o, packed, dz, weight, *, g_first: int, eps: float, interpret: bool = False):
    """The backward kernel of `packed_gate_forward`: (do [N, T, H, V], d_packed [N, T, C] with g's gradient in g's
    columns and the other columns left unwritten for the caller to fill, d_weight [1, V] float32)."""
    n, t, heads, value_dim = o.shape
    as_columns = lambda x: _Columns(x.reshape(n * t, heads * value_dim))  # noqa: E731
    do, d_packed, d_weight = _backward_call(
        as_columns(o), _Columns(packed.reshape(n * t, -1), g_first), as_columns(dz), weight, heads=heads,
        tiles=BACKWARD_TILES, eps=eps, interpret=interpret)
    return do.reshape(o.shape), d_packed.reshape(packed.shape), d_weight.sum(0, keepdims=True)


IMPLS = {"xla": gate_xla, "pallas": gate_pallas}


def resolve_impl(impl: str, value_dim: int | None = None) -> str:
    """Maps "auto" to the implementation for the default backend (and V, when given)."""
    fits = value_dim is None or _kernel_fits(value_dim)
    return dispatch.resolve_impl(impl, IMPLS, kernel="pallas", fallback="xla", kernel_fits=fits)


def rms_norm_swish_gate(o, g, weight, *, eps: float, impl: str = "auto"):
    """RMSNorm(o) * weight * swish(g) over the last axis, float32 inside.

    Args:
      o, g: [N, ..., V] in one float dtype (the batch first: under a mesh the Pallas kernels run per batch shard).
      weight: [V], float32 or o's dtype.
      eps: added to the mean square.
      impl: "auto", "xla" or "pallas".
    Returns:
      [N, ..., V] in o's dtype. Differentiable w.r.t. o, g and weight.
    """
    _check_inputs(o, g, weight)
    return IMPLS[resolve_impl(impl, o.shape[-1])](o, g, weight, eps)
