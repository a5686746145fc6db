"""Pieces shared by DiG and DiT: embedders, adaLN modulation, the final layer and (un)patchify.

Layouts: images/latents NHWC [N, H, W, C]; token sequences [N, T, D] in raster (row-major) order over the
(H/p) x (W/p) patch grid.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels import GLA_CHECKPOINT_NAME

TIMESTEP_FREQUENCY_DIM = 256

xavier_uniform = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()
normal_002 = nnx.initializers.normal(stddev=0.02)


def scaled_xavier_uniform(gain: float, in_axis=-2, out_axis=-1):
    """xavier_uniform with PyTorch's `gain` argument (bound = gain * sqrt(6 / (fan_in + fan_out)))."""
    return nnx.initializers.variance_scaling(gain ** 2, "fan_avg", "uniform", in_axis=in_axis, out_axis=out_axis)


def column_blocks_init(init, widths):
    """Kernel [in, sum(widths)] of several Linears side by side: each column block gets `init` as a kernel
    [in, width] of its own (its own fan_out) and its own random key."""
    def initialize(key, shape, dtype=jnp.float32):
        if shape[-1] != sum(widths):
            raise ValueError(f"kernel shape {shape} must have sum(widths)={sum(widths)} columns")
        keys = jax.random.split(key, len(widths))
        return jnp.concatenate([init(k, (*shape[:-1], width), dtype) for k, width in zip(keys, widths)], axis=-1)
    return initialize


def linear(in_features, out_features, *, rngs, dtype, use_bias=True, kernel_init=xavier_uniform):
    """nnx.Linear with the project's default init (xavier_uniform weight, zero bias)."""
    return nnx.Linear(in_features, out_features, use_bias=use_bias, kernel_init=kernel_init, bias_init=zeros,
                      dtype=dtype, rngs=rngs)


