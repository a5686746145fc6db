"""Trains a DiG/DiT diffusion model: `python -m dig_jax.train --config configs/quickstart.py --workdir DIR`.

Read top to bottom: config checks, model and optimizer, the jitted train step, then the loop (data, step, logs,
NaN guard, checkpoints, preemption) and finally a grid of samples from the EMA weights. Rerunning the same command
resumes from the newest checkpoint in DIR, exactly: the loss trajectory continues as if never interrupted.
Config overrides: `--config configs/x.py:arg --config.global_batch_size=64 --config.model.name=DiG-B/2`.
"""

import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from ml_collections import ConfigDict, config_flags

from dig_jax import checkpoint as ckpt
from dig_jax.config_base import model_from_config
from dig_jax.data import create_dataset, make_loader, to_global_batch
from dig_jax.diffusion import create_diffusion, sample_timesteps
from dig_jax.images import make_grid, save_png, to_uint8
from dig_jax.metrics import MetricsLogger
from dig_jax.sampling import generate
from dig_jax.sharding import batch_sharding, make_mesh, state_shardings

COMPUTE_DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """The config cannot run as given; the message names the key."""


class NonFiniteLossError(RuntimeError):
    """Training diverged; the message names the step and the last good checkpoint."""


def validate_config(config: ConfigDict) -> None:
    """Checks what ml_collections cannot (unknown keys and wrong types it already rejects)."""
    if config.compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"config.compute_dtype must be one of {COMPUTE_DTYPES}, got {config.compute_dtype!r}")
    for key in ("global_batch_size", "num_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
        if config[key] < 1:
            raise ConfigError(f"config.{key} must be >= 1, got {config[key]}")
    if not 0.0 <= config.ema_decay < 1.0:
        raise ConfigError(f"config.ema_decay must be in [0, 1), got {config.ema_decay}")
    if config.global_batch_size % jax.device_count():
        raise ConfigError(f"config.global_batch_size={config.global_batch_size} must be divisible by the "
                          f"{jax.device_count()} devices")
    if config.data.space != "pixel":
        raise ConfigError(
            f"config.data.space={config.data.space!r}: latent-space training needs the VAE and latent data "
            f"pipeline (config.data.space='pixel' is the only space this trainer supports so far)")
    if config.data.image_size != config.model.input_size:
        raise ConfigError(f"config.data.image_size={config.data.image_size} must equal config.model.input_size="
                          f"{config.model.input_size} for pixel-space training")


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


def make_train_step(graphdef, model_rest, diffusion, tx, schedule, ema_decay: float):
    """(state, batch) -> (state, metrics): one AdamW step on the diffusion loss and an EMA update."""

    def loss_fn(params, batch, key):
        t_key, noise_key, dropout_key = jax.random.split(key, 3)
        model = nnx.merge(graphdef, params, model_rest, copy=True)
        nnx.reseed(model, label_dropout=dropout_key)
        x0 = batch["image"]
        t = sample_timesteps(t_key, x0.shape[0], diffusion.num_timesteps)
        noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
        losses = diffusion.training_losses(lambda x, t, y: model(x, t, y, train=True), x0, t, noise, batch["label"])
        return losses["loss"].mean(), losses

    def train_step(state, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        grads, losses = jax.grad(loss_fn, has_aux=True)(state["params"], batch, key)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state["ema"], params)
        metrics = {"loss": losses["loss"].mean(), "mse": losses["mse"].mean(), "vb": losses["vb"].mean(),
                   "grad_norm": optax.global_norm(grads), "learning_rate": schedule(state["step"])}
        return {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state, "ema": ema}, metrics

    return train_step


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint and exits cleanly (a second SIGINT aborts)."""

    def __init__(self):
        self.signal = None
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)


def check_finite(step: int, metrics: dict, checkpointer: ckpt.Checkpointer) -> None:
    if not all(np.isfinite(metrics[key]) for key in ("loss", "grad_norm")):
        checkpointer.wait()
        raise NonFiniteLossError(
            f"loss={metrics['loss']} grad_norm={metrics['grad_norm']} at step {step}: training diverged and was "
            f"stopped without saving. The last good checkpoint is step {checkpointer.latest_step()} in "
            f"{checkpointer.directory}; try a lower config.optimizer.learning_rate or set "
            f"config.optimizer.grad_clip_norm.")


def save_sample_grid(config: ConfigDict, model: nnx.Module, ema_params, workdir: str, step: int) -> str:
    """Samples `config.sample.per_class` images of every class with the EMA weights into samples_<step>.png."""
    nnx.update(model, ema_params)
    s = config.sample
    labels = np.repeat(np.arange(config.model.num_classes), s.per_class)
    images = generate(model, labels, jax.random.key(config.seed), num_steps=s.num_steps, sampler=s.sampler,
                      cfg_scale=s.cfg_scale)
    grid = make_grid(to_uint8(images).reshape(config.model.num_classes * s.per_class, *images.shape[1:]),
                     columns=s.per_class)
    path = os.path.join(workdir, f"samples_{step}.png")
    save_png(path, grid)
    return path


def train(config: ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) training; returns the last logged metrics."""
    validate_config(config)
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if is_main:
        ckpt.write_run_config(workdir, config.to_json_best_effort(indent=2))

    mesh = make_mesh(config.mesh.data, config.mesh.fsdp)
    model = model_from_config(config)
    graphdef, params, model_rest = nnx.split(model, nnx.Param, ...)
    diffusion = create_diffusion(learn_sigma=config.model.learn_sigma)
    tx, schedule = build_optimizer(config.optimizer)
    shardings = state_shardings(jax.eval_shape(lambda: init_state(params, tx, config.seed)), mesh)
    state = jax.jit(init_state, static_argnums=(1, 2), out_shardings=shardings)(params, tx, config.seed)
    data_sharding = batch_sharding(mesh)

    source = create_dataset(config.data.name, split=config.data.split, image_size=config.data.image_size,
                            **config.data.kwargs.to_dict())
    loader = make_loader(source, global_batch_size=config.global_batch_size, seed=config.seed,
                         random_flip=config.data.random_flip, worker_count=config.data.worker_count)

    checkpointer = ckpt.Checkpointer(workdir, keep=config.keep_checkpoints)
    start_step = checkpointer.latest_step() or 0
    if start_step:
        state = checkpointer.restore(start_step, state, loader)
        print(f"Resumed from step {start_step} in {checkpointer.directory}", flush=True)
    if start_step >= config.num_steps:
        print(f"Nothing to do: the run already reached config.num_steps={config.num_steps}.", flush=True)

    train_step = jax.jit(make_train_step(graphdef, model_rest, diffusion, tx, schedule, config.ema_decay),
                         in_shardings=(shardings, data_sharding), out_shardings=(shardings, None),
                         donate_argnums=0)
    logger = MetricsLogger(workdir, total_steps=config.num_steps, global_batch_size=config.global_batch_size,
                           is_main=is_main)
    stop = StopRequest()
    logged = {}
    logger.start(start_step)
    try:
        for step in range(start_step + 1, config.num_steps + 1):
            batch = to_global_batch(next(loader), data_sharding)
            state, metrics = train_step(state, batch)
            last = step == config.num_steps
            if step % config.log_every == 0 or last:
                logged = logger.write(step, {k: float(v) for k, v in jax.device_get(metrics).items()})
            if step % config.checkpoint_every == 0 or last or stop.signal:
                check_finite(step, jax.device_get(metrics), checkpointer)
                checkpointer.save(step, state, loader)
            elif step % config.log_every == 0:
                check_finite(step, logged, checkpointer)
            if stop.signal:
                print(f"{stop.signal} received: saved step {step} to {checkpointer.directory}; rerun the same "
                      f"command to resume.", flush=True)
                break
    finally:
        checkpointer.close()
        logger.close()
    if not stop.signal and config.sample.per_class and is_main:
        path = save_sample_grid(config, model, jax.device_get(state["ema"]), workdir, int(state["step"]))
        print(f"Wrote EMA samples to {path}", flush=True)
    return logged


_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, logs, samples. Reused to resume.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    try:
        train(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, ckpt.CheckpointError, NonFiniteLossError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
