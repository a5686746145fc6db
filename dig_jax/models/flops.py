"""Model FLOPs per image, counted from the architecture: what MFU is measured against.

Counted: every matmul (projections, MLPs, adaLN, embedders, final layer), attention's two T x T products for
DiT, and for DiG the chunked GLA's products (the work `pallas_kernels.chunk_gla` does with chunk 64: intra-chunk
scores and their product with v, the inter-chunk q S and the state update k^T v) and the depthwise conv's nine
multiply-adds. Elementwise work (norms, gates, activations) is not counted, as is usual for MFU. A multiply-add
is 2 FLOPs; a training step costs 3x the forward pass (forward, and a backward pass of twice its work).
"""

from dig_jax.models.dig import GATE_LOW_RANK, DiGConfig, swiglu_hidden_size
from dig_jax.models.dit import DiTConfig
from dig_jax.models.layers import TIMESTEP_FREQUENCY_DIM, BackboneConfig

GLA_CHUNK = 64  # chunk_gla's chunk: each token's intra-chunk work is against the tokens of its chunk


def tokens_per_image(config: BackboneConfig) -> int:
    return (config.input_size // config.patch_size) ** 2


def _shared_macs(config: BackboneConfig) -> int:
    """Patch embedding, timestep MLP, adaLN of every block and of the final layer, final Linear."""
    d, p, tokens = config.hidden_size, config.patch_size, tokens_per_image(config)
    out_channels = config.in_channels * (2 if config.learn_sigma else 1)
    per_token = p * p * config.in_channels * d + d * p * p * out_channels
    per_image = TIMESTEP_FREQUENCY_DIM * d + d * d + config.depth * 6 * d * d + 2 * d * d
    return tokens * per_token + per_image


def dig_block_macs_per_token(config: DiGConfig) -> int:
    """One DiG block, per token: GLA projections (q, k: D -> D/2; v, g, o: D x D; low-rank gate), the chunked
    GLA itself, SwiGLU (D -> 2I -> D) and the depthwise 3x3 conv."""
    d, heads = config.hidden_size, config.num_heads
    key_dim, value_dim = d // 2 // heads, d // heads
    projections = 2 * d * (d // 2) + 3 * d * d + d * GATE_LOW_RANK + GATE_LOW_RANK * (d // 2)
    gla = heads * (GLA_CHUNK * (key_dim + value_dim) + 2 * key_dim * value_dim)
    mlp = 3 * d * swiglu_hidden_size(d)
    return projections + gla + mlp + 9 * d


def dit_block_macs_per_token(config: DiTConfig) -> int:
    """One DiT block, per token: qkv and output projections, attention (q k^T and the product with v over all
    T tokens) and the MLP."""
    d, tokens = config.hidden_size, tokens_per_image(config)
    return 4 * d * d + 2 * tokens * d + 2 * d * int(d * config.mlp_ratio)


def forward_flops_per_image(config: BackboneConfig) -> int:
    """Forward-pass FLOPs of one image for a DiG or DiT config."""
    tokens = tokens_per_image(config)
    if isinstance(config, DiGConfig):
        blocks = config.depth * tokens * dig_block_macs_per_token(config)
        skips = sum(1 for i in range(config.depth) if config.skip and i > config.depth // 2)
        blocks += skips * tokens * 2 * config.hidden_size * config.hidden_size
    elif isinstance(config, DiTConfig):
        blocks = config.depth * tokens * dit_block_macs_per_token(config)
    else:
        raise TypeError(f"config must be a DiGConfig or DiTConfig, got {type(config).__name__}")
    return 2 * (blocks + _shared_macs(config))


def train_flops_per_image(config: BackboneConfig) -> int:
    """Training-step FLOPs of one image: 3x the forward pass."""
    return 3 * forward_flops_per_image(config)
