"""Model zoo: DiG and DiT by name.

    model = create_model("DiG-XL/2", rngs=nnx.Rngs(0))
    out = model(x, t, y, train=True)   # x [N, 32, 32, 4] -> out [N, 32, 32, 8]

Names: DiG-{S,B,L,XL}/{2,4,8}, U-shape DiG-{S,B,L,XL}/2-U (long skips; pass zero_init_skip=True for the
identity-initialised skip), DiG-XL/2-paper (the paper's 16 heads; the official code uses 18), DiT-{S,B,L,XL}/{2,4,8}.
"""

import dataclasses
import functools

import jax
from flax import nnx

from dig_jax.models.dig import DiG, DiGConfig
from dig_jax.models.dit import DiT, DiTConfig
from dig_jax.models.layers import position_embedding

# size -> (depth, hidden_size, num_heads), as in the official registries.
DIG_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 18)}
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PATCH_SIZES = (2, 4, 8)


def _registry():
    models = {}
    for size, (depth, hidden, heads) in DIG_SIZES.items():
        arch = dict(depth=depth, hidden_size=hidden, num_heads=heads)
        for patch in PATCH_SIZES:
            models[f"DiG-{size}/{patch}"] = (DiG, DiGConfig, dict(arch, patch_size=patch))
        models[f"DiG-{size}/2-U"] = (DiG, DiGConfig, dict(arch, patch_size=2, skip=True))
    models["DiG-XL/2-paper"] = (DiG, DiGConfig, dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2))
    for size, (depth, hidden, heads) in DIT_SIZES.items():
        for patch in PATCH_SIZES:
            models[f"DiT-{size}/{patch}"] = (DiT, DiTConfig,
                                             dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch))
    return models


MODELS = _registry()


def model_config(name: str, *, input_size=32, in_channels=4, num_classes=1000, learn_sigma=True, **overrides):
    """The frozen config dataclass for a registered model name, with overrides applied."""
    if name not in MODELS:
        raise ValueError(f"unknown model name {name!r}; known: {', '.join(MODELS)}")
    _, config_cls, arch = MODELS[name]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown override(s) {unknown} for {name}; accepted: {sorted(fields)}")
    return config_cls(**{**arch, "input_size": input_size, "in_channels": in_channels, "num_classes": num_classes,
                         "learn_sigma": learn_sigma, **overrides})


def create_model(name: str, *, input_size=32, in_channels=4, num_classes=1000, learn_sigma=True, rngs: nnx.Rngs,
                 **overrides):
    """Builds a registered model. overrides: any config field (gla_impl, attention_impl, dtype, remat, ...)."""
    config = model_config(name, input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                          learn_sigma=learn_sigma, **overrides)
    model_cls = MODELS[name][0]
    return model_cls(config, rngs=rngs)


def split_params(model: nnx.Module) -> tuple[nnx.GraphDef, dict, nnx.State]:
    """(graphdef, trainable parameters as a nested dict of plain arrays, the rest of the model's state).

    `nnx.merge(graphdef, params, rest)` rebuilds the model. The parameters are plain arrays, not nnx.Variables,
    because the trainer's jitted step takes and returns them (with the optimizer state and EMA of the same
    structure) on every step: building nnx.Variable objects for each returned leaf cost the host about 4 ms per
    DiG-S/2 step, and made enough garbage for several collections per step.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), rest


def at_input_size(model: nnx.Module, input_size: int) -> nnx.Module:
    """The same network for inputs of side `input_size`: it shares `model`'s parameter arrays (no copy) and only its
    fixed sin-cos position embedding is built for the new token grid (every other layer is per token or, like
    DiG's scans and depthwise conv, takes the grid size from its input). Used to sample above the trained size.
    """
    config = dataclasses.replace(model.config, input_size=input_size)
    state = nnx.State(dict(nnx.state(model)))  # a shallow copy: replacing an entry leaves `model` untouched
    state["pos_embed"] = nnx.Variable(position_embedding(config))
    return nnx.merge(_structure(type(model), config), state, copy=True)


@functools.cache
def _structure(model_cls, config) -> nnx.GraphDef:
    # Traced, not run: the parameters come from the trained model.
    return nnx.split(nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(params=0, label_dropout=0))))[0]


def count_params(model: nnx.Module, *, include_fixed: bool = True) -> int:
    """Trainable parameter count, plus the fixed position embedding when include_fixed (the official count)."""
    count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return count + (model.pos_embed.get_value().size if include_fixed else 0)
