"""What the GLA output gate's custom VJP (`pallas_kernels.output_gate`, impl "xla") saves: the temporary memory of
DiG's compiled gradient (XLA's buffer assignment, `memory_analysis`) with the gate as it is and with the same
formula left to autodiff. No accelerator needed: it compiles for the host CPU.

    python benchmarks/output_gate_memory.py --model DiG-XL/2 --depths 2,4 --batch 8

The loss is the mean square of the model's output on random latents (256 px: 32x32x4), bf16 compute, gla_impl
"xla" and conv_impl "shifted" (the paths that compile for a CPU; the GPU's Pallas kernels keep fewer intermediates
of their own, the gate's are the same). Two depths give the cost per block (the difference over the blocks
added). These are estimates of the CPU compilation, not GPU measurements: XLA:GPU fuses and schedules differently.
"""

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

import dig_jax.models.dig as dig
from dig_jax.models import create_model
from pallas_kernels.output_gate import gate_reference

MIB = 2 ** 20


def gradient_temp_mib(model_name: str, depth: int, batch: int) -> float:
    model = create_model(model_name, rngs=nnx.Rngs(0), dtype="bfloat16", depth=depth, input_size=32,
                         gla_impl="xla", conv_impl="shifted")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, x, t, y):
        return jnp.mean(jnp.square(nnx.merge(graphdef, params, rest)(x, t, y).astype(jnp.float32)))

    x = jax.ShapeDtypeStruct((batch, 32, 32, 4), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    compiled = jax.jit(jax.grad(loss)).lower(params, x, labels, labels).compile()
    return compiled.memory_analysis().temp_size_in_bytes / MIB


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiG-XL/2")
    parser.add_argument("--depths", default="2,4", help="two depths: the per-block cost is their difference")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    custom_gate = dig.rms_norm_swish_gate

    def autodiff_gate(o, g, weight, *, eps, impl):
        del impl
        return gate_reference(o, g, weight, eps)

    rows = {}
    for name, gate in (("custom VJP", custom_gate), ("autodiff", autodiff_gate)):
        dig.rms_norm_swish_gate = gate  # the module global GatedLinearAttention calls
        rows[name] = [gradient_temp_mib(args.model, depth, args.batch) for depth in depths]
    dig.rms_norm_swish_gate = custom_gate
    added_blocks = depths[-1] - depths[0]
    print(f"{args.model}, batch {args.batch}, 32x32x4 latents: temporary MiB of the compiled gradient")
    print(f"{'gate':12} " + " ".join(f"{f'depth {d}':>10}" for d in depths) + f" {'per block':>10}")
    for name, temps in rows.items():
        print(f"{name:12} " + " ".join(f"{t:10.1f}" for t in temps) + f" {(temps[-1] - temps[0]) / added_blocks:10.1f}")


if __name__ == "__main__":
    main()
