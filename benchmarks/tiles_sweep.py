"""What the kernel tile sweeps (depthwise_conv_tiles.py, output_gate_tiles.py) share: check every candidate against
a reference, run its forward + backward back to back inside one profiler trace, attribute the trace's kernels to the
candidates by the tiles their names carry, pick the tiles fastest over all shapes, and the command line."""

import argparse
import collections
import json
import tempfile

import jax
from kernel_trace import kernel_events
from results import report, worst_relative_error


def device_us_by_tiles(kernels: list[dict], pattern, parse) -> dict:
    """Kernel events -> microseconds per tiles: "forward_us", "backward_us", and "xla_us" for other kernels, each
    counted for the tiles of the swept kernel that ran last before it (none before the first swept kernel).

    pattern: compiled regex matching a swept kernel's name, group 1 "_backward" for the backward kernel;
    parse(match) -> the tiles its name carries."""
    totals, current = collections.defaultdict(collections.Counter), None
    for event in sorted(kernels, key=lambda e: e["ts"]):
        match = pattern.match(event["name"])
        if match:
            current = parse(match)
            totals[current]["backward_us" if match[1] else "forward_us"] += event.get("dur", 0.0)
        elif current is not None:
            totals[current]["xla_us"] += event.get("dur", 0.0)
    return dict(totals)


def trace_candidates(steps: dict, input_sets: list, calls: int, pattern, parse) -> dict:
    """Runs each of `steps` (tiles -> jitted fn(*inputs)) `calls` times on rotating `input_sets` in one trace;
    returns microseconds per call by tiles (`device_us_by_tiles`)."""
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            for step in steps.values():
                jax.block_until_ready([step(*input_sets[i % len(input_sets)]) for i in range(calls)])
        totals = device_us_by_tiles(kernel_events(log_dir), pattern, parse)
    per_call = {}
    for tiles in steps:
        if tiles not in totals:
            raise RuntimeError(f"no kernels of {tiles} in the trace")
        per_call[tiles] = {key: value / calls for key, value in totals[tiles].items()}
    return per_call


def sweep_candidates(candidates, make_step, input_sets: list, expected, calls: int, pattern, parse) -> list[dict]:
    """Rows {"tiles", "error", "forward_us", "backward_us", "xla_us"} of each candidate tiles: make_step(tiles) ->
    jitted fn(*inputs) returning what `expected` holds (the reference's values and gradients on input_sets[0]). A
    candidate Triton cannot compile is reported and left out."""
    steps, errors = {}, {}
    for tiles in candidates:
        step = make_step(tiles)
        try:
            errors[tiles] = worst_relative_error(step(*input_sets[0]), expected)
        except Exception as error:  # a tiling Triton cannot compile is a result too
            print(f"{tiles}: {type(error).__name__}: {str(error)[:200]}")
            continue
        steps[tiles] = step
    per_call = trace_candidates(steps, input_sets, calls, pattern, parse)
    return [{"tiles": list(tiles), "error": errors[tiles], **times} for tiles, times in per_call.items()]


def main(description: str, shapes: dict, sweep, fields: str) -> None:
    """The sweeps' command line (--shapes, --calls, --out): sweep(shape, calls) -> rows per shape, reported as they
    come, then `print_best_tiles`."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="S/256,XL/256")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    by_shape = {}
    for name in args.shapes.split(","):
        if name not in shapes:
            parser.error(f"--shapes: {name!r} is not one of {sorted(shapes)}")
        by_shape[name] = sweep(shapes[name], args.calls)
        for row in by_shape[name]:
            report({"shape": name, **row, "device": jax.devices()[0].device_kind}, args.out)
    print_best_tiles(by_shape, fields)


def print_best_tiles(by_shape: dict, fields: str) -> dict:
    """Prints, per shape and direction, the five fastest tiles of `by_shape` (shape -> rows with "tiles",
    "forward_us", "backward_us", "xla_us", "error"; the backward counts the XLA work around it), then as a JSON line
    the tiles fastest over all shapes (sum of each shape's time relative to that shape's fastest); returns those."""
    best = {}
    for direction, cost in (("forward", lambda r: r["forward_us"]),
                            ("backward", lambda r: r["backward_us"] + r.get("xla_us", 0.0))):
        relative, seen = collections.Counter(), collections.Counter()
        for name, rows in by_shape.items():
            fastest = min(cost(r) for r in rows)
            print(f"\n{name} {direction}: fastest tiles ({fields}), us per call")
            for r in sorted(rows, key=cost)[:5]:
                print(f"  {tuple(r['tiles'])}  {cost(r):8.1f}  err {r['error']:.1e}")
            for r in rows:
                relative[tuple(r["tiles"])] += cost(r) / fastest
                seen[tuple(r["tiles"])] += 1
        everywhere = [tiles for tiles, count in seen.items() if count == len(by_shape)]
        best[direction] = list(min(everywhere, key=relative.get))
    print(json.dumps({"best_tiles": best}))
    return best
