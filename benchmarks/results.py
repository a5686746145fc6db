"""How every benchmark hands out a result row: one JSON line on stdout, appended to the `--out` file when given."""

import json


def report(row: dict, out: str | None) -> None:
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def op_benchmark(shapes: dict, impls: list, floor_ms, accuracy, time_ms, out: str | None) -> list[dict]:
    """Rows of an op's GPU benchmark, one per (shape, impl), reported as they come, then a table.

    floor_ms(shape) -> the HBM floor of forward + backward; accuracy(impl, shape, dtype) -> worst relative error;
    time_ms(impl, shape) -> forward + backward milliseconds (bf16).
    """
    import jax
    import jax.numpy as jnp

    rows = []
    for name, shape in shapes.items():
        for impl in impls:
            row = {"shape": name, "impl": impl, "floor_ms": floor_ms(shape),
                   "err_bf16": accuracy(impl, shape, jnp.bfloat16), "err_f32": accuracy(impl, shape, jnp.float32),
                   "fwd_bwd_ms": time_ms(impl, shape), "device": jax.devices()[0].device_kind}
            rows.append(row)
            report(row, out)
    print(f"\n{'shape':8} {'impl':8} {'fwd+bwd ms':>10} {'floor ms':>9} {'x floor':>8} {'err bf16':>9} {'err f32':>9}")
    for r in rows:
        print(f"{r['shape']:8} {r['impl']:8} {r['fwd_bwd_ms']:10.3f} {r['floor_ms']:9.3f} "
              f"{r['fwd_bwd_ms'] / r['floor_ms']:8.1f} {r['err_bf16']:9.2e} {r['err_f32']:9.2e}")
    return rows
