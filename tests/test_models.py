"""DiG and DiT: exact parameter counts, zero output at init, the SREM scan order, label dropout, input sizes."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dig_jax.models import MODELS, count_params, create_model
from dig_jax.models.dig import GLA_INIT_GAIN, ScanOrder, gla_input_widths, log_forget_gate, permute_tokens
from dig_jax.models.layers import column_blocks_init, layer_norm, modulate, scaled_xavier_uniform, sincos_2d

# Spec section 1: official counts, fixed pos_embed included, input 32, 1000 classes, learn_sigma.
OFFICIAL_PARAM_COUNTS = {
    "DiG-S/2": 33_081_632, "DiG-B/2": 130_748_192, "DiG-L/2": 465_022_496, "DiG-XL/2": 675_953_952,
    "DiG-S/4": 33_063_296, "DiG-S/8": 33_266_432, "DiG-S/2-U": 34_558_112, "DiG-XL/2-U": 710_473_632,
    "DiG-XL/2-paper": 675_954_176,
    "DiT-S/2": 32_963_360, "DiT-B/2": 130_512_416, "DiT-L/2": 458_102_816, "DiT-XL/2": 675_129_632,
}
TRAINABLE_PARAM_COUNTS = {"DiG-S/2": 32_983_328, "DiG-B/2": 130_551_584, "DiG-L/2": 464_760_352,
                          "DiG-XL/2": 675_659_040}
TINY = dict(input_size=8, depth=4, hidden_size=64, num_heads=2)


def abstract_model(name, **kwargs):
    return nnx.eval_shape(lambda: create_model(name, rngs=nnx.Rngs(0), **kwargs))


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAM_COUNTS))
def test_parameter_count_equals_official(name):
    model = abstract_model(name)
    assert count_params(model) == OFFICIAL_PARAM_COUNTS[name]
    if name in TRAINABLE_PARAM_COUNTS:
        assert count_params(model, include_fixed=False) == TRAINABLE_PARAM_COUNTS[name]


def test_fused_gla_input_projection_initialises_each_official_kernel_with_its_own_fan():
    """in_proj [D, K | K | V | V | 16]: each block xavier-uniform with gain 2^-2.5 over (D, its width), as the five
    official Linears are."""
    model = create_model("DiG-S/2", rngs=nnx.Rngs(0))
    kernel = np.asarray(model.blocks[0].attn.in_proj.kernel[...])
    d = kernel.shape[0]
    widths = gla_input_widths(d)
    assert kernel.shape[1] == sum(widths)
    blocks = np.split(kernel, np.cumsum(widths[:-1]), axis=1)
    for width, block in zip(widths, blocks):
        bound = GLA_INIT_GAIN * np.sqrt(6 / (d + width))
        assert np.abs(block).max() <= bound and np.abs(block).max() > 0.95 * bound, width
    assert not np.allclose(blocks[0], blocks[1])  # q and k draw their own keys
    with pytest.raises(ValueError, match=r"kernel shape \(384, 100\) must have sum\(widths\)=1168 columns"):
        column_blocks_init(scaled_xavier_uniform(GLA_INIT_GAIN), widths)(jax.random.key(0), (384, 100))


def test_registry_names():
    expected = {f"{family}-{size}/{patch}" for family in ("DiG", "DiT") for size in ("S", "B", "L", "XL")
                for patch in (2, 4, 8)}
    expected |= {f"DiG-{size}/2-U" for size in ("S", "B", "L", "XL")} | {"DiG-XL/2-paper"}
    assert set(MODELS) == expected


def randomize_params(model, seed=0, scale=0.2):
    """Replaces every parameter with noise so no branch is trivially zero."""
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    nnx.update(model, jax.tree.unflatten(treedef, noisy))
    return model


def inputs(n=2, size=8, channels=4, seed=1):
    x = jax.random.normal(jax.random.key(seed), (n, size, size, channels))
    return x, jnp.arange(n) * 300 + 7, jnp.arange(n) % 5


@pytest.mark.parametrize("name", ["DiG-S/2", "DiT-S/2", "DiG-S/2-U"])
def test_output_is_exactly_zero_at_init(name):
    model = create_model(name, rngs=nnx.Rngs(0), gla_impl="reference", **TINY) if name.startswith("DiG") else \
        create_model(name, rngs=nnx.Rngs(0), **TINY)
    out = nnx.jit(lambda m, x, t, y: m(x, t, y, train=True))(model, *inputs())
    assert out.shape == (2, 8, 8, 8)
    assert not np.any(np.asarray(out))


def official_order_forward(model, x, t, y):
    """The official loop: physically flip after every block, transpose the grid after odd blocks."""
    cfg = model.config
    h, c = model.embed(x, t, y, train=False)
    grid = cfg.input_size // cfg.patch_size
    skips = []
    for i, block in enumerate(model.blocks):
        if block.skip_linear is not None:
            h = block.skip_linear(jnp.concatenate([h, skips.pop()], axis=-1))
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(block.adaLN_modulation(nnx.silu(c)), 6, axis=-1)
        h = h + gate1[:, None] * block.attn(modulate(layer_norm(h), shift1, scale1))
        h = h + gate2[:, None] * block.mlp(modulate(layer_norm(h), shift2, scale2))
        conv = jax.lax.conv_general_dilated(
            h.reshape(h.shape[0], grid, grid, -1), block.dw_conv.kernel[...], (1, 1), ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=h.shape[-1])
        h = (conv + block.dw_conv.bias[...]).reshape(h.shape)
        h = h[:, ::-1]
        if i % 2 == 1:
            h = h.reshape(h.shape[0], grid, grid, -1).transpose(0, 2, 1, 3).reshape(h.shape)
        if cfg.skip and i < cfg.depth // 2 - 1:
            skips.append(h)
    h = permute_tokens(h, ScanOrder.of_block(cfg.depth))  # a faithful port restores raster order
    return model.head(h, c)


@pytest.mark.parametrize("depth,skip", [(4, False), (6, False), (6, True)])
def test_scan_order_matches_official_loop(depth, skip):
    name = "DiG-S/2-U" if skip else "DiG-S/2"
    model = randomize_params(create_model(name, rngs=nnx.Rngs(0), gla_impl="reference",
                                          **{**TINY, "depth": depth}))
    x, t, y = inputs()
    ours = nnx.jit(lambda m: m(x, t, y))(model)
    official = nnx.jit(lambda m: official_order_forward(m, x, t, y))(model)
    np.testing.assert_allclose(ours, official, rtol=2e-4, atol=2e-5)
    assert float(jnp.abs(ours).mean()) > 1e-2


def test_block_orders_cycle_with_period_four():
    orders = [ScanOrder.of_block(i) for i in range(8)]
    assert orders[:4] == [ScanOrder(False, False), ScanOrder(False, True), ScanOrder(True, False),
                          ScanOrder(True, True)]
    assert orders[4:] == orders[:4]
    tokens = jnp.arange(16.0).reshape(1, 16, 1)  # 4x4 grid
    column_major = permute_tokens(tokens, ScanOrder(True, False))[0, :, 0]
    np.testing.assert_array_equal(column_major[:4], [0, 4, 8, 12])
    reversed_column_major = permute_tokens(tokens, ScanOrder(True, True))[0, :, 0]
    np.testing.assert_array_equal(reversed_column_major[:4], [15, 11, 7, 3])
    for order in orders[:4]:
        np.testing.assert_array_equal(permute_tokens(permute_tokens(tokens, order), order), tokens)


def test_block_with_zero_adaln_is_exact_identity():
    model = randomize_params(create_model("DiG-S/2", rngs=nnx.Rngs(0), gla_impl="reference", **TINY))
    for index in (0, 3):
        block = model.blocks[index]
        block.adaLN_modulation.kernel[...] = jnp.zeros_like(block.adaLN_modulation.kernel[...])
        block.adaLN_modulation.bias[...] = jnp.zeros_like(block.adaLN_modulation.bias[...])
        block.dw_conv.kernel[...] = jnp.zeros((3, 3, 1, 64)).at[1, 1].set(1.0)
        block.dw_conv.bias[...] = jnp.zeros((64,))
        h = jax.random.normal(jax.random.key(2), (2, 16, 64))
        c = jax.random.normal(jax.random.key(3), (2, 64))
        np.testing.assert_array_equal(block(h, c), h)


def test_label_dropout_rate_and_null_class():
    model = create_model("DiT-S/2", rngs=nnx.Rngs(params=0, label_dropout=5), **TINY)
    labels = jnp.full((20_000,), 3)
    embedded = model.y_embedder(labels, train=True)
    null_row = model.y_embedder.embedding_table.embedding[...][1000]
    dropped = np.all(np.asarray(embedded) == np.asarray(null_row), axis=-1)
    assert 0.09 < dropped.mean() < 0.11
    assert not np.any(np.all(np.asarray(model.y_embedder(labels, train=False)) == np.asarray(null_row), axis=-1))


@pytest.mark.parametrize("input_size", [32, 64, 128])
def test_input_sizes(input_size):
    model = create_model("DiG-S/8", rngs=nnx.Rngs(0), gla_impl="xla", input_size=input_size, depth=2,
                         hidden_size=64, num_heads=2)
    x, t, y = inputs(n=1, size=input_size)
    out = nnx.jit(lambda m: m(x, t, y))(model)
    assert out.shape == (1, input_size, input_size, 8)


def test_position_embedding_layout():
    emb = sincos_2d(8, 3)  # 3x3 grid, raster tokens; first half encodes the column index
    np.testing.assert_allclose(emb[1, :4], [np.sin(1.0), np.sin(1e-2), np.cos(1.0), np.cos(1e-2)], rtol=1e-6)
    np.testing.assert_allclose(emb[1, 4:], [0.0, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(emb[3, 4:], [np.sin(1.0), np.sin(1e-2), np.cos(1.0), np.cos(1e-2)], rtol=1e-6)


def test_bad_inputs_and_names_are_rejected():
    with pytest.raises(ValueError, match="unknown model name"):
        create_model("DiG-M/2", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown override"):
        create_model("DiG-S/2", rngs=nnx.Rngs(0), mlp_ratio=4.0)
    with pytest.raises(ValueError, match="attention_impl"):
        create_model("DiT-S/2", rngs=nnx.Rngs(0), attention_impl="flash", **TINY)
    model = create_model("DiT-S/2", rngs=nnx.Rngs(0), **TINY)
    with pytest.raises(ValueError, match="NHWC"):
        model(jnp.zeros((1, 4, 8, 8)), jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32))


@pytest.mark.parametrize("option", ["gla_impl", "conv_impl"])
def test_unknown_kernel_impl_is_refused_when_the_model_is_built(option):
    with pytest.raises(ValueError, match=rf"{option} must be one of \('auto', "):
        create_model("DiG-S/2", rngs=nnx.Rngs(0), **{**TINY, option: "foo"})


@pytest.mark.parametrize("name", ["DiG-S/2", "DiT-S/2"])
def test_remat_policies_change_memory_not_gradients(name):
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    t, y = jnp.array([3, 700]), jnp.array([1, 5])

    def grads(remat):
        model = create_model(name, rngs=nnx.Rngs(0), remat=remat, **TINY)
        for block in model.blocks:  # adaLN-Zero starts with zero gates: perturb so that every path carries gradient
            kernel = block.adaLN_modulation.kernel
            kernel[...] = 0.02 * jax.random.normal(jax.random.key(1), kernel.shape)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        loss = lambda p: jnp.mean(jnp.square(nnx.merge(graphdef, p, rest)(x, t, y)))  # noqa: E731
        return jax.jit(jax.grad(loss))(params)

    expected = grads("none")
    for remat in ("matmuls", "full"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads(remat), expected)
    with pytest.raises(ValueError, match="remat must be one of"):
        grads("dots")


def test_log_forget_gate_backward_matches_autodiff_and_keeps_only_its_output():
    logits = jnp.concatenate([jnp.linspace(-30.0, 30.0, 61), jnp.array([-80.0, 80.0])]).reshape(1, 7, 9)
    cotangent = jax.random.normal(jax.random.key(0), logits.shape)
    value, backward = jax.vjp(log_forget_gate, logits)
    expected_value, expected_backward = jax.vjp(log_forget_gate.fun, logits)  # the formula left to autodiff
    np.testing.assert_array_equal(value, expected_value)
    np.testing.assert_allclose(backward(cotangent)[0], expected_backward(cotangent)[0], rtol=2e-6, atol=1e-30)
    assert [leaf.nbytes for leaf in jax.tree_util.tree_leaves(backward)] == [value.nbytes]
    assert sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(expected_backward)) >= 2 * value.nbytes


def test_log_forget_gate_backward_reads_only_the_output_after_xla_simplifies():
    """XLA rewrites the backward's GATE_LOGIT_NORMALIZER * log_forget to the forward's log_sigmoid(logits) unless a
    barrier stops it, and then keeps that second array alive: the compiled backward must start from the output."""
    def loss(logits, weights):
        return jnp.sum(jnp.cumsum(log_forget_gate(logits), axis=1) * weights)  # cumsum: keeps the output alive

    logits = jnp.ones((4, 64, 32))
    hlo = jax.jit(jax.grad(loss)).lower(logits, logits).compile().as_text()
    instructions = dict(re.findall(r"%([\w.\-]+) = \S+ ([^\n]*)", hlo))
    pending = [re.search(r"exponential-minus-one\(%([\w.\-]+)\)", hlo).group(1)]
    forward_reads = set()
    while pending:
        text = instructions[pending.pop()]
        op_name = re.search(r'op_name="([^"]*)"', text)
        if op_name and "transpose(" in op_name.group(1):
            pending += re.findall(r"%([\w.\-]+)", text.split("metadata=")[0])
        elif op_name:
            forward_reads.add(op_name.group(1).rsplit("/", 1)[-1])
    assert forward_reads == {"div"}, forward_reads  # log_forget = log_sigmoid(logits) / GATE_LOGIT_NORMALIZER


