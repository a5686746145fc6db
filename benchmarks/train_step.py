"""Step time, images/s, MFU and peak device memory of the trainer's jitted step (fwd + bwd + AdamW + EMA).

The step is the one `python -m dig_jax.train` runs (`dig_jax.train.build_trainer`), on one device, bf16 compute,
f32 parameters and optimizer, random latents (res / 8) as data. Each case runs in its own process so that its
peak memory is its own:
    python benchmarks/train_step.py --res 256,1024 --models DiG-S/2,DiT-S/2,DiG-XL/2,DiT-XL/2 --out results.jsonl
A case: model, variant (kernels, remat policy and GLA schedule, see VARIANTS), resolution, batch. MFU counts the
model FLOPs of `dig_jax.models.flops` (3x the forward pass, GLA and attention included) against --peak_tflops.
Prints a table last.

Two times per case, after the compiling step (step_timing.time_step_calls, 3 windows of `--steps` steps): "step ms"
with the steps dispatched back to back and waited for once, as the trainer runs them (the host dispatches step i + 1
while the device runs step i); images/s and MFU come from it. "synced ms" with each step waited for, which adds the
host's dispatch time and the launch gap to every step; rows in docs/benchmarks.md dated before this two-time table
report that one as their step time.

--profile DIR also traces `--steps` more steps of each case with jax.profiler (under DIR/<case>) and adds to its
row, and prints after the table, the GPU kernels per step by kind and the longest ones (benchmarks/kernel_trace.py).
"""

import argparse
import json
import os
import subprocess
import sys
import time

from kernel_trace import format_summary, summarize
from results import report
from step_timing import time_step_calls

# Default batches follow the measured anchors: 32 at 256 px, 2 at 1024 px, 1 above.
DEFAULT_BATCH = {256: 32, 512: 8, 1024: 2, 1792: 1, 2048: 1}
PEAK_BF16_TFLOPS = 989.0  # dense bf16 of an H100 / H200 SXM (datasheet)

PALLAS = {"gla_impl": "pallas", "conv_impl": "pallas"}
# family -> label -> (create_model options, remat policy, GLA Triton launch parameters or None for the defaults)
VARIANTS = {
    "DiG": {
        "pallas": (PALLAS, "none", None),
        "pallas-remat": (PALLAS, "matmuls", None),
        "pallas-sequential": (PALLAS, "none", {"chunk_parallel": False}),
        "pallas-chunk-parallel": (PALLAS, "none", {"chunk_parallel": True}),
        "lax-conv": ({"gla_impl": "pallas", "conv_impl": "conv"}, "none", None),
        "xla": ({"gla_impl": "xla", "conv_impl": "conv"}, "none", None),
    },
    "DiT": {
        "cudnn": ({"attention_impl": "cudnn"}, "none", None),
        "cudnn-remat": ({"attention_impl": "cudnn"}, "matmuls", None),
        "xla": ({"attention_impl": "xla"}, "none", None),
    },
}


def variants(model_name):
    return VARIANTS[model_name.split("-")[0]]


