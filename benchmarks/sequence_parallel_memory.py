"""Per-device memory of DiG's train step with each image's tokens split over `seq` devices, from XLA's compiled
memory analysis; no accelerator needed (without one it compiles for 8 host CPU devices).

    python benchmarks/sequence_parallel_memory.py --model DiG-XL/2 --res 2048,4096 --seq 1,2,4,8 --depths 2,4
    # on a machine with 8 GPUs: compile the whole model for the GPUs, run one step, read the peak memory
    python benchmarks/sequence_parallel_memory.py --res 2048,4096 --seq 1,2,4,8 --depths 28 --run

The step is the trainer's (`dig_jax.train.make_train_step`: diffusion loss, AdamW, EMA, state donated) on a mesh
data=1 x fsdp=1 x seq=S of the first S devices with one image, bfloat16 compute, float32 parameters and Adam
state, gla_impl and conv_impl "auto" (on CPU the "xla" GLA path and the "shifted" conv; on GPU the Pallas
kernels). Per device it reports the state (parameters, Adam moments, EMA: arguments of the step, replicated over
"seq") and XLA's temporary buffers (activations kept for the backward pass and workspace), as
`jax.jit(...).lower(...).compile().memory_analysis()` gives them; peak = arguments + outputs - aliased (the
donated state) + temporaries. --run also runs one step and reports the devices' measured peak (peak_bytes_in_use,
which CPUs do not report).

Full DiG-XL/2 (28 blocks) at 65,536 tokens takes long to compile on CPU, so by default the step is compiled at two
reduced depths (--depths, both with every scan order when >= 4) and each quantity is extrapolated linearly to the
model's depth: blocks are identical up to their scan order, so state and saved activations grow by the same amount
per block. --depths with one value equal to the model's depth compiles the full model instead.

These are estimates of the CPU compilation's buffer assignment, not GPU measurements: XLA:GPU fuses and schedules
differently, and impl="pallas" (the GPU path) keeps fewer intermediates than the "xla" GLA path compiled here.
Needs 8 host devices for seq=8 (the script sets XLA_FLAGS itself when run directly).
"""

import argparse
import os
import sys
import time

if __name__ == "__main__":  # before jax initialises: 8 host CPU devices, for meshes of up to 8 when no GPU is present
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import ConfigDict  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from results import report  # noqa: E402

from dig_jax.diffusion import create_diffusion  # noqa: E402
from dig_jax.models import MODELS, create_model, split_params  # noqa: E402
from dig_jax.models.sequence_parallel import SEQUENCE_AXIS  # noqa: E402
from dig_jax.sharding import batch_sharding, make_mesh, state_shardings  # noqa: E402
from dig_jax.train import make_train_step  # noqa: E402
from dig_jax.train_state import build_optimizer, init_state  # noqa: E402

GIB = 2 ** 30
ADAMW = dict(learning_rate=1e-4, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=0, grad_clip_norm=0.0)


