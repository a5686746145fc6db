"""Data-parallel training throughput: the trainer's jitted step on one device and on all visible devices.

Default workload: DiG-S/2 on 256 px ImageNet latents (32 x 32 x 4 inputs), 32 examples per device, bfloat16
compute (float32 parameters and Adam state), mesh data=N x fsdp=1. The step is `dig_jax.train`'s: diffusion loss,
AdamW, EMA, state donated, batch split over the devices; x0 is fed directly (random latents), so it leaves out
only the posterior sample of pre-encoded latents, one elementwise op.

Usage, from the repository root on a GPU machine:
    python benchmarks/data_parallel.py [--model DiG-S/2] [--batch_per_device 32] [--steps 30] [--warmup 5] \
        [--steps_per_call 1]
CPU check with a tiny model:
    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu python benchmarks/data_parallel.py \
        --options depth=1,hidden_size=64,num_heads=2 --input_size 8 --batch_per_device 2 --steps 3 --warmup 1

Times, after --warmup calls (the first one compiles), as step_timing.time_step_calls takes them: "pipelined",
--steps calls dispatched back to back and waited for once, as the trainer runs them (it only waits for the device
at log and checkpoint steps), the median over 3 windows; and "synchronous", every call waited for, which adds the
host's dispatch time to each call, the median over all such calls. Each call runs --steps_per_call train steps
(the trainer's config.steps_per_call: a scan over that many batches); times are per train step.
Scaling efficiency = images/s on N devices / (N x images/s on one device), from the pipelined times.
"""

import argparse
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from step_timing import time_step_calls

from dig_jax.config_base import paper_config
from dig_jax.sharding import make_mesh
from dig_jax.train import build_trainer, freeze_long_lived_objects


def parse_options(text: str) -> dict:
    """"depth=1,hidden_size=64,gla_impl=xla" -> {"depth": 1, "hidden_size": 64, "gla_impl": "xla"}."""
    options = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--options items must be key=value, got {item!r}")
        options[key] = int(value) if value.lstrip("-").isdigit() else value
    return options


def benchmark_config(args):
    config = paper_config(args.model)
    config.model.input_size = args.input_size
    config.model.options = args.options
    config.data.space = "pixel"  # x0 = batch["image"]: the random latents below
    config.data.image_size = args.input_size
    config.compute_dtype = args.compute_dtype
    return config


def time_steps(config, devices, batch_per_device: int, warmup: int, steps: int,
               steps_per_call: int = 1) -> tuple[float, float]:
    """(pipelined, synchronous) seconds per train step with the batch split over `devices` (a data-parallel
    mesh), `steps_per_call` steps per dispatch as the trainer's config.steps_per_call; see the module docstring.
    warmup and steps count calls."""
    trainer = build_trainer(config, make_mesh(data=len(devices), fsdp=1, devices=devices))
    state, step, frozen = trainer.initial_state(), trainer.train_steps, trainer.space.frozen

    rng = np.random.default_rng(0)
    size, channels = config.model.input_size, config.model.in_channels
    global_batch = batch_per_device * len(devices)
    batch = jax.device_put({
        "image": rng.standard_normal((steps_per_call, global_batch, size, size, channels), np.float32),
        "label": rng.integers(0, config.model.num_classes, (steps_per_call, global_batch)).astype(np.int32)},
        trainer.data_sharding)

    for _ in range(warmup):
        state, metrics = step(state, batch, frozen)
    jax.block_until_ready(metrics["loss"])
    freeze_long_lived_objects()  # as the trainer does after its first step
    _, metrics, pipelined, synchronous = time_step_calls(lambda state: step(state, batch, frozen), state, steps)
    if not np.isfinite(float(metrics["loss"])):
        raise RuntimeError(f"non-finite loss {float(metrics['loss'])} on {len(devices)} device(s)")
    return pipelined / steps_per_call, synchronous / steps_per_call


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="DiG-S/2")
    parser.add_argument("--input_size", type=int, default=32, help="latent side (32 for 256 px images)")
    parser.add_argument("--options", type=parse_options, default={},
                        help="model overrides, e.g. depth=1,hidden_size=64,num_heads=2,gla_impl=xla")
    parser.add_argument("--batch_per_device", type=int, default=32)
    parser.add_argument("--compute_dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--warmup", type=int, default=5, help="calls")
    parser.add_argument("--steps", type=int, default=30, help="calls per timing window")
    parser.add_argument("--steps_per_call", type=int, default=1, help="train steps per call (config.steps_per_call)")
    parser.add_argument("--out", default="", help="folder for data_parallel.json (optional)")
    args = parser.parse_args()
    if min(args.warmup, args.steps, args.steps_per_call) < 1:
        parser.error("--warmup, --steps and --steps_per_call must be >= 1 (the first call compiles)")

    config = benchmark_config(args)
    devices = jax.devices()
    print(f"{args.model} {args.options or ''} input {args.input_size}x{args.input_size}x{config.model.in_channels}, "
          f"{args.batch_per_device} per device, {args.compute_dtype}, {args.steps_per_call} step(s) per call; "
          f"{len(devices)} x {devices[0].device_kind}, "
          f"jax {jax.__version__}", flush=True)
    rows = []
    for count in sorted({1, len(devices)}):
        seconds, synchronous = time_steps(config, devices[:count], args.batch_per_device, args.warmup, args.steps,
                                          args.steps_per_call)
        images_per_second = args.batch_per_device * count / seconds
        rows.append({"devices": count, "global_batch": args.batch_per_device * count, "step_ms": 1e3 * seconds,
                     "synchronous_step_ms": 1e3 * synchronous, "images_per_second": images_per_second,
                     "efficiency": images_per_second / (count * rows[0]["images_per_second"]) if rows else 1.0})
        print(f"measured {count} device(s): {1e3 * seconds:.2f} ms/step pipelined, {1e3 * synchronous:.2f} "
              "synchronous", flush=True)

    print(f"\n{'devices':>7} {'global batch':>12} {'ms/step':>9} {'sync ms':>9} {'images/s':>10} {'per device':>10} "
          f"{'efficiency':>10}")
    for r in rows:
        print(f"{r['devices']:>7} {r['global_batch']:>12} {r['step_ms']:>9.2f} {r['synchronous_step_ms']:>9.2f} "
              f"{r['images_per_second']:>10.1f} {r['images_per_second'] / r['devices']:>10.1f} "
              f"{r['efficiency']:>10.1%}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "data_parallel.json"), "w") as f:
            json.dump({"model": args.model, "options": args.options, "input_size": args.input_size,
                       "batch_per_device": args.batch_per_device, "compute_dtype": args.compute_dtype,
                       "steps_per_call": args.steps_per_call,
                       "device_kind": devices[0].device_kind, "jax": jax.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