def run_case(model_name, label, res, batch, steps, profile_dir=None):
    import jax
    import numpy as np

    from dig_jax.config_base import base_config
    from dig_jax.models import model_config
    from dig_jax.models.flops import train_flops_per_image
    from dig_jax.sharding import make_mesh
    from dig_jax.train import build_trainer, freeze_long_lived_objects

    options, remat, triton_config = variants(model_name)[label]
    if triton_config:  # this case runs in its own process: the swap affects nothing else
        from pallas_kernels import gla_triton
        gla_triton.DEFAULT_CONFIG = gla_triton.TritonConfig(**triton_config)
    config = base_config()
    config.model.name, config.model.input_size = model_name, res // 8
    config.model.options = options
    config.compute_dtype, config.remat = "bfloat16", remat
    config.data.space = "pixel"  # x0 = the batch as given: random latents stand in for VAE samples
    config.global_batch_size = batch
    trainer = build_trainer(config, make_mesh(devices=jax.devices()[:1]))
    state = trainer.initial_state()
    rng = np.random.default_rng(0)
    batches = jax.device_put(
        {"image": rng.standard_normal((1, batch, res // 8, res // 8, 4)).astype(np.float32),
         "label": rng.integers(0, 1000, (1, batch)).astype(np.int32)}, trainer.data_sharding)
    started = time.perf_counter()
    state, metrics = trainer.train_steps(state, batches, trainer.space.frozen)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - started
    freeze_long_lived_objects()  # as the trainer does after its first step
    state, metrics, step_s, synced_s = time_step_calls(
        lambda state: trainer.train_steps(state, batches, trainer.space.frozen), state, steps)
    if not np.isfinite(float(metrics["loss"])):
        raise RuntimeError(f"non-finite loss {metrics['loss']}")
    stats = jax.devices()[0].memory_stats() or {}
    flops = train_flops_per_image(model_config(model_name, input_size=res // 8, **options))
    row = {"step_ms": 1e3 * step_s, "synced_step_ms": 1e3 * synced_s, "images_per_s": batch / step_s,
           "train_gflop_per_image": flops / 1e9, "tflops": flops * batch / step_s / 1e12,
           "peak_gib": stats.get("peak_bytes_in_use", float("nan")) / 2 ** 30,
           "compile_s": compile_s, "loss": float(metrics["loss"]), "device": jax.devices()[0].device_kind}
    if profile_dir:
        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            for _ in range(steps):
                state, metrics = trainer.train_steps(state, batches, trainer.space.frozen)
            jax.block_until_ready(metrics)
        row["kernels"] = summarize(profile_dir, steps)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="DiG-S/2,DiT-S/2,DiG-XL/2,DiT-XL/2")
    parser.add_argument("--res", default="256", help="comma list of image resolutions in pixels (latent = res / 8)")
    parser.add_argument("--batch", type=int, default=None, help=f"default by resolution: {DEFAULT_BATCH}")
    parser.add_argument("--variants", default="cudnn,pallas", help=f"comma list of labels to run, from {VARIANTS}")
    parser.add_argument("--peak_tflops", type=float, default=PEAK_BF16_TFLOPS, help="the device's bf16 peak, for MFU")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--timeout", type=int, default=400, help="seconds per case")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    parser.add_argument("--profile", default=None, help="trace each case's steps under this directory")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()

    if args.case:
        model_name, label = args.case.split("|")
        print(json.dumps(run_case(model_name, label, int(args.res), args.batch, args.steps, args.profile)))
        return

    keep = args.variants.split(",")
    python_path = os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": python_path}
    rows = []
    for res in map(int, args.res.split(",")):
        batch = args.batch or DEFAULT_BATCH.get(res, 1)
        for model_name in args.models.split(","):
            for label in [label for label in keep if label in variants(model_name)]:
                command = [sys.executable, __file__, "--case", f"{model_name}|{label}", "--res", str(res),
                           "--batch", str(batch), "--steps", str(args.steps)]
                if args.profile:
                    case_name = f"{model_name}_{label}_{res}".replace("/", "-")
                    command += ["--profile", os.path.join(os.path.abspath(args.profile), case_name)]
                row = {"model": model_name, "variant": label, "res": res, "batch": batch}
                try:
                    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env)
                    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
                    errors = ([line for line in done.stderr.splitlines() if "Error" in line]
                              or done.stderr.splitlines()[-1:])
                    row.update(json.loads(lines[-1]) if lines else {"error": errors[-1:]})
                except subprocess.TimeoutExpired:
                    row["error"] = f"timeout after {args.timeout}s"
                if "tflops" in row:
                    row["mfu"] = row["tflops"] / args.peak_tflops
                rows.append(row)
                report(row, args.out)
    print_table(rows)
    for row in rows:
        if "kernels" in row:
            print("\n" + format_summary(row["kernels"], f"{row['model']} {row['variant']} {row['res']} px"))


def print_table(rows):
    """One line per case; DiG rows also give img/s and peak memory relative to DiT-cuDNN of the same size and res."""
    dit = {(r["model"].replace("DiT", "DiG"), r["res"]): r for r in rows
           if r["model"].startswith("DiT") and r["variant"] == "cudnn" and "error" not in r}
    print(f"\n{'model':9} {'variant':12} {'res':>5} {'batch':>5} {'step ms':>8} {'synced ms':>9} {'img/s':>8} "
          f"{'GFLOP/img':>9} "
          f"{'MFU':>6} {'peak GiB':>8} {'compile s':>9}  vs DiT-cuDNN")
    for r in rows:
        head = f"{r['model']:9} {r['variant']:12} {r['res']:>5} {r['batch']:>5}"
        if "error" in r:
            print(f"{head}  error: {r['error']}")
            continue
        versus = dit.get((r["model"], r["res"])) if r["model"].startswith("DiG") else None
        ratio = (f"  {r['images_per_s'] / versus['images_per_s']:.2f}x speed, "
                 f"{r['peak_gib']:.2f} vs {versus['peak_gib']:.2f} GiB" if versus else "")
        print(f"{head} {r['step_ms']:8.2f} {r['synced_step_ms']:9.2f} {r['images_per_s']:8.1f} "
              f"{r['train_gflop_per_image']:9.1f} "
              f"{100 * r['mfu']:5.1f}% {r['peak_gib']:8.2f} {r['compile_s']:9.1f}{ratio}")


if __name__ == "__main__":
    main()
