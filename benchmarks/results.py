"""How every benchmark hands out a result row: one JSON line on stdout, appended to the `--out` file when given."""

import json


def report(row: dict, out: str | None) -> None:
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def worst_relative_error(actual, expected) -> float:
    """Worst relative L2 error over pairs of arrays (actual compared in float32)."""
    import jax.numpy as jnp

    return max(float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b)) for a, b in zip(actual, expected))


def op_benchmark(description: str, shapes: dict, default_impls: str, moved_elements, accuracy, time_ms) -> list[dict]:
    """The command line of an op's GPU benchmark (--impls, --shapes, --hbm_tbps, --out) and its rows, one per
    (shape, impl), reported as they come, then a table.

    moved_elements(shape) -> elements forward + backward read and write at least once (bf16: 2 bytes each, the
    HBM floor at --hbm_tbps); accuracy(impl, shape, dtype) -> worst relative error; time_ms(impl, shape) ->
    forward + backward milliseconds (bf16).
    """
    import argparse

    import jax
    import jax.numpy as jnp

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", default=default_impls)
    parser.add_argument("--shapes", default=",".join(shapes))
    parser.add_argument("--hbm_tbps", type=float, default=4.8, help="HBM bandwidth for the floor (H200: 4.8)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for name in args.shapes.split(","):
        shape = shapes[name]
        for impl in args.impls.split(","):
            row = {"shape": name, "impl": impl, "floor_ms": moved_elements(shape) * 2 / (args.hbm_tbps * 1e9),
                   "err_bf16": accuracy(impl, shape, jnp.bfloat16), "err_f32": accuracy(impl, shape, jnp.float32),
                   "fwd_bwd_ms": time_ms(impl, shape), "device": jax.devices()[0].device_kind}
            rows.append(row)
            report(row, args.out)
    print(f"\n{'shape':8} {'impl':8} {'fwd+bwd ms':>10} {'floor ms':>9} {'x floor':>8} {'err bf16':>9} {'err f32':>9}")
    for r in rows:
        print(f"{r['shape']:8} {r['impl']:8} {r['fwd_bwd_ms']:10.3f} {r['floor_ms']:9.3f} "
              f"{r['fwd_bwd_ms'] / r['floor_ms']:8.1f} {r['err_bf16']:9.2e} {r['err_f32']:9.2e}")
    return rows
