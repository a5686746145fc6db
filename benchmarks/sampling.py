"""Sampling throughput (images/s) of DiG and DiT for DDPM, DDIM and DPM-Solver++(2M) with classifier-free guidance.

    python benchmarks/sampling.py --out sampling.jsonl
    python benchmarks/sampling.py --models DiG-S/8 --samplers ddim:2,dpm++2m:2 --res 64 --batch 4 --repeats 1  # CPU

A case: model with random weights (bf16 compute, f32 parameters), latent res / 8 (32x32x4 at 256 px), one sampler
with its step count, `--cfg_scale` (the guided batch is twice `--batch`), the batch split over this process's
devices as `python -m dig_jax.sample` does (`dig_jax.sampling.generate`). The first call compiles; the median of
`--repeats` further calls is the time of a batch. The VAE decode is not timed (sampling.py returns latents).
Prints one JSON line per case (appended to --out too) and a table last.
"""

import argparse
import os
import sys
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from results import report  # noqa: E402

from dig_jax.models import create_model  # noqa: E402
from dig_jax.sampling import generate, image_keys, random_classes, replicate_locally  # noqa: E402

DEFAULT_SAMPLERS = "ddpm:250,ddim:50,dpm++2m:20"


def model_options(name: str, args) -> dict:
    return {"gla_impl": args.gla_impl} if name.startswith("DiG") else {"attention_impl": args.attention_impl}


def run_case(model, sampler: str, num_steps: int, args) -> dict:
    labels = random_classes(0, args.batch, model.config.num_classes)
    settings = dict(sampler=sampler, num_steps=num_steps, cfg_scale=args.cfg_scale)
    started = time.perf_counter()
    jax.block_until_ready(generate(model, labels, image_keys(0, 0, args.batch), **settings))
    compile_s = time.perf_counter() - started
    times = []
    for repeat in range(1, args.repeats + 1):
        keys = image_keys(0, repeat * args.batch, args.batch)  # new images each call
        started = time.perf_counter()
        samples = jax.block_until_ready(generate(model, labels, keys, **settings))
        times.append(time.perf_counter() - started)
    if not np.isfinite(np.asarray(samples)).all():
        raise RuntimeError("non-finite samples")
    median = float(np.median(times))
    return {"batch_s": median, "images_per_s": args.batch / median, "ms_per_step": 1e3 * median / num_steps,
            "first_call_s": compile_s}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="DiG-XL/2,DiT-XL/2")
    parser.add_argument("--samplers", default=DEFAULT_SAMPLERS, help=f"sampler:steps list (default {DEFAULT_SAMPLERS})")
    parser.add_argument("--cfg_scale", type=float, default=1.5)
    parser.add_argument("--res", type=int, default=256, help="image resolution in pixels (latent = res / 8)")
    parser.add_argument("--batch", type=int, default=64, help="images per sampling call")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per case after the compiling one")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype (parameters stay float32)")
    parser.add_argument("--gla_impl", default="auto", help="DiG's chunk_gla implementation")
    parser.add_argument("--attention_impl", default="xla", help="DiT's attention: xla or cudnn (GPU)")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    args = parser.parse_args()
    cases = [(name, step.split(":")[0], int(step.split(":")[1])) for name in args.models.split(",")
             for step in args.samplers.split(",")]

    rows, models = [], {}
    for name, sampler, num_steps in cases:
        if name not in models:
            models.clear()  # one model in memory at a time
            models[name] = create_model(name, input_size=args.res // 8, dtype=args.dtype, rngs=nnx.Rngs(0),
                                        **model_options(name, args))
            replicate_locally(models[name])
        row = {"model": name, "sampler": sampler, "steps": num_steps, "cfg_scale": args.cfg_scale, "res": args.res,
               "batch": args.batch, "devices": jax.local_device_count(), "device": jax.devices()[0].device_kind,
               "dtype": args.dtype, **model_options(name, args)}
        try:
            row.update(run_case(models[name], sampler, num_steps, args))
        except Exception as error:  # one failing case (e.g. out of memory) must not lose the others' numbers
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        rows.append(row)
        report(row, args.out)

    print(f"\n{'model':10} {'sampler':8} {'steps':>5} {'batch':>5} {'img/s':>9} {'ms/step':>9} {'first call s':>12}")
    for r in rows:
        head = f"{r['model']:10} {r['sampler']:8} {r['steps']:>5} {r['batch']:>5}"
        if "error" in r:
            print(f"{head}  error: {r['error']}")
        else:
            print(f"{head} {r['images_per_s']:9.2f} {r['ms_per_step']:9.1f} {r['first_call_s']:12.1f}")


if __name__ == "__main__":
    main()
