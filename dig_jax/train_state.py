"""The optimizer and the training state it updates: what the trainer runs, a checkpoint holds, and the memory
report (dig_jax.sharding) sizes.

The state is one pytree {"step", "params", "opt_state", "ema", "rng"}; `abstract_train_state` gives its shapes
without allocating anything.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from ml_collections import ConfigDict

from dig_jax.config_base import model_from_config
from dig_jax.models import split_params


def build_optimizer(o: ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (the recipe: lr 1e-4 constant, no weight decay, no clipping), with optional warmup and clipping."""
    schedule = optax.constant_schedule(o.learning_rate)
    if o.warmup_steps:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps), schedule], [o.warmup_steps])
    adamw = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), adamw) if o.grad_clip_norm else adamw
    return tx, schedule


def init_state(params, tx, seed: int) -> dict:
    """The whole training state as one pytree (what a checkpoint holds)."""
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "ema": jax.tree.map(jnp.copy, params), "rng": jax.random.key_data(jax.random.key(seed))}


def abstract_train_state(config: ConfigDict) -> dict:
    """The trainer's state {"step", "params", "opt_state", "ema", "rng"} as ShapeDtypeStructs (nothing allocated)."""
    model = nnx.eval_shape(lambda: model_from_config(config))
    _, params, _ = split_params(model)
    tx, _ = build_optimizer(config.optimizer)
    return jax.eval_shape(lambda p: init_state(p, tx, config.seed), params)
