"""GLA kernels on a GPU: accuracy of impl="pallas" compiled for real, and forward / forward+backward times of the
Pallas kernels, the XLA path and fla's chunk_gla (PyTorch + Triton, when importable) at DiG's shapes, side by side.

Usage, from the repository root on a GPU machine:
    python benchmarks/gla_kernel.py [--sections check,bench,sweep,schedule] [--out DIR] [--budget-s SECONDS]

Sections:
  check  errors (RMS-relative) against the float32 token-by-token reference, compiled on the GPU: pallas and xla
         at bf16 and f32, forward and reverse, with an initial state, T not a multiple of the chunk, weak and
         strong gates; fla (forward direction only) on the same inputs for comparison.
  bench  the anchor shapes (S: H=6, 262,144 tokens; XL: H=18, 131,072 tokens; K=32, V=64; T in 256..16384; bf16):
         milliseconds per forward and per forward+backward (o and all input gradients for a cotangent of o), and
         the ratio to the HBM floor: every input and output moved once at BANDWIDTH (fwd: q, k, v, g in, o out;
         fwd+bwd adds do in and dq, dk, dv, dg out, as in fla's o.backward(do)).
  sweep  launch-parameter variants of the Pallas kernels at a few shapes.
  schedule  the sequential and the chunk-parallel schedule side by side (forward+backward) over a grid of
         (batch x heads, T) around the point where gla_triton's automatic choice switches (`_chunk_parallel_pays`):
         S heads (6), batch 1..16, T in 256..16384.
JAX times: median over repeats of back-to-back calls (dispatch overlaps execution), after a warm-up call.
fla times: triton.testing.do_bench medians (CUDA events). The table is printed last; JSON rows go to --out.
"""

import argparse
import dataclasses
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from step_timing import time_calls

from pallas_kernels.gla_pallas import gla_pallas
from pallas_kernels.gla_reference import gla_reference
from pallas_kernels.gla_triton import TritonConfig, gla_triton
from pallas_kernels.testing import make_inputs, rms_rel_err

BANDWIDTH = 3.0e12  # bytes/s, an H100 SXM's device-to-device copy rate (the script also measures and prints it)
KEY_DIM, VALUE_DIM = 32, 64
ANCHORS = [("S", 6, 262_144), ("XL", 18, 131_072)]  # (model, heads, tokens per batch)
SEQ_LENS = (256, 1024, 4096, 16384)
# (model, heads, tokens, T): the anchors' extremes, and one image per batch at 1792 px (S/2) and 2048 px (XL/2).
SWEEP_SHAPES = [("S", 6, 262_144, 256), ("S", 6, 262_144, 16384), ("XL", 18, 131_072, 16384),
                ("S", 6, 12_544, 12_544), ("XL", 18, 16_384, 16_384)]
SCHEDULE_BATCHES, SCHEDULE_HEADS = (1, 2, 4, 8, 16), 6
SCHEDULES = {"sequential": TritonConfig(chunk_parallel=False), "chunk-parallel": TritonConfig(chunk_parallel=True)}
_START = time.time()
SWEEP_CONFIGS = {  # the schedules (module docstring of gla_triton), then launch parameters of the sequential one
    **SCHEDULES,
    "v32": TritonConfig(value_block=32),
    "v16": TritonConfig(value_block=16),
    "grad8w": TritonConfig(chunk_grad_warps=8),
    "fwd2st": TritonConfig(forward_stages=2, state_grad_stages=2),
    "fwd8w": TritonConfig(forward_warps=8, state_grad_warps=8),
}


