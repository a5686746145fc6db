"""Runs the depthwise conv's Pallas kernels, forward + backward in bf16, a few times per shape and nothing else on
the GPU worth profiling: the program for Nsight Compute to read the kernels' counters (registers, occupancy, stall
reasons, instruction mix).

    ncu --clock-control none --kernel-name regex:depthwise_conv3x3 --launch-count 8 \\
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \\
        --section SchedulerStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \\
        --section InstructionStats python benchmarks/depthwise_conv_ncu.py --shapes S/256,XL/256

Each shape runs --calls times (forward kernel, backward kernel, the XLA sum of its partials): with two calls and
two shapes, --launch-count 8 captures every conv kernel launched.
"""

import argparse
import functools

import jax
import jax.numpy as jnp
from depthwise_conv import SHAPES, inputs, value_and_grads

from pallas_kernels.depthwise_conv import conv_pallas


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="S/256,XL/256")
    parser.add_argument("--calls", type=int, default=2)
    args = parser.parse_args()
    for name in args.shapes.split(","):
        if name not in SHAPES:
            parser.error(f"--shapes: {name!r} is not one of {sorted(SHAPES)}")
        n, grid, d = SHAPES[name]
        step = jax.jit(functools.partial(value_and_grads, conv_pallas, grid))
        conv_inputs = inputs(jax.random.key(0), n, grid, d, jnp.bfloat16)
        for _ in range(args.calls):
            jax.block_until_ready(step(*conv_inputs))


if __name__ == "__main__":
    main()
