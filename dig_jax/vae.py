"""Flax NNX port of diffusers' `AutoencoderKL` (the Stable Diffusion VAE) that reads diffusers' model folders.

Layouts: images NHWC [N, H, W, C_in] in [-1, 1]; latents NHWC [N, H / 2**(D - 1), W / 2**(D - 1), latent_channels]
with D = len(block_out_channels). The module tree mirrors diffusers' one (encoder.down_blocks[i].resnets[j].conv1,
...), so every parameter has exactly one diffusers state-dict key; `diffusers_param_shapes` lists them.

Weights come from `diffusion_pytorch_model.safetensors` through safetensors' numpy API: no PyTorch needed.
PyTorch layouts are converted on load: conv OIHW -> HWIO (a transpose, no spatial flip: both frameworks compute
cross-correlation) and Linear [out, in] -> kernel [in, out].
"""

import dataclasses
import functools
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from dig_jax.images import atomic_write_bytes

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
PYTORCH_PICKLE_FILE = "diffusion_pytorch_model.bin"

_EPS = 1e-6  # every GroupNorm of diffusers' VAE Encoder/Decoder uses eps=1e-6
_LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps logvar to this range


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """The architecture-defining fields of diffusers' AutoencoderKL config (same names, same defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise ValueError(f"block_out_channels={self.block_out_channels}: every entry must be divisible by "
                                 f"norm_num_groups={self.norm_num_groups}")

    @classmethod
    def from_diffusers(cls, config: dict) -> "AutoencoderKLConfig":
        """Parses a diffusers AutoencoderKL config.json dict; rejects values this port does not implement."""
        _check_choice(config, "_class_name", {"AutoencoderKL"})
        _check_choice(config, "act_fn", {"silu", "swish"})  # diffusers maps both names to SiLU
        num_blocks = len(config.get("block_out_channels", cls.block_out_channels))
        for key, block_type in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = list(config.get(key, [block_type]))
            if types != [block_type] * num_blocks:
                raise ValueError(f"{key}={types}: only {num_blocks} x '{block_type}' (one per block_out_channels "
                                 "entry) is supported")
        # Validated above, or pipeline/tiling settings that do not change the network.
        ignored = {"act_fn", "down_block_types", "up_block_types", "sample_size", "force_upcast", "latents_mean",
                   "latents_std"}
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in fields | ignored)
        if unknown:
            raise ValueError(f"unsupported AutoencoderKL config keys: {unknown}")
        return cls(**{k: v for k, v in config.items() if k in fields})


def _check_choice(config: dict, key: str, allowed: set[str]):
    if key in config and config[key] not in allowed:
        raise ValueError(f"config {key}={config[key]!r}: expected one of {sorted(allowed)}")


@struct.dataclass
class DiagonalGaussian:
    """Posterior q(z | x) = N(mean, exp(logvar)); both [N, h, w, latent_channels] float32."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        """Splits the encoder output [..., 2 * latent] into (mean, logvar), logvar clamped to [-30, 20]."""
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, *_LOGVAR_RANGE))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """mean + std * eps, eps ~ N(0, I) drawn from `key`."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean


# ----------------------------------------------------------------------------------------------------------------
# Modules. Attribute names are diffusers' names, except where `_DIFFUSERS_MODULE_NAMES` renames them.


