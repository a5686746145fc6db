"""Tokens of a square grid in raster order and in column-major order (the scan order of DiG's transposed blocks).

A sequence of T = S * S tokens in raster order holds grid cell (r, c) at position r * S + c; column-major order
holds it at c * S + r. `transpose_grid` maps one order to the other (it is its own inverse).
"""

import math


def grid_side(num_tokens: int) -> int:
    """S for a sequence of S * S tokens; an error naming the length otherwise."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"a column-major scan needs the tokens of a square grid, got T={num_tokens} (not a square)")
    return side


def transpose_grid(x):
    """x [B, T, ...] with T = S * S tokens: the tokens reordered raster <-> column-major."""
    side = grid_side(x.shape[1])
    grid = x.reshape(x.shape[0], side, side, *x.shape[2:])
    return grid.swapaxes(1, 2).reshape(x.shape)


def scan_columns_by_transposing(scan, q, k, v, g, *rest):
    """A column-major GLA scan for an implementation that scans in sequence order only: scan(q, k, v, g, *rest) ->
    (o, final_state) on the transposed grids, o transposed back to raster order (the state needs no reordering)."""
    o, final_state = scan(*map(transpose_grid, (q, k, v, g)), *rest)
    return transpose_grid(o), final_state
