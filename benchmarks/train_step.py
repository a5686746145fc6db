"""Median step time, images/s and peak device memory of the jitted train step (fwd + bwd + AdamW + EMA).

Each case runs in its own process so that its peak memory is its own:
    python benchmarks/train_step.py --res 256 --models DiG-S/2,DiT-S/2,DiG-XL/2,DiT-XL/2 --out results.jsonl
A case: model, attention or GLA implementation, resolution (latent = res / 8), batch. bf16 compute, f32 params
and optimizer, the trainer's own step (`dig_jax.train.make_train_step`). Prints a table last.
"""

import argparse
import json
import os
import subprocess
import sys
import time

# Default batches follow the measured anchors: 32 at 256 px, 2 at 1024 px, 1 above.
DEFAULT_BATCH = {256: 32, 512: 8, 1024: 2, 1792: 1, 2048: 1}


def variants(model_name):
    """(label, create_model overrides) for a model: DiT on both attention paths, DiG on each GLA impl."""
    if model_name.startswith("DiT"):
        return [("xla", {"attention_impl": "xla"}), ("cudnn", {"attention_impl": "cudnn"})]
    return [("xla", {"gla_impl": "xla"}), ("pallas", {"gla_impl": "pallas"})]


def run_case(model_name, overrides, res, batch, steps):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from ml_collections import ConfigDict

    from dig_jax.diffusion import create_diffusion
    from dig_jax.models import create_model, split_params
    from dig_jax.train import build_optimizer, freeze_long_lived_objects, init_state, make_train_step

    latent = res // 8
    model = create_model(model_name, input_size=latent, dtype="bfloat16", rngs=nnx.Rngs(0), **overrides)
    graphdef, params, rest = split_params(model)
    optimizer = ConfigDict(dict(learning_rate=1e-4, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=0,
                                grad_clip_norm=0.0))
    tx, schedule = build_optimizer(optimizer)
    state = jax.jit(init_state, static_argnums=(1, 2))(params, tx, 0)
    del params, model
    def latents_x0(frozen, batch, key):  # random latents stand in for VAE samples: the VAE is not timed here
        return batch["image"]

    step = jax.jit(make_train_step(graphdef, rest, create_diffusion(), tx, schedule, 0.9999, latents_x0),
                   donate_argnums=0)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.standard_normal((batch, latent, latent, 4)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)}
    started = time.perf_counter()
    state, metrics = step(state, batch, None)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - started
    freeze_long_lived_objects()  # as the trainer does after its first step
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        state, metrics = step(state, batch, None)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - started)
    if not np.isfinite(float(metrics["loss"])):
        raise RuntimeError(f"non-finite loss {metrics['loss']}")
    median = float(np.median(times))
    stats = jax.devices()[0].memory_stats() or {}
    return {"step_ms": 1e3 * median, "images_per_s": batch["image"].shape[0] / median,
            "peak_gib": stats.get("peak_bytes_in_use", float("nan")) / 2 ** 30, "compile_s": compile_s,
            "loss": float(metrics["loss"]), "device": jax.devices()[0].device_kind}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="DiG-S/2,DiT-S/2,DiG-XL/2,DiT-XL/2")
    parser.add_argument("--res", type=int, default=256, help="image resolution in pixels (latent = res / 8)")
    parser.add_argument("--batch", type=int, default=None, help=f"default by resolution: {DEFAULT_BATCH}")
    parser.add_argument("--variants", default="", help="comma list to keep, e.g. cudnn,pallas (default all)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--timeout", type=int, default=400, help="seconds per case")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()
    batch = args.batch or DEFAULT_BATCH.get(args.res, 1)

    if args.case:
        model_name, label = args.case.split("|")
        overrides = dict(variants(model_name))[label]
        print(json.dumps(run_case(model_name, overrides, args.res, batch, args.steps)))
        return

    keep = set(filter(None, args.variants.split(",")))
    python_path = os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": python_path}
    rows = []
    for model_name in args.models.split(","):
        for label, _ in variants(model_name):
            if keep and label not in keep:
                continue
            command = [sys.executable, __file__, "--case", f"{model_name}|{label}", "--res", str(args.res),
                       "--batch", str(batch), "--steps", str(args.steps)]
            row = {"model": model_name, "impl": label, "res": args.res, "batch": batch}
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env)
                lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
                errors = [line for line in done.stderr.splitlines() if "Error" in line] or done.stderr.splitlines()[-1:]
                row.update(json.loads(lines[-1]) if lines else {"error": errors[-1:]})
            except subprocess.TimeoutExpired:
                row["error"] = f"timeout after {args.timeout}s"
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print(f"\n{'model':10} {'impl':7} {'res':>5} {'batch':>5} {'step ms':>9} {'img/s':>9} {'peak GiB':>9} "
          f"{'compile s':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:10} {r['impl']:7} {r['res']:>5} {r['batch']:>5}  error: {r['error']}")
        else:
            print(f"{r['model']:10} {r['impl']:7} {r['res']:>5} {r['batch']:>5} {r['step_ms']:9.2f} "
                  f"{r['images_per_s']:9.1f} {r['peak_gib']:9.2f} {r['compile_s']:9.1f}")


if __name__ == "__main__":
    main()