def compiled_memory(model_name: str, latent: int, seq: int, depth: int, remat: str, batch: int = 1,
                    run: bool = False) -> dict:
    """Bytes per device of the compiled train step (dict of memory_analysis fields, plus "peak"); with `run`,
    also "measured_peak", the largest peak_bytes_in_use over the mesh's devices after one step (NaN on CPU)."""
    mesh = make_mesh(data=1, fsdp=1, seq=seq, devices=jax.devices()[:seq])
    model = create_model(model_name, input_size=latent, dtype="bfloat16", gla_impl="auto", conv_impl="auto",
                         remat=remat, depth=depth, sequence_axis=SEQUENCE_AXIS, rngs=nnx.Rngs(0))
    graphdef, params, rest = split_params(model)
    tx, schedule = build_optimizer(ConfigDict(ADAMW))
    abstract_state = jax.eval_shape(lambda: init_state(params, tx, 0))
    shardings = state_shardings(abstract_state, mesh)
    diffusion = create_diffusion()

    def step(state, batch, rest):  # the model's fixed state (position embedding) is an argument, not a constant
        return make_train_step(graphdef, rest, diffusion, tx, schedule, 0.9999, lambda _, b, __: b["image"])(
            state, batch, None)

    abstract_batch = {"image": jax.ShapeDtypeStruct((batch, latent, latent, 4), jnp.float32),
                      "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
    abstract_rest = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), rest)
    data = batch_sharding(mesh)
    with jax.set_mesh(mesh):
        compiled = jax.jit(step, in_shardings=(shardings, data, None), out_shardings=(shardings, None),
                           donate_argnums=0).lower(abstract_state, abstract_batch, abstract_rest).compile()
    analysis = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")
    memory = {name.removesuffix("_size_in_bytes"): int(getattr(analysis, name)) for name in fields}
    memory["peak"] = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
    if run:
        state = jax.jit(lambda p: init_state(p, tx, 0), out_shardings=shardings)(params)
        keys = jax.random.split(jax.random.key(0))
        images = {"image": jax.random.normal(keys[0], abstract_batch["image"].shape),
                  "label": jax.random.randint(keys[1], abstract_batch["label"].shape, 0, 1000)}
        state, metrics = compiled(state, jax.device_put(images, data), rest)
        jax.block_until_ready((state, metrics))
        peaks = [(device.memory_stats() or {}).get("peak_bytes_in_use", float("nan")) for device in mesh.devices.flat]
        memory["measured_peak"] = max(peaks)
    return memory


def extrapolate(by_depth: dict, depth: int) -> dict:
    """Linear in depth through two compiled depths: {d1: memory, d2: memory} -> memory at `depth`."""
    (d1, m1), (d2, m2) = sorted(by_depth.items())
    return {key: m1[key] + (m2[key] - m1[key]) * (depth - d1) / (d2 - d1) for key in m1}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiG-XL/2")
    parser.add_argument("--res", default="2048,4096", help="image resolutions in pixels (latent = res / 8)")
    parser.add_argument("--seq", default="1,2,4,8", help="sequence-parallel sizes")
    parser.add_argument("--depths", default="2,4", help="two depths to compile and extrapolate from, or the "
                                                        "model's own depth")
    parser.add_argument("--remat", default="none", help="config.remat of the blocks: none, matmuls or full")
    parser.add_argument("--run", action="store_true", help="also run one step and report the measured peak "
                                                           "(needs --depths equal to the model's depth)")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    args = parser.parse_args()
    if args.model not in MODELS or not args.model.startswith("DiG"):
        parser.error(f"--model must be a DiG model name, got {args.model!r}")
    full_depth = MODELS[args.model][2]["depth"]
    depths = [int(d) for d in args.depths.split(",")]
    if not (depths == [full_depth] or (len(depths) == 2 and depths[0] != depths[1])):
        parser.error(f"--depths must be two different depths or the model's depth {full_depth}, got {args.depths}")
    if args.run and depths != [full_depth]:
        parser.error(f"--run measures the whole model: it needs --depths {full_depth}")

    rows = []
    for res in (int(r) for r in args.res.split(",")):
        latent = res // 8
        for seq in (int(s) for s in args.seq.split(",")):
            started = time.perf_counter()
            by_depth = {depth: compiled_memory(args.model, latent, seq, depth, args.remat, run=args.run)
                        for depth in depths}
            memory = by_depth[full_depth] if depths == [full_depth] else extrapolate(by_depth, full_depth)
            row = {"model": args.model, "res": res, "tokens": (latent // 2) ** 2, "seq": seq, "remat": args.remat,
                   "compiled_depths": depths, "compile_s": round(time.perf_counter() - started, 1),
                   **{f"{key}_gib": round(value / GIB, 2) for key, value in memory.items()}}
            rows.append(row)
            report(row, args.out)
    print(f"\n{'res':>5} {'tokens':>7} {'seq':>4} {'state GiB':>10} {'temp GiB':>9} {'peak GiB':>9}")
    for r in rows:
        print(f"{r['res']:>5} {r['tokens']:>7} {r['seq']:>4} {r['argument_gib']:>10.2f} {r['temp_gib']:>9.2f} "
              f"{r['peak_gib']:>9.2f}")


if __name__ == "__main__":
    main()
