"""The depthwise conv kernels' tiles on the GPU: device time of the forward and the backward kernel (plus the XLA
work around the backward: filter rotation, summing the gradient partials) for each `Tiles`, from a profiler trace.

    python benchmarks/depthwise_conv_tiles.py --shapes S/256,XL/256 --out tiles.jsonl

Every candidate runs forward + backward (bf16) back to back on rotating inputs inside one trace per shape; its
kernels carry their tiles in their names (depthwise_conv3x3[_backward]_t<tokens>_c<channels>_w<warps>_s<steps>), and
an XLA kernel counts for the candidate whose Pallas kernel ran last before it. Each candidate's values and gradients are
checked against XLA's convolution first. Prints, per shape, the fastest forward and backward tiles, then the tiles
fastest over all shapes (sum of each shape's time relative to that shape's fastest) as a JSON line.
"""

import argparse
import collections
import functools
import itertools
import json
import re
import tempfile

import jax
import jax.numpy as jnp
from depthwise_conv import SHAPES, inputs, value_and_grads
from kernel_trace import kernel_events
from results import report, worst_relative_error

from pallas_kernels.depthwise_conv import Tiles, conv_pallas, conv_reference

_KERNEL = re.compile(r"^depthwise_conv3x3(_backward)?_t(\d+)_c(\d+)_w(\d+)_s(\d+)")


def candidates(channels: int) -> list[Tiles]:
    """One token tile per program holding 4 to 64 elements per thread (fewer wastes threads, more spills
    registers); or 4 or 8 tiles per program looped by 2 or 4 warps, holding 4 to 16 (the backward keeps 10
    accumulator tiles)."""
    tiles = []
    for tokens, block, warps in itertools.product((8, 16, 32, 64, 128), (64, 128), (2, 4, 8)):
        per_thread = tokens * block // (32 * warps)
        if channels % block:
            continue
        if 4 <= per_thread <= 64 and tokens >= 16:
            tiles.append(Tiles(tokens, block, warps))
        if 4 <= per_thread <= 16 and warps <= 4:
            tiles.extend(Tiles(tokens, block, warps, steps) for steps in (4, 8))
    return tiles


def device_us_by_tiles(kernels: list[dict]) -> dict[Tiles, collections.Counter]:
    """Kernel events -> microseconds per Tiles: "forward_us", "backward_us", and "xla_us" for other kernels, each
    counted for the tiles of the conv kernel that ran last before it (none before the first conv kernel)."""
    totals, current = collections.defaultdict(collections.Counter), None
    for event in sorted(kernels, key=lambda e: e["ts"]):
        match = _KERNEL.match(event["name"])
        if match:
            current = Tiles(*(int(group) for group in match.groups()[1:]))
            totals[current]["backward_us" if match[1] else "forward_us"] += event.get("dur", 0.0)
        elif current is not None:
            totals[current]["xla_us"] += event.get("dur", 0.0)
    return dict(totals)


def sweep(shape, calls: int) -> list[dict]:
    n, grid, d = shape
    sets = [inputs(jax.random.key(i), n, grid, d, jnp.bfloat16) for i in range(4)]
    expected = jax.jit(functools.partial(value_and_grads, conv_reference, grid))(
        *[a.astype(jnp.float32) for a in sets[0]])
    steps, errors = {}, {}
    for tiles in candidates(d):
        conv = functools.partial(conv_pallas, forward_tiles=tiles, backward_tiles=tiles)
        step = jax.jit(functools.partial(value_and_grads, conv, grid))
        try:
            errors[tiles] = worst_relative_error(step(*sets[0]), expected)
        except Exception as error:  # a tiling Triton cannot compile is a result too
            print(f"{tiles}: {type(error).__name__}: {str(error)[:200]}")
            continue
        steps[tiles] = step
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            for step in steps.values():
                jax.block_until_ready([step(*sets[i % len(sets)]) for i in range(calls)])
        totals = device_us_by_tiles(kernel_events(log_dir))
    rows = []
    for tiles in steps:  # candidates' channel blocks divide D: the kernel names carry them as they are
        if tiles not in totals:
            raise RuntimeError(f"no kernels of {tiles} in the trace")
        rows.append({"tiles": list(tiles), "error": errors[tiles],
                     **{key: value / calls for key, value in totals[tiles].items()}})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="S/256,XL/256")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    by_shape = {}
    for name in args.shapes.split(","):
        if name not in SHAPES:
            parser.error(f"--shapes: {name!r} is not one of {sorted(SHAPES)}")
        by_shape[name] = sweep(SHAPES[name], args.calls)
        for row in by_shape[name]:
            report({"shape": name, **row, "device": jax.devices()[0].device_kind}, args.out)
    best = {}
    for direction, cost in (("forward", lambda r: r["forward_us"]),
                            ("backward", lambda r: r["backward_us"] + r.get("xla_us", 0.0))):
        relative, seen = collections.Counter(), collections.Counter()
        for name, rows in by_shape.items():
            fastest = min(cost(r) for r in rows)
            print(f"\n{name} {direction}: fastest tiles (tokens, channels, warps, steps), us per call")
            for r in sorted(rows, key=cost)[:5]:
                print(f"  {tuple(r['tiles'])}  {cost(r):8.1f}  err {r['error']:.1e}")
            for r in rows:
                relative[tuple(r["tiles"])] += cost(r) / fastest
                seen[tuple(r["tiles"])] += 1
        everywhere = [tiles for tiles, count in seen.items() if count == len(by_shape)]
        best[direction] = list(min(everywhere, key=relative.get))
    print(json.dumps({"best_tiles": best}))


if __name__ == "__main__":
    main()
