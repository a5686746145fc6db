"""DiG: Diffusion model with Gated Linear Attention (arXiv 2405.18428), faithful to the official code.

Scan order (SREM). The official model flips the token sequence after every block and also transposes the token
grid after every odd block, so block j scans in raster order (j % 4 == 0), reversed raster (1), column-major (2)
or reversed column-major (3). Here the activations always stay in raster order and each block applies its order
where it matters, which is mathematically the same model:
  - the GLA scans the grid column by column when the order is column-major (`chunk_gla(column_major=True)`: the
    GPU kernels gather the rows in that order, other paths transpose around the scan), with `reverse=True` when
    the order is reversed (no flipped copies: the kernel reads the sequence backwards);
  - the depthwise 3x3 conv, which the official code applies to the grid in the block's current order, becomes a
    conv on the raster grid with the kernel transposed and/or rotated by 180 degrees (exact, zero padding is
    symmetric);
  - everything else in a block is per token.
So no order has to be restored for depths that are not a multiple of 4, and checkpoints map one to one.

Sequence parallelism: with `sequence_axis` set and an active mesh that has that axis, the block stack runs with
each image's tokens split by grid rows over the axis's devices (dig_jax/models/sequence_parallel.py); the token
permutations, the GLA and the conv then use their collective versions.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from dig_jax.models import sequence_parallel
from dig_jax.models.layers import (
    SEQUENCE_MIXER_OUTPUT,
    BackboneConfig,
    ConditionedBackbone,
    check_choice,
    column_blocks_init,
    layer_norm,
    linear,
    modulate,
    scaled_xavier_uniform,
    zeros,
)
from pallas_kernels import (
    CONV_IMPLS,
    GLA_IMPLS,
    depthwise_conv3x3,
    gated_gla,
    gated_gla_split,
    sequence_parallel_chunk_gla,
    swiglu,
    transpose_grid,
)

GLA_INIT_GAIN = 2 ** -2.5  # fla's init for every projection inside the GLA layer
GATE_LOW_RANK = 16
GATE_LOGIT_NORMALIZER = 16
RMS_NORM_EPS = 1e-6  # of the GLA output gate's RMSNorm


@dataclasses.dataclass(frozen=True)
class ScanOrder:
    """Token order a block scans in, relative to raster order."""
    transposed: bool  # column-major over the token grid
    reversed: bool    # last token first

    @classmethod
    def of_block(cls, index: int) -> "ScanOrder":
        return cls(transposed=index % 4 >= 2, reversed=index % 2 == 1)

    def compose(self, other: "ScanOrder") -> "ScanOrder":
        # Transpose and reversal are commuting involutions, so orders compose by XOR.
        return ScanOrder(self.transposed != other.transposed, self.reversed != other.reversed)


def permute_tokens(x, order: ScanOrder, sequence_axis: str | None = None):
    """Raster-ordered tokens [N, T, D] -> tokens in `order` (its own inverse: applying it twice is identity).

    Inside the sequence-parallel block stack (tokens split over `sequence_axis`), x is this device's [N, T_d, D].
    """
    if sequence_parallel.is_split(sequence_axis):
        return sequence_parallel.permute_tokens(x, order, sequence_axis)
    if order.transposed:
        x = transpose_grid(x)
    if order.reversed:
        x = x[:, ::-1]
    return x


def swiglu_hidden_size(hidden_size: int) -> int:
    """fla's GLA MLP width: 256 * ceil(int(8D/3) / 256)."""
    return 256 * math.ceil(int(hidden_size * 8 / 3) / 256)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiGConfig(BackboneConfig):
    skip: bool = False            # U-shape long skips between the first and second half
    zero_init_skip: bool = False  # skip Linear starts as [I | 0]: the skip is ignored at init
    gla_impl: str = "auto"        # chunk_gla implementation
    conv_impl: str = "auto"       # depthwise_conv3x3 implementation
    sequence_axis: str | None = None  # mesh axis that splits each image's tokens by grid rows (when the active
                                      # mesh has it); None: tokens are never split

    def __post_init__(self):
        super().__post_init__()
        check_choice("gla_impl", self.gla_impl, ("auto", *GLA_IMPLS))
        check_choice("conv_impl", self.conv_impl, ("auto", *CONV_IMPLS))


