"""Throughput of the evaluator (dig_jax.evaluation): Inception features per second, then the time of the metrics of
a 50K-sample evaluation (FID and sFID on the host, precision/recall's distance blocks on the device).

Usage, from the repository root on an accelerator machine:
    python benchmarks/evaluator_throughput.py [--batch_sizes 64,256] [--image_size 256] [--repeats 10]
        [--inception_weights PATH] [--num_samples 50000] [--num_reference 10000] [--out DIR]

Features: uint8 images [B, 256, 256, 3] from the host -> pool, spatial and logits features, the extractor's
compiled call on all local devices (what `python -m dig_jax.evaluate` runs per batch; reading the npz is not
included). Random weights unless --inception_weights is given (the time does not depend on the values). Times: a
warm-up call (compilation) first, then the median of `repeats` calls, each synchronised by fetching the features.
Metrics: random features of the evaluation's sizes; FID is timed at 2048 dimensions, sFID at 2023, precision and
recall with ADM's float16 distances.
"""

import argparse
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dig_jax.evaluation import FeatureExtractor, Statistics, frechet_distance, load_inception, precision_recall
from dig_jax.evaluation.convert_inception import inception_from_state_dict, random_state_dict
from dig_jax.evaluation.inception import FEATURE_SIZE, SPATIAL_FEATURE_SIZE


def time_features(model, batch_size: int, image_size: int, repeats: int) -> dict:
    extractor = FeatureExtractor(model, batch_size)
    images = np.random.default_rng(1).integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
    started = time.perf_counter()
    features = extractor([images])
    first_call = time.perf_counter() - started
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        extractor([images])
        times.append(time.perf_counter() - started)
    median = statistics.median(times)
    return {"batch": batch_size, "image_size": image_size, "finite": bool(np.isfinite(features.pool).all()),
            "first_call_s": round(first_call, 2), "median_ms": round(1e3 * median, 2),
            "images_per_s": round(batch_size / median, 1)}


def time_metrics(num_samples: int, num_reference: int) -> dict:
    rng = np.random.default_rng(0)
    timings = {}
    for name, size in (("fid_s", FEATURE_SIZE), ("sfid_s", SPATIAL_FEATURE_SIZE)):
        a = Statistics.of(np.abs(rng.standard_normal((num_samples // 10, size))))
        b = Statistics.of(np.abs(rng.standard_normal((num_samples // 10, size))) + 0.1)
        started = time.perf_counter()
        frechet_distance(a, b)
        timings[name] = round(time.perf_counter() - started, 2)
    samples = np.abs(rng.standard_normal((num_samples, FEATURE_SIZE), np.float32))
    reference = np.abs(rng.standard_normal((num_reference, FEATURE_SIZE), np.float32))
    started = time.perf_counter()
    precision, recall = precision_recall(reference, samples)
    timings["precision_recall_s"] = round(time.perf_counter() - started, 2)
    return {"num_samples": num_samples, "num_reference": num_reference, **timings,
            "precision": precision, "recall": recall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_sizes", default="64,256")
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--inception_weights", default=None, help="pytorch-fid's .pth or its .safetensors")
    parser.add_argument("--num_samples", type=int, default=50_000)
    parser.add_argument("--num_reference", type=int, default=10_000)
    parser.add_argument("--out", default=None, help="folder for evaluator_throughput.jsonl")
    args = parser.parse_args()
    devices = jax.local_devices()
    print(f"{len(devices)} x {devices[0].device_kind}, jax {jax.__version__}", flush=True)
    model = (load_inception(args.inception_weights) if args.inception_weights
             else inception_from_state_dict(random_state_dict()))
    rows = [{"devices": len(devices), "device_kind": devices[0].device_kind,
             **time_features(model, batch_size, args.image_size, args.repeats)}
            for batch_size in map(int, args.batch_sizes.split(","))]
    rows.append({"devices": len(devices), "device_kind": devices[0].device_kind,
                 **time_metrics(args.num_samples, args.num_reference)})
    for row in rows:
        print(json.dumps(row), flush=True)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "evaluator_throughput.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
