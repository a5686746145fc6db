"""Model FLOP counts against the matmuls and convolutions the models really trace."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jax_core

from dig_jax.models import create_model, model_config
from dig_jax.models.flops import GLA_CHUNK, dig_block_macs_per_token, forward_flops_per_image, tokens_per_image
from pallas_kernels import gla_layer

TINY = dict(input_size=8, depth=3, hidden_size=64, num_heads=2, num_classes=10)


def traced_matmul_flops(fn, *args) -> int:
    """2 x multiply-adds of every dot_general and convolution in fn's jaxpr (scan bodies times their length)."""

    def count(jaxpr) -> int:
        total = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                (lhs_contract, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[i] for i in lhs_contract]))
            elif eqn.primitive.name == "conv_general_dilated":
                rhs = eqn.invars[1].aval.shape  # per output element: the filter's size over its output features
                out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
                total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod(rhs)) // out_features
            for sub in jax_core.jaxprs_in_params(eqn.params):
                total += count(sub) * (eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1)
        return total

    return count(jax.make_jaxpr(fn)(*args).jaxpr)


def _forward_flops_traced(model, batch=2):
    x = jnp.zeros((batch, 8, 8, 4))
    t, y = jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.int32)
    return traced_matmul_flops(lambda x: model(x, t, y), x) // batch


def test_dit_count_equals_traced_matmuls():
    model = create_model("DiT-S/2", rngs=nnx.Rngs(0), **TINY)
    assert forward_flops_per_image(model.config) == _forward_flops_traced(model)


@pytest.mark.parametrize("name", ["DiG-S/2", "DiG-S/2-U"])
def test_dig_count_equals_traced_matmuls_plus_gla_and_conv(name, monkeypatch):
    """With the GLA op replaced by a copy of v (no products), the traced matmuls are the count without the GLA's
    work and the conv's multiply-adds (the CPU conv path is elementwise)."""
    monkeypatch.setattr(gla_layer, "chunk_gla", lambda q, k, v, g, **_: (v, None))
    config = dict(TINY, depth=4) if name.endswith("-U") else TINY
    model = create_model(name, rngs=nnx.Rngs(0), **config)
    c = model.config
    key_dim, value_dim = c.hidden_size // 2 // c.num_heads, c.hidden_size // c.num_heads
    gla = c.num_heads * (GLA_CHUNK * (key_dim + value_dim) + 2 * key_dim * value_dim)
    not_traced = 2 * c.depth * tokens_per_image(c) * (gla + 9 * c.hidden_size)
    assert forward_flops_per_image(c) - not_traced == _forward_flops_traced(model)


def test_dig_matmul_flops_equal_dit_at_the_paper_sizes():
    """The claim the speed goals rest on: a DiG block's matmuls (without GLA and conv) are 12 D^2 per token, as a
    DiT block's without attention."""
    for size in ("S", "B", "L", "XL"):
        config = model_config(f"DiG-{size}/2")
        d = config.hidden_size
        key_dim, value_dim = d // 2 // config.num_heads, d // config.num_heads
        gla = config.num_heads * (GLA_CHUNK * (key_dim + value_dim) + 2 * key_dim * value_dim)
        matmuls = dig_block_macs_per_token(config) - gla - 9 * d
        assert abs(matmuls / (12 * d * d) - 1) < 0.03, size