def layer_norm(x, eps=1e-6):
    """LayerNorm over the last axis without affine parameters, computed in float32."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x, shift, scale):
    """adaLN: x [N, T, D] * (1 + scale [N, D]) + shift [N, D]."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """[M] positions -> [M, embed_dim] as [sin(pos * w_j), cos(pos * w_j)], w_j = 10000^(-j / (embed_dim/2))."""
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2D position embedding [grid_size**2, embed_dim] (float32) for raster-ordered tokens.

    The first half of the channels encodes the COLUMN index, the second half the ROW index (MAE/DiT convention).
    """
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    emb = np.concatenate([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1)
    return emb.astype(np.float32)


def position_embedding(config) -> np.ndarray:
    """The fixed position embedding of a model config: float32 [(input_size / patch_size)**2, hidden_size]."""
    return sincos_2d(config.hidden_size, config.input_size // config.patch_size)


def timestep_frequencies(t, dim: int = TIMESTEP_FREQUENCY_DIM):
    """t [N] (any real dtype) -> [N, dim] float32 as [cos(t * f_j), sin(t * f_j)], f_j = exp(-ln(1e4) j / (dim/2))."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class PatchEmbed(nnx.Module):
    """Conv with kernel = stride = patch: [N, H, W, C] -> [N, (H/p)*(W/p), D] tokens in raster order."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int, *, rngs, dtype):
        # Initialised like a Linear on the [D, C*p*p] view: fans are C*p*p and D (no receptive-field factor).
        self.proj = nnx.Conv(in_channels, hidden_size, (patch_size, patch_size), strides=patch_size,
                             padding="VALID", kernel_init=scaled_xavier_uniform(1.0, in_axis=(0, 1, 2), out_axis=3),
                             bias_init=zeros, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = self.proj(x)
        return x.reshape(x.shape[0], -1, x.shape[-1])


class TimestepEmbedder(nnx.Module):
    """Integer or real timesteps [N] -> [N, D] through sinusoids and Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, *, rngs, dtype):
        self.mlp_in = linear(TIMESTEP_FREQUENCY_DIM, hidden_size, rngs=rngs, dtype=dtype, kernel_init=normal_002)
        self.mlp_out = linear(hidden_size, hidden_size, rngs=rngs, dtype=dtype, kernel_init=normal_002)

    def __call__(self, t):
        return self.mlp_out(nnx.silu(self.mlp_in(timestep_frequencies(t))))


class LabelEmbedder(nnx.Module):
    """Class labels [N] -> [N, D]; row `num_classes` is the null class used for classifier-free guidance.

    With train=True each label is replaced by the null class with probability `dropout_prob`, drawn from the
    module's own `label_dropout` RNG stream so that the call signature stays `model(x, t, y, train=...)`.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float, *, rngs, dtype):
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nnx.Embed(num_classes + 1, hidden_size, embedding_init=normal_002, dtype=dtype,
                                         rngs=rngs)
        self.dropout_rng = rngs.label_dropout.fork()

    def __call__(self, labels, *, train: bool):
        if train and self.dropout_prob > 0:
            drop = jax.random.bernoulli(self.dropout_rng(), self.dropout_prob, labels.shape)
            labels = jnp.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class FinalLayer(nnx.Module):
    """adaLN (shift, scale) then Linear(D, p*p*C_out), zero-initialised so the model output starts at 0."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, *, rngs, dtype):
        self.adaLN_modulation = linear(hidden_size, 2 * hidden_size, rngs=rngs, dtype=dtype, kernel_init=zeros)
        self.linear = linear(hidden_size, patch_size * patch_size * out_channels, rngs=rngs, dtype=dtype,
                             kernel_init=zeros)

    def __call__(self, x, c):
        shift, scale = jnp.split(self.adaLN_modulation(nnx.silu(c)), 2, axis=-1)
        return self.linear(modulate(layer_norm(x), shift, scale))


def unpatchify(x, patch_size: int, channels: int):
    """[N, T, p*p*C] raster tokens -> [N, H, W, C]; token features are ordered (row-in-patch, col-in-patch, C)."""
    n, tokens, _ = x.shape
    grid = math.isqrt(tokens)
    x = x.reshape(n, grid, grid, patch_size, patch_size, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, grid * patch_size, grid * patch_size, channels)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BackboneConfig:
    """Fields every model config has; DiGConfig and DiTConfig add their own."""
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    dtype: str | None = None      # compute dtype ("bfloat16"); parameters stay float32
    remat: str = "none"           # what each block keeps for the backward pass: see REMAT_POLICIES

    def __post_init__(self):
        check_choice("remat", self.remat, tuple(REMAT_POLICIES))


def check_choice(name: str, value, allowed: tuple) -> None:
    """Config fields that name an implementation or policy are checked when the config is made (ValueError)."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


class ConditionedBackbone(nnx.Module):
    """The parts DiG and DiT share: patch/time/label embedders, fixed position embedding, final layer.

    Subclasses build `self.blocks` and run them between `embed` and `head`.
    """

    def __init__(self, config, *, rngs: nnx.Rngs):
        if config.input_size % config.patch_size:
            raise ValueError(f"input_size={config.input_size} must be a multiple of patch_size={config.patch_size}")
        self.config = config
        self.compute_dtype = jnp.dtype(config.dtype) if config.dtype else None
        d, dtype = config.hidden_size, self.compute_dtype
        self.out_channels = config.in_channels * (2 if config.learn_sigma else 1)
        self.x_embedder = PatchEmbed(config.in_channels, d, config.patch_size, rngs=rngs, dtype=dtype)
        self.t_embedder = TimestepEmbedder(d, rngs=rngs, dtype=dtype)
        self.y_embedder = LabelEmbedder(config.num_classes, d, config.class_dropout_prob, rngs=rngs, dtype=dtype)
        self.final_layer = FinalLayer(d, config.patch_size, self.out_channels, rngs=rngs, dtype=dtype)
        self.pos_embed = nnx.Variable(position_embedding(config))  # fixed, not a Param

    def embed(self, x, t, y, *, train: bool):
        """x [N, H, W, C], t [N], y [N] -> (tokens [N, T, D], conditioning [N, D])."""
        expected = (self.config.input_size, self.config.input_size, self.config.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must be NHWC [N, {expected[0]}, {expected[1]}, {expected[2]}], got {x.shape}")
        h = self.x_embedder(x)
        h = h + self.pos_embed[...].astype(h.dtype)
        return h, self.t_embedder(t) + self.y_embedder(y, train=train)

    def head(self, h, c):
        """Final adaLN layer and unpatchify: [N, T, D] -> [N, H, W, C_out] float32."""
        out = self.final_layer(h, c)
        return unpatchify(out, self.config.patch_size, self.out_channels).astype(jnp.float32)

    def block_runner(self):
        """Calls a block as block(*args), rematerialised in the backward pass as config.remat says."""
        if self.config.remat == "none":
            return _call
        return nnx.remat(_call, policy=REMAT_POLICIES[self.config.remat])


SEQUENCE_MIXER_OUTPUT = "sequence_mixer_output"  # checkpoint name of the attention / GLA output of a block

# config.remat -> jax.checkpoint policy of each block:
#   "none"      keep every intermediate the backward pass reads (fastest, most memory);
#   "matmuls"   keep the outputs of the matmuls and of the attention/GLA op (and the GLA kernels' per-chunk
#               states, so that the backward pass does not run the GLA forward kernels again), recompute the
#               elementwise work between them (norms, modulation, gates, activations: memory-bound, cheap to redo);
#   "full"      keep only each block's input and recompute the whole block (least memory).
REMAT_POLICIES = {
    "none": None,
    "matmuls": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(SEQUENCE_MIXER_OUTPUT, GLA_CHECKPOINT_NAME)),
    "full": jax.checkpoint_policies.nothing_saveable,
}


def _call(block, *args):
    return block(*args)