def gla_input_widths(hidden_size: int) -> tuple[int, ...]:
    """Column blocks of the GLA's fused input projection `in_proj` [D, 2K + 2V + 16]: fla's q, k, v, g and
    low-rank forget-gate-down projections of x, in that order (K = D/2, V = D)."""
    return (hidden_size // 2,) * 2 + (hidden_size,) * 2 + (GATE_LOW_RANK,)


class GatedLinearAttention(nnx.Module):
    """fla's GatedLinearAttention as DiG configures it: K = D/2, V = D, low-rank forget gate, RMSNorm-swish gate."""

    def __init__(self, hidden_size: int, num_heads: int, *, gla_impl: str, rngs, dtype, sequence_axis=None):
        key_dim, value_dim = hidden_size // 2, hidden_size
        if key_dim % num_heads or value_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide hidden_size/2={key_dim} and hidden_size={value_dim}")
        self.num_heads = num_heads
        self.gla_impl = gla_impl
        # The output gate's Triton kernels go with the GLA kernels; a plain-XLA GLA gets the plain-XLA gate.
        self.gate_impl = "xla" if gla_impl in ("xla", "reference") else "auto"
        self.sequence_axis = sequence_axis
        init = scaled_xavier_uniform(GLA_INIT_GAIN)
        self.input_widths = gla_input_widths(hidden_size)
        self.in_proj = linear(hidden_size, sum(self.input_widths), rngs=rngs, dtype=dtype, use_bias=False,
                              kernel_init=column_blocks_init(init, self.input_widths))
        self.gk_proj_up = linear(GATE_LOW_RANK, key_dim, rngs=rngs, dtype=dtype, kernel_init=init)
        self.o_proj = linear(value_dim, hidden_size, rngs=rngs, dtype=dtype, use_bias=False, kernel_init=init)
        self.g_norm_weight = nnx.Param(jnp.ones((value_dim // num_heads,), jnp.float32))

    def __call__(self, x, *, reverse: bool = False, column_major: bool = False):
        """x [N, T, D] -> [N, T, D], causal over T (anti-causal when reverse); column_major: over the square grid
        of the T raster-ordered tokens column by column (`chunk_gla`), not with a sequence split over devices.

        The five projections of x are one Linear (`in_proj`, the official kernels side by side): x is read once,
        its gradient is one matmul instead of a sum of five, and the optimizer updates one array instead of five.
        `gated_gla` takes the product as it is: on GPUs its kernels read q, k, v and g in place and write their
        gradients into one array, so the product is neither split nor its gradient concatenated.
        """
        up = self.gk_proj_up
        forget_params = tuple(p[...].astype(up.dtype) if up.dtype else p[...] for p in (up.kernel, up.bias))
        options = dict(num_heads=self.num_heads, key_dim=self.input_widths[0], value_dim=self.input_widths[2],
                       forget_fn=log_forget_from_code, eps=RMS_NORM_EPS, gate_impl=self.gate_impl,
                       output_name=SEQUENCE_MIXER_OUTPUT)
        projection = self.in_proj(x)
        if sequence_parallel.is_split(self.sequence_axis):  # x: this device's piece of the sequence
            if column_major:
                raise ValueError("column_major needs each image's whole sequence on one device; with the tokens "
                                 "split over the sequence axis, permute them (permute_tokens) and scan in raster order")
            scan = functools.partial(sequence_parallel_chunk_gla, axis_name=self.sequence_axis, reverse=reverse,
                                     impl=self.gla_impl)
            z = gated_gla_split(projection, forget_params, self.g_norm_weight[...], gla=lambda *a: scan(*a)[0],
                                **options)
        else:
            z = gated_gla(projection, forget_params, self.g_norm_weight[...], reverse=reverse,
                          column_major=column_major, gla_impl=self.gla_impl, **options)
        return self.o_proj(z.astype(x.dtype).reshape(*x.shape[:2], -1))


def log_forget_from_code(code, params):
    """fla's log forget gate [N, T, K] from its low-rank code [N, T, 16]: log_forget_gate(gk_proj_up(code)), with
    params = (kernel [16, K], bias [K]) already in the Linear's compute dtype."""
    kernel, bias = params
    return log_forget_gate((code @ kernel + bias).astype(jnp.float32))


@jax.custom_vjp
def log_forget_gate(logits):
    """fla's forget gate in log space: log_sigmoid(logits) / GATE_LOGIT_NORMALIZER, float32 [..., K].

    The backward pass keeps only the output, which the GLA op keeps anyway as its gate input: d/dx log_sigmoid(x)
    = sigmoid(-x) = -expm1(log_sigmoid(x)). With autodiff, the compiled DiG-S/2 step (H200, 2026-12-03) kept the
    float32 softplus(-x) and the 16-bit logits of every layer from its forward to its backward pass.
    """
    return jax.nn.log_sigmoid(logits) / GATE_LOGIT_NORMALIZER


def _log_forget_gate_forward(logits):
    # The barrier keeps XLA from simplifying the backward's GATE_LOGIT_NORMALIZER * log_forget back to the forward's
    # log_sigmoid(logits), which it then kept alive as a second float32 array per layer (DiG-S/2 step, H200).
    log_forget = lax.optimization_barrier(log_forget_gate(logits))
    return log_forget, log_forget


def _log_forget_gate_backward(log_forget, d_log_forget):
    return (-jnp.expm1(GATE_LOGIT_NORMALIZER * log_forget) * d_log_forget / GATE_LOGIT_NORMALIZER,)


log_forget_gate.defvjp(_log_forget_gate_forward, _log_forget_gate_backward)


class SwiGLU(nnx.Module):
    """down_proj(swish(gate) * value) with gate and value from one fused Linear(D, 2I); `swiglu_impl` is the
    activation's backward implementation (`pallas_kernels.swiglu`)."""

    def __init__(self, hidden_size: int, *, swiglu_impl: str, rngs, dtype):
        inner = swiglu_hidden_size(hidden_size)
        self.gate_proj = linear(hidden_size, 2 * inner, rngs=rngs, dtype=dtype, use_bias=False)
        self.down_proj = linear(inner, hidden_size, rngs=rngs, dtype=dtype, use_bias=False)
        self.swiglu_impl = swiglu_impl

    def __call__(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), impl=self.swiglu_impl))


class DepthwiseConv3x3(nnx.Module):
    """Depthwise 3x3 conv over the token grid, identity-initialised (the paper: normal init ruins FID)."""

    def __init__(self, hidden_size: int, *, conv_impl: str, rngs, dtype):
        identity = jnp.zeros((3, 3, 1, hidden_size), jnp.float32).at[1, 1].set(1.0)
        self.kernel = nnx.Param(identity)  # HWIO with I = 1 (feature groups = channels)
        self.bias = nnx.Param(jnp.zeros((hidden_size,), jnp.float32))
        self.dtype = dtype
        self.conv_impl = conv_impl

    def __call__(self, x, order: ScanOrder, grid_width: int | None = None):
        """x: raster tokens [N, T, D] of a grid `grid_width` wide (default: square); applies the conv the official
        model applies to the grid in `order`."""
        kernel = self.kernel[...][:, :, 0]
        if order.transposed:
            kernel = kernel.transpose(1, 0, 2)
        if order.reversed:
            kernel = kernel[::-1, ::-1]
        return depthwise_conv3x3(x.astype(self.dtype or x.dtype), kernel, self.bias[...],
                                 grid_width=grid_width or math.isqrt(x.shape[1]), impl=self.conv_impl)


class DiGBlock(nnx.Module):
    """adaLN-Zero block: GLA and SwiGLU residual branches, then a depthwise conv that replaces x."""

    def __init__(self, config: DiGConfig, index: int, *, rngs, dtype):
        d = config.hidden_size
        self.order = ScanOrder.of_block(index)
        self.sequence_axis = config.sequence_axis
        self.attn = GatedLinearAttention(d, config.num_heads, gla_impl=config.gla_impl, rngs=rngs, dtype=dtype,
                                         sequence_axis=config.sequence_axis)
        # The MLP's Triton kernel goes with the GLA kernels, as the output gate's (GatedLinearAttention.gate_impl).
        self.mlp = SwiGLU(d, swiglu_impl=self.attn.gate_impl, rngs=rngs, dtype=dtype)
        self.adaLN_modulation = linear(d, 6 * d, rngs=rngs, dtype=dtype, kernel_init=zeros)
        self.dw_conv = DepthwiseConv3x3(d, conv_impl=config.conv_impl, rngs=rngs, dtype=dtype)
        has_skip = config.skip and index > config.depth // 2
        skip_init = _identity_skip_init if config.zero_init_skip else scaled_xavier_uniform(1.0)
        self.skip_linear = nnx.data(
            linear(2 * d, d, rngs=rngs, dtype=dtype, kernel_init=skip_init) if has_skip else None)

    def _scan(self, u):
        # GLA over the block's order, returned in raster order (see the module docstring).
        if not sequence_parallel.is_split(self.sequence_axis):
            return self.attn(u, reverse=self.order.reversed, column_major=self.order.transposed)
        # Split by grid rows over devices, a column-major scan needs the tokens moved across them first.
        transposed = ScanOrder(transposed=self.order.transposed, reversed=False)
        permute = functools.partial(permute_tokens, order=transposed, sequence_axis=self.sequence_axis)
        return permute(self.attn(permute(u), reverse=self.order.reversed))

    def __call__(self, x, c, skip=None):
        """x [N, T, D] raster tokens, c [N, D] conditioning, skip [N, T, D] already in this block's frame."""
        if self.skip_linear is not None:
            x = self.skip_linear(jnp.concatenate([x, skip], axis=-1))
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(self.adaLN_modulation(nnx.silu(c)), 6, axis=-1)
        x = x + gate1[:, None] * self._scan(modulate(layer_norm(x), shift1, scale1))
        x = x + gate2[:, None] * self.mlp(modulate(layer_norm(x), shift2, scale2))
        if sequence_parallel.is_split(self.sequence_axis):
            return sequence_parallel.depthwise_conv3x3(self.dw_conv, x, self.order, self.sequence_axis)
        return self.dw_conv(x, self.order)


def _identity_skip_init(key, shape, dtype=jnp.float32):
    """Kernel [2D, D] = [I; 0]: the output starts as the block's own input, ignoring the skip."""
    del key
    return jnp.eye(shape[0], shape[1], dtype=dtype)


class DiG(ConditionedBackbone):
    """DiG on NHWC latents: `model(x [N, H, W, C], t [N] int, y [N] int, train=bool)` -> [N, H, W, C_out].

    C_out = 2C with learn_sigma (eps in the first C channels, variance interpolation in the last C).
    """

    def __init__(self, config: DiGConfig, *, rngs: nnx.Rngs):
        if config.skip and config.depth % 2:
            raise ValueError(f"the U-shape (skip) variant needs an even depth, got depth={config.depth}")
        super().__init__(config, rngs=rngs)
        self.blocks = nnx.List([DiGBlock(config, i, rngs=rngs, dtype=self.compute_dtype)
                                for i in range(config.depth)])

    def __call__(self, x, t, y, *, train: bool = False):
        h, c = self.embed(x, t, y, train=train)
        if sequence_parallel.mesh_splits_tokens(self.config.sequence_axis):
            h = sequence_parallel.split_tokens(DiG._run_blocks, self, self.config.sequence_axis)(h, c)
        else:
            h = self._run_blocks(h, c)
        return self.head(h, c)

    def _run_blocks(self, h, c):
        """Raster tokens h [N, T, D] (this device's [N, T_d, D] when split), conditioning c [N, D] -> [N, T, D]."""
        run_block = self.block_runner()
        skips = []  # (raster tokens, the order the official model holds them in)
        for i, block in enumerate(self.blocks):
            skip = None
            if block.skip_linear is not None:
                stored, stored_order = skips.pop()
                skip = permute_tokens(stored, block.order.compose(stored_order), self.config.sequence_axis)
            h = run_block(block, h, c, skip)
            if self.config.skip and i < self.config.depth // 2 - 1:
                skips.append((h, ScanOrder.of_block(i + 1)))
        return h
