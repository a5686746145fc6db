"""Where a DiG block's time goes: forward + backward of single blocks, each component timed by leaving it out.

    python benchmarks/block_profile.py --model XL --batch 32 --grid 16 --out blocks.jsonl

For each of the four scan orders (block 0: raster, 1: reversed, 2: column-major, 3: reversed column-major) the
block's jitted forward + backward (gradients of its parameters and input for a random cotangent) is timed whole
and with one component replaced by something free of cost:
  gla        chunk_gla -> v passed through (the projections around it stay)
  conv       depthwise conv -> identity
  norms      the two adaLN LayerNorms -> identity
  gla_gate   the GLA output's RMSNorm-swish gate -> identity
A component's cost is (whole - without it). Block 2 minus block 0 is the grid transposes of the column-major
orders. A DiT block (cuDNN attention) of the same width is timed beside it. bf16 compute, the kernels DiG uses on
the GPU (gla_impl and conv_impl "pallas"). Prints a table last.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dig_jax.models import create_model
from dig_jax.models import dig as dig_module

SIZES = {"S": "DiG-S/2", "B": "DiG-B/2", "L": "DiG-L/2", "XL": "DiG-XL/2"}


ABLATIONS = {
    "whole": {},
    "gla": {"chunk_gla": lambda q, k, v, g, **_: (v, None)},
    "conv": {"depthwise_conv3x3": lambda x, kernel, bias, **_: x},
    "norms": {"layer_norm": lambda x, eps=1e-6: x},
    "gla_gate": {"rms_norm_swish_gate": lambda o, g, weight, **_: o},  # g is projected, not used
}


def time_block(block, h, c, repeats):
    graphdef, params, rest = nnx.split(block, nnx.Param, ...)
    cotangent = jax.random.normal(jax.random.key(9), h.shape, h.dtype)

    @jax.jit
    def step(params, h, c):
        out, vjp = jax.vjp(lambda p, h: nnx.merge(graphdef, p, rest)(h, c), params, h)
        return vjp(cotangent)

    jax.block_until_ready(step(params, h, c))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(params, h, c))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def profile_dig(model_name, batch, grid, repeats, blocks=(0, 1, 2, 3)):
    model = create_model(model_name, input_size=grid * 2, depth=4, dtype="bfloat16", gla_impl="pallas",
                         conv_impl="pallas", rngs=nnx.Rngs(0))
    d = model.config.hidden_size
    h = jax.random.normal(jax.random.key(0), (batch, grid * grid, d), jnp.bfloat16)
    c = jax.random.normal(jax.random.key(1), (batch, d), jnp.bfloat16)
    rows = []
    for index in blocks:
        block = model.blocks[index]
        for ablation, patches in ABLATIONS.items():
            saved = {name: getattr(dig_module, name) for name in patches}
            for name, replacement in patches.items():
                setattr(dig_module, name, replacement)
            try:
                rows.append({"block": index, "without": ablation, "ms": time_block(block, h, c, repeats)})
            finally:
                for name, original in saved.items():
                    setattr(dig_module, name, original)
    return rows


def profile_dit(model_name, batch, grid, repeats):
    model = create_model(model_name, input_size=grid * 2, depth=1, dtype="bfloat16", attention_impl="cudnn",
                         rngs=nnx.Rngs(0))
    d = model.config.hidden_size
    h = jax.random.normal(jax.random.key(0), (batch, grid * grid, d), jnp.bfloat16)
    c = jax.random.normal(jax.random.key(1), (batch, d), jnp.bfloat16)
    return [{"block": "DiT", "without": "whole", "ms": time_block(model.blocks[0], h, c, repeats)}]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="XL", choices=sorted(SIZES))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--grid", type=int, default=16, help="token grid side (16 = 256 px with patch 2)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--blocks", default="0,1,2,3", help="scan orders to time (block indices 0-3)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    name = SIZES[args.model]
    blocks = [int(index) for index in args.blocks.split(",")]
    rows = profile_dig(name, args.batch, args.grid, args.repeats, blocks)
    rows += profile_dit(name.replace("DiG", "DiT"), args.batch, args.grid, args.repeats)
    for row in rows:
        row.update(model=name, batch=args.batch, grid=args.grid, device=jax.devices()[0].device_kind)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    whole = {r["block"]: r["ms"] for r in rows if r["without"] == "whole"}
    print(f"\n{name} blocks, batch {args.batch}, {args.grid}x{args.grid} tokens: fwd+bwd ms "
          "(component = whole - without)")
    print(f"{'block':>6} {'whole':>7} " + " ".join(f"{a:>9}" for a in list(ABLATIONS)[1:]))
    for index in blocks:
        costs = [whole[index] - r["ms"] for r in rows if r["block"] == index and r["without"] != "whole"]
        print(f"{index:>6} {whole[index]:7.3f} " + " ".join(f"{cost:9.3f}" for cost in costs))
    print(f"{'DiT':>6} {whole['DiT']:7.3f}")


if __name__ == "__main__":
    main()
