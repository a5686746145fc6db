"""The real trainer's images/s (`dig_jax.train.train`: data loading, stepping, logging) against its jitted step alone.

    python benchmarks/train_loop.py --models DiG-S/2,DiG-XL/2 --datasets shapes,latents --worker_counts 0,4 \
        --out loop.jsonl

Per (model, dataset, config.data.worker_count), in its own process ('latents' is read a batch at a time, as
config.data.batch_reads does by default; with --batch_reads 0 record by record, by the workers): (1) the training loop
runs `--steps` steps into a fresh workdir and the images/s it logs are read back from metrics.jsonl (the first interval,
which holds compilation, is dropped); (2) the same config's jitted step (`build_trainer`) runs back to back on one batch
already on the device, as the loop dispatches them (step_timing.time_step_calls, "pipelined"). The ratio (1)/(2) is what
the input pipeline and the loop's host work cost; "data wait" is the time per step the loop spent waiting for its next
batches, "place" the time per step it took to place them on the devices (`to_global_batch`) and "dispatch" the time per
step the step call took on the host (it returns before the device has finished the step). Where loop ms exceeds step ms
the host sets the pace: its time per step is data wait + place + dispatch + the loop's own work. The JSON rows also give
the step's synchronous time (each call waited for): its excess over the step time is host dispatch and launch gap.
Datasets: "shapes" (the built-in images, 32 px, pixel space) and "latents" (32x32x4 latents, as for 256 px
ImageNet, written here as random moments in the format `python -m dig_jax.encode` writes). bf16 compute.
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from results import report
from step_timing import time_step_calls


def write_random_latents(directory: str, num_records: int, latent_size: int = 32, num_classes: int = 1000,
                         writer_options: str | None = None) -> None:
    """A complete latent dir of random moments (mean, log-variance) with flipped views (dig_jax.data.latents), its
    shards written with `writer_options` (default: the format's, as `python -m dig_jax.encode` writes them)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from dig_jax.data.latents import SHARD_WRITER_OPTIONS, LatentLayout, serialize_records, write_metadata

    layout = LatentLayout(split="train", num_records=num_records, shard_size=num_records // 4, image_size=256,
                          latent_shape=(latent_size, latent_size, 4), dtype="float16", flipped=True,
                          scaling_factor=0.18215, shift_factor=None, source="random moments (benchmark)",
                          vae_config={}, vae_sha256="0" * 64)
    rng = np.random.default_rng(0)
    for shard in range(layout.num_shards):
        indices = layout.shard_range(shard)
        moments = rng.standard_normal((len(indices), *layout.moments_shape), np.float32)
        moments[..., 4:] = -2.0  # log-variance
        writer = ArrayRecordWriter(os.path.join(directory, layout.shard_name(shard)),
                                   writer_options or SHARD_WRITER_OPTIONS)
        for record in serialize_records(layout, moments, rng.integers(0, num_classes, len(indices))):
            writer.write(record)
        writer.close()
    write_metadata(directory, layout, complete=True)


def case_config(model_name: str, dataset: str, data_dir: str, steps: int, batch: int, steps_per_call: int,
                workers: int, read_threads: int | None = None, batch_reads: bool = True):
    from dig_jax.config_base import base_config

    c = base_config()
    c.model.name = model_name
    c.model.options = {}
    c.compute_dtype = "bfloat16"
    c.global_batch_size = batch
    c.num_steps = steps
    c.steps_per_call = steps_per_call
    c.log_every = max(steps // 10 // steps_per_call, 1) * steps_per_call
    c.checkpoint_every = steps
    c.sample.per_class = 0
    c.data.worker_count = workers
    c.data.batch_reads = batch_reads
    if dataset == "shapes":
        c.data.name, c.data.space, c.data.image_size = "shapes", "pixel", 32
        c.model.input_size, c.model.in_channels, c.model.num_classes = 32, 3, 12
        c.data.read_threads = 0  # computed in memory: threads only compete for the interpreter
    else:
        c.data.name, c.data.space, c.data.image_size = "latents", "latent", 256
        c.data.kwargs = {"data_dir": data_dir}
    if read_threads is not None:
        c.data.read_threads = read_threads
    return c


def run_case(model_name: str, dataset: str, steps: int, batch: int, steps_per_call: int, workers: int,
             read_threads: int | None, batch_reads: bool) -> dict:
    import jax

    import dig_jax.train
    from dig_jax.sharding import make_mesh
    from dig_jax.train import build_trainer, freeze_long_lived_objects, next_batches, to_global_batch, train

    # Seconds per call the loop waited for its batches, placed them on the devices, and spent in the step call.
    waits, placements, dispatches = [], [], []

    def timed(fn, seconds):
        def call(*args, **kwargs):
            started = time.perf_counter()
            result = fn(*args, **kwargs)
            seconds.append(time.perf_counter() - started)
            return result

        return call

    def timed_build_trainer(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        return dataclasses.replace(trainer, train_steps=timed(trainer.train_steps, dispatches))

    dig_jax.train.next_batches = timed(next_batches, waits)
    dig_jax.train.to_global_batch = timed(to_global_batch, placements)
    dig_jax.train.build_trainer = timed_build_trainer

    with tempfile.TemporaryDirectory() as scratch:
        data_dir = os.path.join(scratch, "latents")
        if dataset == "latents":
            os.makedirs(data_dir)
            write_random_latents(data_dir, num_records=8 * batch * steps_per_call + 1000)
        config = case_config(model_name, dataset, data_dir, steps, batch, steps_per_call, workers, read_threads,
                             batch_reads)
        workdir = os.path.join(scratch, "run")
        started = time.perf_counter()
        train(config, workdir)
        loop_s = time.perf_counter() - started
        dig_jax.train.next_batches, dig_jax.train.to_global_batch = next_batches, to_global_batch
        dig_jax.train.build_trainer = build_trainer
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            logged = [json.loads(line)["images_per_second"] for line in f][1:]

        # The same step alone: one batch from the same pipeline, placed once, stepped back to back.
        from dig_jax.data import create_dataset, make_loader

        trainer = build_trainer(config, make_mesh())
        source = create_dataset(config.data.name, split="train", image_size=config.data.image_size,
                                **config.data.kwargs.to_dict())
        loader = make_loader(source, global_batch_size=batch, seed=0, read_threads=config.data.read_threads)
        batches = to_global_batch(next_batches(loader, steps_per_call), trainer.data_sharding)
        loader.close()
        state = trainer.initial_state()
        state, metrics = trainer.train_steps(state, batches, trainer.space.frozen)
        jax.block_until_ready(metrics)
        freeze_long_lived_objects()
        calls = max(steps // steps_per_call // 6, 5)  # per window: 3 windows, each timed both ways
        _, _, call_s, synced_call_s = time_step_calls(
            lambda state: trainer.train_steps(state, batches, trainer.space.frozen), state, calls)
        step_images_per_s = steps_per_call * batch / call_s
    loop_images_per_s = float(np.median(logged))
    steady = slice(config.log_every // steps_per_call, None)  # after the first logged interval, as `logged`
    return {"loop_images_per_s": loop_images_per_s, "step_images_per_s": step_images_per_s,
            "ratio": loop_images_per_s / step_images_per_s, "loop_wall_s": loop_s,
            "loop_ms_per_step": 1e3 * batch / loop_images_per_s, "step_ms": 1e3 * batch / step_images_per_s,
            "synced_step_ms": 1e3 * synced_call_s / steps_per_call,  # each call waited for: adds dispatch time
            "data_wait_ms_per_step": 1e3 * float(np.mean(waits[steady])) / steps_per_call,
            "place_ms_per_step": 1e3 * float(np.mean(placements[steady])) / steps_per_call,
            # Host time in the step call (it returns before the device runs it): at or above "step_ms", the host's
            # dispatch, not the device, sets the loop's pace.
            "dispatch_ms_per_step": 1e3 * float(np.mean(dispatches[steady])) / steps_per_call,
            "read_threads": config.data.read_threads, "device": jax.devices()[0].device_kind}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="DiG-S/2,DiG-XL/2")
    parser.add_argument("--datasets", default="shapes,latents")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", default="DiG-S/2=400,DiG-XL/2=100",
                        help="steps per model (name=steps, comma list); other models 100")
    parser.add_argument("--steps_per_call", type=int, default=1)
    parser.add_argument("--worker_counts", default="0",
                        help="config.data.worker_count values to run (comma list): grain worker processes")
    parser.add_argument("--read_threads", type=int, default=None,
                        help="config.data.read_threads of every case (default: shapes 0, latents the config's)")
    parser.add_argument("--batch_reads", type=int, default=1, choices=(0, 1),
                        help="config.data.batch_reads: 1 reads 'latents' a batch at a time, 0 record by record")
    parser.add_argument("--timeout", type=int, default=400, help="seconds per case")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    parser.add_argument("--switch_interval", type=float, default=None,
                        help="sys.setswitchinterval for the case processes (seconds; Python's default 0.005)")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()
    steps = dict(item.split("=") for item in args.steps.split(",") if item)

    if args.case:
        if args.switch_interval:
            sys.setswitchinterval(args.switch_interval)
        model_name, dataset, workers = args.case.split("|")
        result = run_case(model_name, dataset, int(steps.get(model_name, 100)), args.batch, args.steps_per_call,
                          int(workers), args.read_threads, bool(args.batch_reads))
        print(json.dumps(result))
        return

    # The cases of one model compile the same step (twice each: the loop's and the step's): a shared persistent
    # compilation cache compiles it once.
    cache_dir = os.environ.get("JAX_COMPILATION_CACHE_DIR") or tempfile.mkdtemp(prefix="train_loop_jax_cache_")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])),
           "JAX_COMPILATION_CACHE_DIR": cache_dir, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    rows = []
    cases = [(m, d, w) for m in args.models.split(",") for d in args.datasets.split(",")
             for w in args.worker_counts.split(",")]
    for model_name, dataset, workers in cases:
        command = [sys.executable, __file__, "--case", f"{model_name}|{dataset}|{workers}",
                   "--batch", str(args.batch), "--steps", args.steps, "--steps_per_call", str(args.steps_per_call),
                   "--batch_reads", str(args.batch_reads)]
        command += ["--switch_interval", str(args.switch_interval)] if args.switch_interval else []
        command += ["--read_threads", str(args.read_threads)] if args.read_threads is not None else []
        row = {"model": model_name, "dataset": dataset, "batch": args.batch, "steps_per_call": args.steps_per_call,
               "worker_count": int(workers), "batch_reads": bool(args.batch_reads)}
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            row.update(json.loads(lines[-1]) if lines else {"error": done.stderr.splitlines()[-3:]})
        except subprocess.TimeoutExpired:
            row["error"] = f"timeout after {args.timeout}s"
        rows.append(row)
        report(row, args.out)
    print(f"\n{'model':9} {'dataset':8} {'batch':>5} {'per call':>8} {'workers':>7} {'loop img/s':>10} "
          f"{'step img/s':>10} {'ratio':>6} {'loop ms':>7} {'step ms':>7} {'data wait ms':>12} {'place ms':>8} "
          f"{'dispatch ms':>11} "
          f"{'threads':>7}")
    for r in rows:
        head = f"{r['model']:9} {r['dataset']:8} {r['batch']:>5} {r['steps_per_call']:>8} {r['worker_count']:>7}"
        print(f"{head}  error: {r['error']}" if "error" in r else
              f"{head} {r['loop_images_per_s']:10.1f} {r['step_images_per_s']:10.1f} {r['ratio']:6.2f} "
              f"{r['loop_ms_per_step']:7.2f} {r['step_ms']:7.2f} {r['data_wait_ms_per_step']:12.2f} "
              f"{r['place_ms_per_step']:8.2f} {r['dispatch_ms_per_step']:11.2f} {r['read_threads']:>7}")


if __name__ == "__main__":
    main()
