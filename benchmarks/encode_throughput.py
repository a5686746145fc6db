"""Throughput of the latent encode job's jitted step (dig_jax.vae_programs.make_encode_fn) with the Stable Diffusion VAE
architecture (sd-vae-ft-ema's config, random weights built in memory: no download, no dataset).

Usage, from the repository root on an accelerator machine:
    python benchmarks/encode_throughput.py [--batch_sizes 64,128] [--dtypes bfloat16,float32] [--flip]
        [--image_size 256] [--repeats 20] [--out DIR]

Each row times the function `python -m dig_jax.encode` calls per batch: uint8 images [B, 256, 256, 3] from the host
-> moments [B, views, 32, 32, 8] float16, on all local devices, in the VAE compute dtype (config.vae.compute_dtype).
Without --flip one encoder pass per image; with --flip (the encode config's default) two, so the job's images/s is
about half. Times: a warm-up call (compilation) first, then the median over `repeats` back-to-back calls, each
synchronised by fetching its output to the host as the job does. Reading and decoding JPEGs is not included.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dig_jax.vae import AutoencoderKLConfig, diffusers_param_shapes, vae_from_state_dict
from dig_jax.vae_programs import make_encode_fn

# stabilityai/sd-vae-ft-ema's config.json (the other fields are the defaults).
SD_VAE = AutoencoderKLConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                             norm_num_groups=32, scaling_factor=0.18215)


def random_sd_vae(dtype: str):
    """SD VAE with random weights (1/sqrt(fan_in) scale, so activations stay finite), float32 parameters."""
    rng = np.random.default_rng(0)
    state_dict = {}
    for key, shape in diffusers_param_shapes(SD_VAE).items():
        scale = 1 / math.sqrt(math.prod(shape[1:])) if len(shape) > 1 else 0.1
        state_dict[key] = (rng.standard_normal(shape, np.float32) * scale).astype(np.float32)
    return vae_from_state_dict(SD_VAE, state_dict, dtype=dtype)


def time_encode(vae, batch_size: int, image_size: int, flip: bool, repeats: int) -> dict:
    encode = make_encode_fn(vae, flip=flip, dtype="float16")
    images = np.random.default_rng(1).integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
    started = time.perf_counter()
    moments = np.asarray(encode(images))
    compile_s = time.perf_counter() - started
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        np.asarray(encode(images))
        times.append(time.perf_counter() - started)
    median = statistics.median(times)
    return {"batch": batch_size, "image_size": image_size, "flip": flip, "finite": bool(np.isfinite(moments).all()),
            "first_call_s": round(compile_s, 2), "median_ms": round(1e3 * median, 2),
            "images_per_s": round(batch_size / median, 1), "output_shape": list(moments.shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_sizes", default="64,128")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="VAE compute dtypes")
    parser.add_argument("--flip", action="store_true", help="also encode each mirrored image (the job's default)")
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None, help="folder for encode_throughput.jsonl")
    args = parser.parse_args()
    devices = jax.local_devices()
    print(f"{len(devices)} x {devices[0].device_kind}, jax {jax.__version__}", flush=True)
    rows = []
    for dtype in args.dtypes.split(","):
        vae = random_sd_vae(dtype)
        for batch_size in map(int, args.batch_sizes.split(",")):
            row = {"compute_dtype": dtype, "devices": len(devices), "device_kind": devices[0].device_kind,
                   **time_encode(vae, batch_size, args.image_size, args.flip, args.repeats)}
            print(json.dumps(row), flush=True)
            rows.append(row)
            if args.out:
                os.makedirs(args.out, exist_ok=True)
                with open(os.path.join(args.out, "encode_throughput.jsonl"), "a") as f:
                    f.write(json.dumps(row) + "\n")
    print(f"\n{'dtype':>9} {'batch':>5} {'flip':>5} {'ms/batch':>9} {'images/s':>9} {'first call s':>12}")
    for r in rows:
        print(f"{r['compute_dtype']:>9} {r['batch']:>5} {str(r['flip']):>5} {r['median_ms']:>9} "
              f"{r['images_per_s']:>9} {r['first_call_s']:>12}")


if __name__ == "__main__":
    main()
