"""DiG-XL/2-paper (16 heads: K=36, V=72) on the GPU: gla_impl="auto" must run the Pallas path (zero-padded heads)
and agree with the XLA chunked path, forward and gradients, on random weights.

    python benchmarks/paper_heads_check.py
"""

import jax
import jax.numpy as jnp
from flax import nnx

from dig_jax.models import create_model
from pallas_kernels.gla import resolve_impl


def main():
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 4))
    t, y = jnp.array([10, 300, 600, 999]), jnp.array([1, 2, 3, 4])
    results = {}
    for impl in ("auto", "xla"):
        model = create_model("DiG-XL/2-paper", rngs=nnx.Rngs(0), gla_impl=impl, dtype="bfloat16")
        # adaLN-Zero gates and the final layer start at zero: open them so the output depends on the GLA paths.
        for kernel in [block.adaLN_modulation.kernel for block in model.blocks] + [model.final_layer.linear.kernel]:
            kernel[...] = 0.02 * jax.random.normal(jax.random.key(1), kernel.shape)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p):
            return jnp.mean(jnp.square(nnx.merge(graphdef, p, rest)(x, t, y)))

        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        results[impl] = (value, grads["blocks"][0]["attn"]["in_proj"]["kernel"])
    (value, grad), (ref_value, ref_grad) = results["auto"], results["xla"]
    grad_err = float(jnp.linalg.norm(grad - ref_grad) / jnp.linalg.norm(ref_grad))
    print(f"auto resolves to {resolve_impl('auto')!r} on {jax.devices()[0].device_kind}; loss {float(value):.6f} "
          f"vs xla {float(ref_value):.6f}; first block in_proj grad rel err {grad_err:.2e}")
    assert resolve_impl("auto") == "pallas" and abs(float(value) / float(ref_value) - 1) < 1e-2 and grad_err < 5e-2


if __name__ == "__main__":
    main()
