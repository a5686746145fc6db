"""Public GLA op: `chunk_gla`, with fla's `chunk_gla` semantics and the [B, T, H, K] layout.

Implementations are picked by name from `IMPLS`:
  "reference"  token-by-token `lax.scan` in float32 (ground truth, slow);
  "xla"        the chunked algorithm (chunk 64, sub-chunks of 16) in plain jnp, differentiable by autodiff;
  "pallas"     fused Pallas kernels with hand-written backward (Triton on GPU, Mosaic on TPU);
  "auto"       "pallas" on GPU and TPU, "xla" elsewhere.
"""

import functools

import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels.gla_pallas import gla_pallas
from pallas_kernels.gla_reference import gla_reference
from pallas_kernels.gla_xla import gla_xla
from pallas_kernels.token_grid import scan_columns_by_transposing

# name -> fn(q, k, v, g, *, scale, initial_state, reverse) -> (o, final_state)
IMPLS = {
    "reference": gla_reference,
    "xla": gla_xla,
    "pallas": gla_pallas,
}
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def resolve_impl(impl: str) -> str:
    """Maps "auto" to a concrete implementation name for the default backend."""
    return dispatch.resolve_impl(impl, IMPLS, kernel="pallas", fallback="xla", backends=("gpu", "tpu"))


def _check_inputs(q, k, v, g, initial_state):
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g)):
        if x.ndim != 4:
            raise ValueError(f"{name} must have rank 4 ([B, T, H, K] or [B, T, H, V]), got shape {x.shape}")
        if x.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    for name, x in (("k", k), ("g", g)):
        if x.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {q.shape} ([B, T, H, K]), got {x.shape}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] with [B, T, H] = {q.shape[:3]} as in q, got {v.shape}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
    if q.shape[1] == 0:
        raise ValueError("q, k, v, g must hold at least one token (T >= 1)")
    if initial_state is not None:
        batch, _, heads, key_dim = q.shape
        expected = (batch, heads, key_dim, v.shape[-1])
        if initial_state.shape != expected:
            raise ValueError(f"initial_state must be [B, H, K, V] = {expected}, got {initial_state.shape}")


def chunk_gla(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False, reverse=False,
              column_major=False, impl="auto"):
    """Gated linear attention, causal over the sequence axis.

    Per batch element and head, with state S_t of shape [K, V] (S_0 = initial_state or 0):
        S_t = diag(exp g_t) S_{t-1} + k_t^T v_t,    o_t = (scale * q_t) S_t.
    With reverse=True the recurrence runs from the last token to the first.

    Args:
      q, k: [B, T, H, K]; v: [B, T, H, V]; all one float dtype (bf16 or f32; accumulation is f32).
      g: [B, T, H, K] log forget gate (<= 0), any float dtype.
      scale: multiplies q; defaults to K ** -0.5.
      initial_state: optional [B, H, K, V] state entering the first scanned token (float32).
      output_final_state: also return the state after the last scanned token, [B, H, K, V] float32.
      reverse: scan from token T-1 down to token 0.
      column_major: the T = S * S tokens, given in raster order, are a square grid that the scan visits column by
        column (`pallas_kernels.token_grid`), then reversed if `reverse`; o stays in raster order. The same as
        transposing the grid of q, k, v and g, scanning, and transposing o back, which the "pallas" kernels on a
        GPU do without moving any array.
      impl: "auto", "reference", "xla" or "pallas".

    Returns:
      (o, final_state): o is [B, T, H, V] in v's dtype; final_state is None unless output_final_state.
    """
    name = resolve_impl(impl)
    _check_inputs(q, k, v, g, initial_state)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    call = functools.partial(IMPLS[name], scale=float(scale), initial_state=initial_state, reverse=reverse)
    if not column_major:
        o, final_state = call(q, k, v, g)
    elif name == "pallas":  # the kernels visit the grid's columns in place
        o, final_state = call(q, k, v, g, column_major=True)
    else:
        o, final_state = scan_columns_by_transposing(call, q, k, v, g)
    return o, (final_state if output_final_state else None)