def log(record, out_dir):
    record = {**record, "elapsed_s": round(time.time() - _START, 1)}
    print(json.dumps(record), flush=True)
    with open(os.path.join(out_dir, "gla_kernel.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Optional competitors.


def load_xla():
    try:
        from pallas_kernels.gla_xla import gla_xla
    except ImportError as error:
        print(f"xla path unavailable: {error}", flush=True)
        return None
    return gla_xla


def load_fla():
    try:
        import torch
        from fla.ops.gla import chunk_gla
    except ImportError as error:
        print(f"fla unavailable: {error}", flush=True)
        return None
    return torch, chunk_gla


# ----------------------------------------------------------------------------------------------------------------
# Timing.


def jax_fns(impl, scale):
    """(forward, forward+backward) jitted callables of an impl with chunk_gla's signature."""

    def forward(q, k, v, g):
        return impl(q, k, v, g, scale=scale, initial_state=None, reverse=False)

    def forward_backward(q, k, v, g, do):
        o, vjp = jax.vjp(lambda q, k, v, g: forward(q, k, v, g)[0], q, k, v, g)
        return o, vjp(do)

    return jax.jit(forward), jax.jit(forward_backward)


def bench_inputs(batch, seq_len, heads):
    keys = jax.random.split(jax.random.key(0), 5)
    qk_shape, v_shape = (batch, seq_len, heads, KEY_DIM), (batch, seq_len, heads, VALUE_DIM)
    q, k, do = (jax.random.normal(key, shape, jnp.bfloat16) for key, shape in
                zip(keys[:3], (qk_shape, qk_shape, v_shape)))
    v = jax.random.normal(keys[3], v_shape, jnp.bfloat16)
    g = (jax.nn.log_sigmoid(jax.random.normal(keys[4], qk_shape)) / 16).astype(jnp.bfloat16)
    return q, k, v, g, do


def floors_ms(batch, seq_len, heads):
    token_heads = batch * seq_len * heads
    forward_elements = 3 * KEY_DIM + 2 * VALUE_DIM
    backward_elements = (3 * KEY_DIM + 2 * VALUE_DIM) + (3 * KEY_DIM + VALUE_DIM)
    to_ms = 2 * token_heads / BANDWIDTH * 1e3  # bf16 bytes
    return forward_elements * to_ms, (forward_elements + backward_elements) * to_ms


def measure_copy_bandwidth():
    x = jnp.ones((1 << 29,), jnp.bfloat16)  # 1 GiB
    ms = time_calls(jax.jit(lambda x: x + 1), x)
    return 2 * x.nbytes / (ms * 1e-3)


def time_fla(fla, batch, seq_len, heads):
    torch, chunk_gla = fla
    from triton.testing import do_bench

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)

    q, k = randn(batch, seq_len, heads, KEY_DIM), randn(batch, seq_len, heads, KEY_DIM)
    v = randn(batch, seq_len, heads, VALUE_DIM)
    g = torch.nn.functional.logsigmoid(torch.randn(batch, seq_len, heads, KEY_DIM, device="cuda")) / 16
    g = g.to(torch.bfloat16)
    for x in (q, k, v, g):
        x.requires_grad_(True)
    do = torch.randn_like(v)

    def forward():
        with torch.no_grad():
            chunk_gla(q, k, v, g)

    def forward_backward():
        o, _ = chunk_gla(q, k, v, g)
        o.backward(do)

    fwd = do_bench(forward, warmup=25, rep=100, return_mode="median")
    fwd_bwd = do_bench(forward_backward, warmup=25, rep=100, return_mode="median")
    return fwd, fwd_bwd


# ----------------------------------------------------------------------------------------------------------------
# Sections.


@functools.cache
def vjp_fn(impl, reverse):
    """Jitted (inputs, cotangents) -> (o, final_state, dq, dk, dv, dg, dinitial_state) of impl."""

    def run(q, k, v, g, initial_state, do, d_final):
        def gla(q, k, v, g, initial_state):
            return impl(q, k, v, g, scale=KEY_DIM ** -0.5, initial_state=initial_state, reverse=reverse)

        (o, final_state), vjp = jax.vjp(gla, q, k, v, g, initial_state)
        return (o, final_state, *vjp((do, d_final)))

    return jax.jit(run)


def vjp_outputs(impl, inputs, cotangents, reverse):
    return vjp_fn(impl, reverse)(*inputs, *cotangents)


def fla_outputs(fla, inputs, cotangents):
    torch, chunk_gla = fla
    tensors = [torch.tensor(np.asarray(x, np.float32), device="cuda") for x in (*inputs, *cotangents)]
    q, k, v, g, initial_state, do, d_final = tensors
    dtype = {jnp.dtype(jnp.bfloat16): torch.bfloat16, jnp.dtype(jnp.float32): torch.float32}[inputs[0].dtype]
    q, k, v, g = (x.to(dtype).requires_grad_(True) for x in (q, k, v, g))
    initial_state.requires_grad_(True)
    o, final_state = chunk_gla(q, k, v, g, scale=KEY_DIM ** -0.5, initial_state=initial_state,
                               output_final_state=True)
    torch.autograd.backward([o, final_state], [do.to(o.dtype), d_final])
    return [x.detach().float().cpu().numpy() for x in
            (o, final_state, q.grad, k.grad, v.grad, g.grad, initial_state.grad)]


def check(out_dir, impls, fla):
    """Errors of `impls` (name -> impl; fla too when given, bf16 and forward direction only) against the float32
    reference, for bf16 and f32 inputs, both directions, weak and strong gates."""
    names = ("o", "final_state", "dq", "dk", "dv", "dg", "dinitial_state")
    dims = (2, 300, 2, KEY_DIM, VALUE_DIM)
    rows = []
    for dtype in (jnp.bfloat16, jnp.float32):
        for reverse in (False, True):
            for gates_name, strength in (("weak", 1 / 16), ("strong", 10.0)):
                seed = len(rows)
                inputs = make_inputs(seed, *dims, gate_strength=strength, dtype=dtype, with_initial_state=True)
                cotangent_keys = jax.random.split(jax.random.key(seed))
                cotangents = (jax.random.normal(cotangent_keys[0], dims[:3] + (VALUE_DIM,)).astype(dtype),
                              jax.random.normal(cotangent_keys[1], (dims[0], dims[2], KEY_DIM, VALUE_DIM)))
                upcast = [x.astype(jnp.float32) for x in inputs]
                reference = vjp_outputs(gla_reference, upcast, [c.astype(jnp.float32) for c in cotangents],
                                        reverse)
                results = {name: vjp_outputs(impl, inputs, cotangents, reverse) for name, impl in impls.items()}
                if fla is not None and not reverse and dtype == jnp.bfloat16:
                    results["fla"] = fla_outputs(fla, inputs, cotangents)
                for impl_name, outputs in results.items():
                    errors = {n: rms_rel_err(np.asarray(a, np.float32), r) for n, a, r in
                              zip(names, outputs, reference)}
                    row = {"section": "check", "impl": impl_name, "dtype": jnp.dtype(dtype).name,
                           "reverse": reverse, "gates": gates_name, **{n: float(f"{e:.2e}") for n, e in
                                                                      errors.items()}}
                    rows.append(row)
                    log(row, out_dir)
    return rows


def bench(out_dir, impls, fla, deadline, models, seq_lens):
    """Times the JAX `impls` (name -> impl), then fla, at the anchor shapes of `models` and `seq_lens`. After
    `deadline` only "pallas" is still measured."""
    shapes = [(model, heads, tokens // seq_len, seq_len) for model, heads, tokens in ANCHORS if model in models
              for seq_len in seq_lens]
    rows = []
    for model, heads, batch, seq_len in shapes:
        fwd_floor, fwd_bwd_floor = floors_ms(batch, seq_len, heads)
        rows.append({"section": "bench", "model": model, "T": seq_len, "B": batch, "H": heads,
                     "floor_fwd_ms": round(fwd_floor, 3), "floor_fwd_bwd_ms": round(fwd_bwd_floor, 3)})
    for name in [*impls, "fla"] if fla is not None else impls:
        for row in rows:
            if name != "pallas" and time.time() > deadline:
                print(f"time budget spent: {name} not measured from {row['model']}/T={row['T']} on", flush=True)
                break
            if name == "fla":
                times = time_fla(fla, row["B"], row["T"], row["H"])
            else:
                inputs = bench_inputs(row["B"], row["T"], row["H"])
                forward, forward_backward = jax_fns(impls[name], KEY_DIM ** -0.5)
                times = (time_calls(forward, *inputs[:4]), time_calls(forward_backward, *inputs))
                del inputs
            row[f"{name}_fwd_ms"], row[f"{name}_fwd_bwd_ms"] = (round(t, 3) for t in times)
            log({"impl": name, **row}, out_dir)
    return rows


def sweep(out_dir, deadline):
    rows = []
    for model, heads, tokens, seq_len in SWEEP_SHAPES:
        batch = tokens // seq_len
        q, k, v, g, do = bench_inputs(batch, seq_len, heads)
        for name, config in SWEEP_CONFIGS.items():
            if time.time() > deadline:
                break
            forward, forward_backward = jax_fns(functools.partial(gla_triton, config=config), KEY_DIM ** -0.5)
            row = {"section": "sweep", "model": model, "T": seq_len, "variant": name,
                   "config": dataclasses.asdict(config), "fwd_ms": round(time_calls(forward, q, k, v, g), 3)}
            if not name.startswith("fwd"):
                row["fwd_bwd_ms"] = round(time_calls(forward_backward, q, k, v, g, do), 3)
            rows.append(row)
            log(row, out_dir)
        del q, k, v, g, do
    return rows


def schedule(out_dir, deadline):
    rows = []
    for seq_len in SEQ_LENS:
        for batch in SCHEDULE_BATCHES:
            if time.time() > deadline:
                return rows
            inputs = bench_inputs(batch, seq_len, SCHEDULE_HEADS)
            row = {"section": "schedule", "programs": batch * SCHEDULE_HEADS, "T": seq_len}
            for name, config in SCHEDULES.items():
                _, forward_backward = jax_fns(functools.partial(gla_triton, config=config), KEY_DIM ** -0.5)
                row[f"{name}_ms"] = round(time_calls(forward_backward, *inputs), 3)
            rows.append(row)
            log(row, out_dir)
            del inputs
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Report.


def markdown_tables(check_rows, bench_rows, sweep_rows, schedule_rows):
    lines = []
    if check_rows:
        names = ("o", "final_state", "dq", "dk", "dv", "dg", "dinitial_state")
        lines += ["| impl | dtype | reverse | gates | " + " | ".join(names) + " |",
                  "|---" * (4 + len(names)) + "|"]
        lines += [f"| {r['impl']} | {r['dtype']} | {r['reverse']} | {r['gates']} | "
                  + " | ".join(f"{r[n]:.1e}" for n in names) + " |" for r in check_rows]
        lines.append("")
    if bench_rows:
        header = ("| model | T | B | floor fwd | pallas fwd | xla fwd | fla fwd | floor f+b | pallas f+b | xla f+b "
                  "| fla f+b | fla/pallas f+b | pallas/floor fwd | pallas/floor f+b |")
        lines += [header, "|---" * 14 + "|"]
        for r in bench_rows:
            def ms(key, row=r):
                return f"{row[key]:.3f}" if key in row else "-"

            speedup = (f"{r['fla_fwd_bwd_ms'] / r['pallas_fwd_bwd_ms']:.1f}x" if "fla_fwd_bwd_ms" in r else "-")
            lines.append(
                f"| {r['model']} | {r['T']} | {r['B']} | {ms('floor_fwd_ms')} | {ms('pallas_fwd_ms')} | "
                f"{ms('xla_fwd_ms')} | {ms('fla_fwd_ms')} | {ms('floor_fwd_bwd_ms')} | {ms('pallas_fwd_bwd_ms')} | "
                f"{ms('xla_fwd_bwd_ms')} | {ms('fla_fwd_bwd_ms')} | {speedup} | "
                f"{r['pallas_fwd_ms'] / r['floor_fwd_ms']:.2f}x | "
                f"{r['pallas_fwd_bwd_ms'] / r['floor_fwd_bwd_ms']:.2f}x |")
        lines.append("")
    if sweep_rows:
        lines += ["| model | T | variant | fwd ms | fwd+bwd ms |", "|---" * 5 + "|"]
        lines += [f"| {r['model']} | {r['T']} | {r['variant']} | {r['fwd_ms']:.3f} | {r.get('fwd_bwd_ms', '-')} |"
                  for r in sweep_rows]
        lines.append("")
    if schedule_rows:
        lines += ["| programs (B x H) | T | sequential f+b ms | chunk-parallel f+b ms | sequential / chunk-parallel |",
                  "|---" * 5 + "|"]
        lines += [f"| {r['programs']} | {r['T']} | {r['sequential_ms']:.3f} | {r['chunk-parallel_ms']:.3f} | "
                  f"{r['sequential_ms'] / r['chunk-parallel_ms']:.2f} |" for r in schedule_rows]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="check,bench,sweep")
    parser.add_argument("--impls", default="pallas,fla,xla",
                        help="what check and bench compare (pallas: gla_triton picks the schedule per shape); also "
                             "pallas-chunk-parallel, that schedule forced (bench: in the JSON rows only)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--models", default="S,XL", help="bench: anchor models (S, XL)")
    parser.add_argument("--seq_lens", default=",".join(map(str, SEQ_LENS)), help="bench: sequence lengths")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="after this many seconds, skip the optional measurements still to come")
    args = parser.parse_args()
    sections, wanted = set(args.sections.split(",")), args.impls.split(",")
    start = _START
    os.makedirs(args.out, exist_ok=True)
    print(f"jax {jax.__version__}, devices {jax.devices()}", flush=True)
    if jax.default_backend() != "gpu":
        raise SystemExit("this benchmark needs a GPU (impl='pallas' on GPU is the Triton path)")
    impls = {"pallas": gla_pallas}
    if "pallas-chunk-parallel" in wanted:
        impls["pallas-chunk-parallel"] = functools.partial(gla_triton, config=SCHEDULES["chunk-parallel"])
    if "xla" in wanted and (xla := load_xla()) is not None:
        impls["xla"] = xla
    fla = load_fla() if "fla" in wanted else None
    print(f"device-to-device copy: {measure_copy_bandwidth() / 1e12:.2f} TB/s (floors use "
          f"{BANDWIDTH / 1e12:.1f} TB/s)", flush=True)
    check_rows = check(args.out, impls, fla) if "check" in sections else []
    # The sweep gets what is left of the budget once pallas, fla and xla have been timed (or the budget is spent).
    bench_rows = (bench(args.out, impls, fla, start + args.budget_s, args.models.split(","),
                        [int(t) for t in args.seq_lens.split(",")]) if "bench" in sections else [])
    sweep_rows = sweep(args.out, start + args.budget_s) if "sweep" in sections else []
    schedule_rows = schedule(args.out, start + args.budget_s) if "schedule" in sections else []
    report = markdown_tables(check_rows, bench_rows, sweep_rows, schedule_rows)
    with open(os.path.join(args.out, "gla_kernel.md"), "w") as f:
        f.write(report + "\n")
    print(f"total {time.time() - start:.0f} s")
    print(report)


if __name__ == "__main__":
    main()