def _conv(in_channels, out_channels, kernel_size, *, dtype, rngs, strides=1, padding=None):
    """PyTorch-style conv: symmetric padding of kernel_size // 2 unless `padding` is given."""
    if padding is None:
        padding = [(kernel_size // 2, kernel_size // 2)] * 2
    return nnx.Conv(in_channels, out_channels, (kernel_size, kernel_size), strides=strides, padding=padding,
                    dtype=dtype, rngs=rngs)


def _group_norm(channels, groups, *, dtype, rngs):
    # Two-pass variance: E[x^2] - E[x]^2 loses precision on activations with a large mean.
    return nnx.GroupNorm(channels, num_groups=groups, epsilon=_EPS, use_fast_variance=False, dtype=dtype, rngs=rngs)


class ResnetBlock(nnx.Module):
    """diffusers ResnetBlock2D without time embedding: x + conv2(silu(norm2(conv1(silu(norm1(x))))))."""

    def __init__(self, in_channels, out_channels, groups, *, dtype, rngs):
        self.norm1 = _group_norm(in_channels, groups, dtype=dtype, rngs=rngs)
        self.conv1 = _conv(in_channels, out_channels, 3, dtype=dtype, rngs=rngs)
        self.norm2 = _group_norm(out_channels, groups, dtype=dtype, rngs=rngs)
        self.conv2 = _conv(out_channels, out_channels, 3, dtype=dtype, rngs=rngs)
        self.conv_shortcut = (_conv(in_channels, out_channels, 1, dtype=dtype, rngs=rngs)
                              if in_channels != out_channels else None)

    def __call__(self, x):
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = self.conv2(nnx.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class SpatialSelfAttention(nnx.Module):
    """Single-head self-attention over the H*W positions with GroupNorm in front and a residual connection.

    diffusers builds it as Attention(heads=1, dim_head=channels), so the softmax scale is channels**-0.5.
    """

    def __init__(self, channels, groups, *, dtype, rngs):
        self.group_norm = _group_norm(channels, groups, dtype=dtype, rngs=rngs)
        self.to_q = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.to_k = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.to_v = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.to_out = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        """x [N, H, W, C] -> [N, H, W, C]."""
        n, height, width, channels = x.shape
        tokens = self.group_norm(x).reshape(n, height * width, channels)
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        scores = jnp.einsum("nqc,nkc->nqk", q, k) * channels ** -0.5
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
        attended = self.to_out(jnp.einsum("nqk,nkc->nqc", weights, v))
        return x + attended.reshape(x.shape)


class MidBlock(nnx.Module):
    """diffusers UNetMidBlock2D with one layer: resnet, optional attention, resnet."""

    def __init__(self, channels, groups, add_attention, *, dtype, rngs):
        self.resnets = nnx.List([ResnetBlock(channels, channels, groups, dtype=dtype, rngs=rngs) for _ in range(2)])
        self.attention = SpatialSelfAttention(channels, groups, dtype=dtype, rngs=rngs) if add_attention else None

    def __call__(self, x):
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)


class DownEncoderBlock(nnx.Module):
    """`num_layers` resnets, then (except in the last block) a stride-2 3x3 conv on the bottom/right-padded input."""

    def __init__(self, in_channels, out_channels, num_layers, groups, add_downsample, *, dtype, rngs):
        self.resnets = nnx.List([ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups,
                                             dtype=dtype, rngs=rngs) for i in range(num_layers)])
        # diffusers pads (0, 1) on each spatial axis and convolves with padding 0.
        self.downsample = (_conv(out_channels, out_channels, 3, strides=2, padding=[(0, 1), (0, 1)], dtype=dtype,
                                 rngs=rngs) if add_downsample else None)

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsample is None else self.downsample(x)


class UpDecoderBlock(nnx.Module):
    """`num_layers` resnets, then (except in the last block) nearest-neighbour 2x upsampling and a 3x3 conv."""

    def __init__(self, in_channels, out_channels, num_layers, groups, add_upsample, *, dtype, rngs):
        self.resnets = nnx.List([ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups,
                                             dtype=dtype, rngs=rngs) for i in range(num_layers)])
        self.upsample = _conv(out_channels, out_channels, 3, dtype=dtype, rngs=rngs) if add_upsample else None

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsample is None:
            return x
        return self.upsample(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Encoder(nnx.Module):
    """Image [N, H, W, in_channels] -> moments [N, H / 2**(D-1), W / 2**(D-1), 2 * latent_channels]."""

    def __init__(self, config: AutoencoderKLConfig, *, dtype, rngs):
        channels, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = _conv(config.in_channels, channels[0], 3, dtype=dtype, rngs=rngs)
        self.down_blocks = nnx.List([
            DownEncoderBlock(channels[max(i - 1, 0)], channels[i], config.layers_per_block, groups,
                             add_downsample=i < len(channels) - 1, dtype=dtype, rngs=rngs)
            for i in range(len(channels))])
        self.mid_block = MidBlock(channels[-1], groups, config.mid_block_add_attention, dtype=dtype, rngs=rngs)
        self.conv_norm_out = _group_norm(channels[-1], groups, dtype=dtype, rngs=rngs)
        self.conv_out = _conv(channels[-1], 2 * config.latent_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latent [N, h, w, latent_channels] -> image [N, h * 2**(D-1), w * 2**(D-1), out_channels].

    up_blocks[0] works at the lowest resolution with the widest channels (reversed block_out_channels); each up
    block has layers_per_block + 1 resnets.
    """

    def __init__(self, config: AutoencoderKLConfig, *, dtype, rngs):
        channels, groups = config.block_out_channels[::-1], config.norm_num_groups
        self.conv_in = _conv(config.latent_channels, channels[0], 3, dtype=dtype, rngs=rngs)
        self.mid_block = MidBlock(channels[0], groups, config.mid_block_add_attention, dtype=dtype, rngs=rngs)
        self.up_blocks = nnx.List([
            UpDecoderBlock(channels[max(i - 1, 0)], channels[i], config.layers_per_block + 1, groups,
                           add_upsample=i < len(channels) - 1, dtype=dtype, rngs=rngs)
            for i in range(len(channels))])
        self.conv_norm_out = _group_norm(channels[-1], groups, dtype=dtype, rngs=rngs)
        self.conv_out = _conv(channels[-1], config.out_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """diffusers AutoencoderKL in NHWC. Parameters are float32; `dtype` is the computation dtype.

    Latents for a diffusion model are `vae.encode(x).sample(key) * vae.scaling_factor` (SD VAEs: 0.18215); decode
    with `vae.decode(latents / vae.scaling_factor)`. When the config has a shift_factor, diffusers' pipelines use
    (z - shift_factor) * scaling_factor instead.
    """

    def __init__(self, config: AutoencoderKLConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        latent = config.latent_channels
        self.encoder = Encoder(config, dtype=dtype, rngs=rngs)
        self.decoder = Decoder(config, dtype=dtype, rngs=rngs)
        self.quant_conv = _conv(2 * latent, 2 * latent, 1, dtype=dtype, rngs=rngs) if config.use_quant_conv else None
        self.post_quant_conv = (_conv(latent, latent, 1, dtype=dtype, rngs=rngs)
                                if config.use_post_quant_conv else None)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> float | None:
        return self.config.shift_factor

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """x [N, H, W, in_channels] in [-1, 1] -> posterior over [N, H/f, W/f, latent_channels], f = 2**(D-1)."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latent z [N, h, w, latent_channels] -> image [N, h*f, w*f, out_channels], roughly in [-1, 1]."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


# ----------------------------------------------------------------------------------------------------------------
# diffusers checkpoint <-> NNX parameter mapping.

# NNX attribute -> diffusers module path, where the two trees differ (diffusers wraps these in one-element lists).
_DIFFUSERS_MODULE_NAMES = {
    "attention": "attentions.0",
    "to_out": "to_out.0",
    "downsample": "downsamplers.0.conv",
    "upsample": "upsamplers.0.conv",
}
_DIFFUSERS_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}

# Pre-0.14 diffusers named the VAE attention projections query/key/value/proj_attn.
_LEGACY_ATTENTION_KEY = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _diffusers_key(path: tuple) -> str:
    *modules, leaf = path
    names = [_DIFFUSERS_MODULE_NAMES.get(m, str(m)) for m in modules]
    return ".".join([*names, _DIFFUSERS_LEAF_NAMES[leaf]])


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Conv kernel HWIO -> OIHW, Linear kernel [in, out] -> [out, in], vectors unchanged."""
    if len(flax_shape) == 4:
        height, width, fan_in, fan_out = flax_shape
        return fan_out, fan_in, height, width
    return tuple(reversed(flax_shape))


@functools.lru_cache(maxsize=8)
def _abstract_params(config: AutoencoderKLConfig, dtype) -> tuple[nnx.GraphDef, dict[str, tuple], dict]:
    """(graphdef, diffusers key -> NNX path, NNX path -> abstract Param) without allocating any parameter.

    Cached because tracing the constructor takes seconds (flax traces every initializer); callers must not mutate
    the returned dicts.
    """
    model = nnx.eval_shape(lambda: AutoencoderKL(config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model, nnx.Param)
    flat = dict(nnx.to_flat_state(params))
    return graphdef, {_diffusers_key(path): path for path in flat}, flat


def diffusers_param_shapes(config: AutoencoderKLConfig) -> dict[str, tuple[int, ...]]:
    """Every diffusers state-dict key this model consumes, with its PyTorch shape (what `load_vae` expects)."""
    _, paths, flat = _abstract_params(config, jnp.float32)
    return {key: _torch_shape(flat[path].get_value().shape) for key, path in paths.items()}


def canonical_diffusers_key(key: str) -> str:
    """Maps legacy attention names (query/key/value/proj_attn) to current ones (to_q/to_k/to_v/to_out.0)."""
    match = _LEGACY_ATTENTION_KEY.match(key)
    if match is None:
        return key
    block, name, leaf = match.groups()
    return f"{block}.{_LEGACY_ATTENTION_NAMES[name]}.{leaf}"


def _to_flax_layout(key: str, array: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
    if len(flax_shape) == 2 and array.ndim == 4 and array.shape[2:] == (1, 1):
        array = array[:, :, 0, 0]  # attention projection stored as a 1x1 conv
    if array.shape != _torch_shape(flax_shape):
        raise ValueError(f"checkpoint tensor '{key}' has shape {array.shape}, expected {_torch_shape(flax_shape)}")
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    return array.T if array.ndim == 2 else array


def _to_torch_layout(array: np.ndarray) -> np.ndarray:
    """Inverse of `_to_flax_layout`: conv HWIO -> OIHW, Linear [in, out] -> [out, in], vectors unchanged."""
    if array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    return array.T if array.ndim == 2 else array


def vae_from_state_dict(config: AutoencoderKLConfig, state_dict: dict[str, np.ndarray], *,
                        dtype=jnp.float32) -> AutoencoderKL:
    """Builds an AutoencoderKL from a diffusers state dict (PyTorch layouts, numpy arrays).

    Raises ValueError unless every tensor maps to exactly one parameter and every parameter is filled.
    """
    canonical: dict[str, tuple[str, np.ndarray]] = {}
    for key, array in state_dict.items():
        name = canonical_diffusers_key(key)
        if name in canonical:
            raise ValueError(f"checkpoint holds both '{canonical[name][0]}' and '{key}' for parameter '{name}'")
        canonical[name] = (key, array)

    graphdef, paths, abstract = _abstract_params(config, dtype)
    missing = sorted(paths.keys() - canonical.keys())
    unexpected = sorted(canonical[name][0] for name in canonical.keys() - paths.keys())
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the AutoencoderKL config: missing keys {missing}, "
                         f"unexpected keys {unexpected}")

    params = {}
    for name, path in paths.items():
        key, array = canonical[name]
        converted = _to_flax_layout(key, array, abstract[path].get_value().shape)
        params[path] = abstract[path].replace(jnp.asarray(converted, dtype=jnp.float32))
    return nnx.merge(graphdef, nnx.from_flat_state(list(params.items())))


def read_vae_config(folder: str | pathlib.Path) -> AutoencoderKLConfig:
    """Reads and validates `config.json` of a diffusers AutoencoderKL folder."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"VAE folder '{folder}' does not exist or is not a directory")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"VAE folder '{folder}' has no {CONFIG_FILE}; expected a diffusers AutoencoderKL "
                                "folder as written by `save_pretrained`")
    return AutoencoderKLConfig.from_diffusers(json.loads(config_path.read_text()))


