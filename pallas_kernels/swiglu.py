"""SwiGLU's activation on a gate and a value side by side: `swiglu(x [..., 2I]) = swish(x[..., :I]) * x[..., I:]`.

The forward pass is the formula in jnp (XLA runs it as one elementwise pass). The backward pass writes the
[..., 2I] gradient, float32 inside; implementations, picked by name from `IMPLS`:
  "xla"     jnp: the two halves' gradients picked by position from a [..., 2, I] view;
  "pallas"  one Triton kernel over blocks of rows x I-columns: it reads both halves of x and the output gradient
            once and writes both halves of the input gradient;
  "auto"    "pallas" on GPU for I a multiple of 16 and at least 2048 (`_KERNEL_MIN_INNER`), "xla" elsewhere.

Why a kernel: in the DiG-XL/2 step at 256 px (H100, 2026-12-07) XLA:GPU ran the "xla" backward as two passes, the
first writing a float32 [N, T, I] product for the second: 84.9 + 105.7 us per block, where one pass over the
~250 MB it reads and writes takes ~80 us. (Autodiff of the split, the concatenate of the halves' gradients, ran as
extra passes too: DiG-S/2 step, H200, 2026-12-03.)

Kernel layout: x [..., 2I] is read as rows [R, 2, I] (a free reshape), each program a block of `_ROWS` rows x both
halves x `_columns(I)` columns; the gradient is written in the same blocks, so its two halves need no concatenate.
R is zero-padded to a multiple of the row block when needed (a zero row has a zero gradient).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import dispatch
from pallas_kernels.mesh import per_batch_shard

_ROWS = 16
_COLUMN_BLOCKS = (128, 64, 32, 16)  # the largest that divides I
_NUM_WARPS = 4
# At I = 1024 (DiG-S) XLA:GPU runs the "xla" backward as one pass, faster than the kernel (forward + backward 0.051
# against 0.060 ms); at I = 3072 (DiG-XL) it splits it in two and the kernel wins (0.211 against 0.143 ms). H100,
# batch 32 x 256 tokens, benchmarks/swiglu.py; I between is not measured.
_KERNEL_MIN_INNER = 2048


def swiglu_reference(x):
    """The formula, for autodiff (the tests' ground truth)."""
    gate, value = jnp.split(x, 2, axis=-1)
    return jax.nn.silu(gate) * value


def _gradient(gate, value, d_out):
    """(d_gate, d_value) in float32 from float32 halves: swish'(g) = s (1 + g (1 - s)), s = sigmoid(g)."""
    sigmoid = jax.nn.sigmoid(gate)
    return d_out * value * sigmoid * (1 + gate * (1 - sigmoid)), d_out * gate * sigmoid


def backward_xla(x, d_out):
    # [..., 2, I] with broadcasting halves: the gradient of each half is picked by position, not concatenated.
    halves = x.reshape(*x.shape[:-1], 2, -1).astype(jnp.float32)
    d_gate, d_value = _gradient(halves[..., :1, :], halves[..., 1:, :], d_out[..., None, :].astype(jnp.float32))
    is_gate = jax.lax.broadcasted_iota(jnp.int32, (2, 1), 0) == 0
    return jnp.where(is_gate, d_gate, d_value).reshape(x.shape).astype(x.dtype)


def _backward_kernel(x_ref, d_out_ref, dx_ref):
    gate, value = (x_ref[:, half, :].astype(jnp.float32) for half in (0, 1))
    d_gate, d_value = _gradient(gate, value, d_out_ref[...].astype(jnp.float32))
    dx_ref[:, 0, :] = d_gate.astype(dx_ref.dtype)
    dx_ref[:, 1, :] = d_value.astype(dx_ref.dtype)


def _columns(inner):
    return next(block for block in _COLUMN_BLOCKS if inner % block == 0)


def _backward_rows(x, d_out, *, interpret):
    """x [..., 2I], d_out [..., I] -> dx [..., 2I] by the Triton kernel."""
    inner = d_out.shape[-1]
    rows = d_out.size // inner
    padding = -rows % _ROWS
    x_rows, d_out_rows = x.reshape(rows, 2, inner), d_out.reshape(rows, inner)
    if padding:
        x_rows, d_out_rows = (jnp.pad(a, ((0, padding),) + ((0, 0),) * (a.ndim - 1)) for a in (x_rows, d_out_rows))
    columns = _columns(inner)
    dx = pl.pallas_call(
        _backward_kernel, grid=((rows + padding) // _ROWS, inner // columns),
        in_specs=[pl.BlockSpec((_ROWS, 2, columns), lambda i, j: (i, 0, j)),
                  pl.BlockSpec((_ROWS, columns), lambda i, j: (i, j))],
        out_specs=pl.BlockSpec((_ROWS, 2, columns), lambda i, j: (i, 0, j)),
        out_shape=jax.ShapeDtypeStruct(x_rows.shape, x.dtype), interpret=interpret, name="swiglu_backward",
        compiler_params=plgpu.CompilerParams(num_warps=_NUM_WARPS, num_stages=1),
    )(x_rows, d_out_rows)
    return dx[:rows].reshape(x.shape)


def backward_pallas(x, d_out, *, interpret=False):
    """The Triton kernel (interpret=True runs it on any backend), per batch shard under a mesh."""
    if not _kernel_fits(d_out.shape[-1]):
        raise ValueError(f"impl='pallas' needs I to be a multiple of 16, got I={d_out.shape[-1]}; use impl='xla'")
    if x.ndim < 2:
        raise ValueError(f"impl='pallas' needs x as [N, ..., 2I] (batch first), got shape {x.shape}")
    return per_batch_shard(functools.partial(_backward_rows, interpret=interpret), (x, d_out))


IMPLS = {"xla": backward_xla, "pallas": backward_pallas}


def _kernel_fits(inner):
    return inner % _COLUMN_BLOCKS[-1] == 0


def _kernel_pays(inner):
    """Whether "auto" takes the kernel: for I >= _KERNEL_MIN_INNER (see there)."""
    return _kernel_fits(inner) and inner >= _KERNEL_MIN_INNER


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _swiglu(x, impl, interpret):
    return swiglu_reference(x)


def _forward(x, impl, interpret):
    return swiglu_reference(x), x


def _backward(impl, interpret, x, d_out):
    if impl == "pallas":
        return (backward_pallas(x, d_out, interpret=interpret),)
    return (IMPLS[impl](x, d_out),)


_swiglu.defvjp(_forward, _backward)


def swiglu(x, *, impl: str = "auto", interpret: bool = False):
    """swish(gate) * value for x = [gate | value] along the last axis.

    Args:
      x: [N, ..., 2I], a float dtype (the batch first: under a mesh the kernel runs per batch shard).
      impl: the backward pass's implementation, "auto", "xla" or "pallas" (module docstring).
      interpret: run the Pallas kernel in interpret mode (any backend; tests).
    Returns:
      [N, ..., I] in x's dtype. Differentiable; the backward pass keeps only x.
    """
    if x.shape[-1] % 2:
        raise ValueError(f"x must hold gate and value side by side (an even last axis), got shape {x.shape}")
    name = dispatch.resolve_impl(impl, IMPLS, kernel="pallas", fallback="xla",
                                 kernel_fits=_kernel_pays(x.shape[-1] // 2))
    return _swiglu(x, name, bool(interpret))
