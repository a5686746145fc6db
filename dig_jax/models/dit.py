"""DiT (Peebles & Xie), the baseline trained with the same recipe: attention + GELU(tanh) MLP, adaLN-Zero."""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from dig_jax.models.layers import (
    SEQUENCE_MIXER_OUTPUT,
    BackboneConfig,
    ConditionedBackbone,
    check_choice,
    layer_norm,
    linear,
    modulate,
    zeros,
)

ATTENTION_IMPLS = ("xla", "cudnn")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiTConfig(BackboneConfig):
    mlp_ratio: float = 4.0
    attention_impl: str = "xla"   # jax.nn.dot_product_attention implementation: "xla" or "cudnn" (GPU, bf16)

    def __post_init__(self):
        super().__post_init__()
        check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)


class Attention(nnx.Module):
    """Multi-head self-attention with a fused qkv Linear (rows [q; k; v], heads contiguous) and an output proj."""

    def __init__(self, hidden_size: int, num_heads: int, implementation: str, *, rngs, dtype):
        if hidden_size % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide hidden_size={hidden_size}")
        self.num_heads = num_heads
        self.implementation = implementation
        self.qkv = linear(hidden_size, 3 * hidden_size, rngs=rngs, dtype=dtype)
        self.proj = linear(hidden_size, hidden_size, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        n, tokens, d = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(n, tokens, 3, self.num_heads, d // self.num_heads), 3, axis=2)
        o = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], implementation=self.implementation)
        o = checkpoint_name(o, SEQUENCE_MIXER_OUTPUT)
        return self.proj(o.reshape(n, tokens, d))


class DiTBlock(nnx.Module):
    def __init__(self, config: DiTConfig, *, rngs, dtype):
        d = config.hidden_size
        inner = int(d * config.mlp_ratio)
        self.attn = Attention(d, config.num_heads, config.attention_impl, rngs=rngs, dtype=dtype)
        self.fc1 = linear(d, inner, rngs=rngs, dtype=dtype)
        self.fc2 = linear(inner, d, rngs=rngs, dtype=dtype)
        self.adaLN_modulation = linear(d, 6 * d, rngs=rngs, dtype=dtype, kernel_init=zeros)

    def __call__(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(self.adaLN_modulation(nnx.silu(c)), 6, axis=-1)
        x = x + gate1[:, None] * self.attn(modulate(layer_norm(x), shift1, scale1))
        mlp = self.fc2(nnx.gelu(self.fc1(modulate(layer_norm(x), shift2, scale2)), approximate=True))
        return x + gate2[:, None] * mlp


class DiT(ConditionedBackbone):
    """DiT on NHWC latents: `model(x [N, H, W, C], t [N] int, y [N] int, train=bool)` -> [N, H, W, C_out]."""

    def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        self.blocks = nnx.List([DiTBlock(config, rngs=rngs, dtype=self.compute_dtype) for _ in range(config.depth)])

    def __call__(self, x, t, y, *, train: bool = False):
        h, c = self.embed(x, t, y, train=train)
        run_block = self.block_runner()
        for block in self.blocks:
            h = run_block(block, h, c)
        return self.head(h, c)