def _read_state_dict(folder: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    weights = folder / WEIGHTS_FILE
    if weights.is_file():
        # BF16 tensors come back as ml_dtypes.bfloat16 (numpy knows that dtype once jax is imported).
        return load_file(weights)
    if (folder / PYTORCH_PICKLE_FILE).is_file():
        raise ValueError(
            f"VAE folder '{folder}' has only PyTorch pickle weights ({PYTORCH_PICKLE_FILE}); convert them once with "
            "diffusers: `AutoencoderKL.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)` "
            f"writes {WEIGHTS_FILE}")
    raise FileNotFoundError(f"VAE folder '{folder}' has no {WEIGHTS_FILE}")


def load_vae(folder: str | pathlib.Path, *, dtype=jnp.float32) -> AutoencoderKL:
    """Loads a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors).

    Parameters are float32; `dtype` is the computation dtype. Accepts both attention naming conventions.
    """
    config = read_vae_config(folder)
    return vae_from_state_dict(config, _read_state_dict(pathlib.Path(folder)), dtype=dtype)


def diffusers_config(config: AutoencoderKLConfig) -> dict:
    """The config.json dict diffusers writes for `config` (what `AutoencoderKLConfig.from_diffusers` reads)."""
    num_blocks = len(config.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        **dataclasses.asdict(config),
        "block_out_channels": list(config.block_out_channels),
        "act_fn": "silu",
        "down_block_types": ["DownEncoderBlock2D"] * num_blocks,
        "up_block_types": ["UpDecoderBlock2D"] * num_blocks,
    }


def save_vae(vae: AutoencoderKL, folder: str | pathlib.Path) -> None:
    """Writes `vae` as a diffusers AutoencoderKL folder: config.json + diffusion_pytorch_model.safetensors.

    Float32 tensors in PyTorch layouts under current diffusers names: `load_vae` and diffusers'
    `AutoencoderKL.from_pretrained` both read it. Each file is written to a temporary name, then renamed.
    """
    from safetensors.numpy import save

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state_dict = {
        _diffusers_key(path): np.ascontiguousarray(_to_torch_layout(np.asarray(param.get_value(), np.float32)))
        for path, param in nnx.to_flat_state(nnx.state(vae, nnx.Param))
    }
    atomic_write_bytes(str(folder / WEIGHTS_FILE), save(state_dict))
    atomic_write_bytes(str(folder / CONFIG_FILE), json.dumps(diffusers_config(vae.config), indent=2).encode())
