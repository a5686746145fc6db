"""Trains a DiG/DiT diffusion model: `python -m dig_jax.train --config configs/quickstart.py --workdir DIR`.

Read top to bottom: config checks, model and optimizer, the jitted train step, then the loop (data, step, logs,
NaN guard, checkpoints, preemption) and finally a grid of samples from the EMA weights. Rerunning the same command
resumes from the newest checkpoint in DIR, exactly: the loss trajectory continues as if never interrupted.
Config overrides: `--config configs/x.py:arg --config.global_batch_size=64 --config.model.name=DiG-B/2`.
"""

import dataclasses
import functools
import gc
import os
import signal
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import ConfigDict, config_flags

from dig_jax import checkpoint as ckpt
from dig_jax import distributed
from dig_jax.config_base import model_from_config
from dig_jax.config_cli import exit_with_error, parse_config_flags
from dig_jax.data import create_dataset, make_loader, to_global_batch
from dig_jax.data_space import DataSpace, check_data_space, data_space
from dig_jax.diffusion import create_diffusion, sample_timesteps
from dig_jax.evaluation.training import TrainingEvaluator, check_eval_config
from dig_jax.images import save_png
from dig_jax.metrics import MetricsLogger
from dig_jax.models import MODELS, model_config, split_params
from dig_jax.sampling import sample_grid
from dig_jax.sharding import DEFAULT_FSDP_MIN_SIZE, batch_sharding, make_mesh, state_shardings, under_mesh
from dig_jax.train_state import build_optimizer, init_state

COMPUTE_DTYPES = ("float32", "bfloat16")
_ACCELERATOR_IMPLS = {"pallas": ("gpu", "tpu"), "cudnn": ("gpu",)}  # kernel implementations -> backends they run on


class ConfigError(ValueError):
    """The config cannot run as given; the message names the key."""


class NonFiniteLossError(RuntimeError):
    """Training diverged; the message names the step and the last good checkpoint."""


def validate_model_config(m: ConfigDict) -> None:
    """Checks config.model without building the model (which takes seconds for XL): the name, the option keys and
    values (the model's config checks its implementation names), the input size against the patch size, and that
    this backend runs the kernel implementations (GLA, convolution, attention) it names."""
    if m.name not in MODELS:
        raise ConfigError(f"config.model.name={m.name!r} is not a model; known: {', '.join(MODELS)}")
    try:
        architecture = model_config(m.name, input_size=m.input_size, in_channels=m.in_channels,
                                    num_classes=m.num_classes, learn_sigma=m.learn_sigma, **m.options.to_dict())
    except ValueError as error:  # option keys the model does not have, or values it does not accept
        raise ConfigError(f"config.model.options: {error}") from error
    if m.input_size % architecture.patch_size:
        raise ConfigError(f"config.model.input_size={m.input_size} must be a multiple of {m.name}'s patch size "
                          f"{architecture.patch_size}")
    for key in ("gla_impl", "conv_impl", "attention_impl"):  # DiG's, DiG's, DiT's
        impl = getattr(architecture, key, None)
        backends = _ACCELERATOR_IMPLS.get(impl, (jax.default_backend(),))
        if jax.default_backend() not in backends:
            names = " or ".join(backend.upper() for backend in backends)
            raise ConfigError(f"config.model.options.{key}={impl!r} needs a {names} backend, this is "
                              f"{jax.default_backend()}: use another implementation")


def check_workdir(workdir: str) -> None:
    """`workdir` is, or can be made, a folder this process writes in (checked before anything is written)."""
    folder = os.path.abspath(workdir)
    while not os.path.exists(folder):  # the nearest existing folder is where it will be created
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise ConfigError(f"--workdir={workdir}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir={workdir}: {folder} is not writable")


def validate_config(config: ConfigDict) -> None:
    """Checks what ml_collections cannot (unknown keys and wrong types it already rejects)."""
    if config.compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"config.compute_dtype must be one of {COMPUTE_DTYPES}, got {config.compute_dtype!r}")
    for key in ("global_batch_size", "num_steps", "log_every", "checkpoint_every", "keep_checkpoints",
                "steps_per_call"):
        if config[key] < 1:
            raise ConfigError(f"config.{key} must be >= 1, got {config[key]}")
    for key in ("num_steps", "log_every", "checkpoint_every"):
        if config[key] % config.steps_per_call:
            raise ConfigError(f"config.{key}={config[key]} must be a multiple of config.steps_per_call="
                              f"{config.steps_per_call}")
    if not 0.0 <= config.ema_decay < 1.0:
        raise ConfigError(f"config.ema_decay must be in [0, 1), got {config.ema_decay}")
    if config.mesh.seq < 1 or jax.device_count() % config.mesh.seq:
        raise ConfigError(f"config.mesh.seq must be >= 1 and divide the {jax.device_count()} devices, got "
                          f"{config.mesh.seq}")
    if config.mesh.seq > 1 and not config.model.name.startswith("DiG"):
        raise ConfigError(f"config.mesh.seq={config.mesh.seq} splits DiG's tokens; {config.model.name} has no "
                          f"sequence-parallel version (use config.mesh.seq=1)")
    batch_devices = jax.device_count() // config.mesh.seq  # the batch is split over data x fsdp, not over seq
    if config.global_batch_size % batch_devices:
        raise ConfigError(f"config.global_batch_size={config.global_batch_size} must be divisible by the "
                          f"{batch_devices} devices that split it (all devices / config.mesh.seq)")
    validate_model_config(config.model)
    try:  # data space, data dir, VAE folder and latent shapes (reads metadata and config files only)
        check_data_space(config)
        check_eval_config(config)  # in-training FID: its files exist and its keys fit (file headers only)
    except ValueError as error:
        raise ConfigError(str(error)) from error


def make_train_step(graphdef, model_rest, diffusion, tx, schedule, ema_decay: float, to_x0):
    """(state, batch, frozen) -> (state, metrics): one AdamW step on the diffusion loss and an EMA update.

    to_x0(frozen, batch, key) gives the diffused x0 (dig_jax.data_space.DataSpace): the images, or latents sampled
    from the VAE posterior; `frozen` holds the constants it reads (VAE parameters), never trained nor saved.
    """

    def loss_fn(params, batch, frozen, key):
        t_key, noise_key, dropout_key, x0_key = jax.random.split(key, 4)
        model = nnx.merge(graphdef, params, model_rest, copy=True)
        nnx.reseed(model, label_dropout=dropout_key)
        x0 = to_x0(frozen, batch, x0_key)
        t = sample_timesteps(t_key, x0.shape[0], diffusion.num_timesteps)
        noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
        losses = diffusion.training_losses(lambda x, t, y: model(x, t, y, train=True), x0, t, noise, batch["label"])
        return losses["loss"].mean(), losses

    def train_step(state, batch, frozen):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        grads, losses = jax.grad(loss_fn, has_aux=True)(state["params"], batch, frozen, key)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state["ema"], params)
        metrics = {"loss": losses["loss"].mean(), "mse": losses["mse"].mean(), "vb": losses["vb"].mean(),
                   "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state["step"])}
        return {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state, "ema": ema}, metrics

    return train_step


def make_multi_step(train_step):
    """(state, batches, frozen) -> (state, metrics of the last step): train_step over each of the stacked
    `batches` (leaves [steps, batch, ...]) in one compiled call, so that the host dispatches once per call."""

    def multi_step(state, batches, frozen):
        state, metrics = jax.lax.scan(lambda state, batch: train_step(state, batch, frozen), state, batches)
        return state, jax.tree.map(lambda m: m[-1], metrics)

    return multi_step


@dataclasses.dataclass(frozen=True)
class Trainer:
    """What training runs, built from a config on a mesh (`build_trainer`)."""

    model: nnx.Module  # the initialised model: its structure rebuilds the network for sampling
    initial_state: Callable  # () -> a fresh initial training state (init_state of the model's parameters), sharded
    # (state, batches, frozen) -> (state, metrics of the last step): one train step per stacked batch (leaves
    # [steps, global batch, ...], placed with data_sharding), as many as stacked; donates `state`.
    train_steps: Callable
    data_sharding: jax.sharding.NamedSharding
    space: DataSpace   # batch -> x0 inside the step (space.frozen: its constants), x0 -> images for sampling


def build_trainer(config: ConfigDict, mesh, fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE) -> Trainer:
    """The model, optimizer and jitted train step that `train` runs for `config` on `mesh`: explicit state and
    batch shardings (FSDP over mesh axis "fsdp" for arrays of at least `fsdp_min_size` elements), donated state."""
    model = model_from_config(config)
    graphdef, params, model_rest = split_params(model)
    tx, schedule = build_optimizer(config.optimizer)
    shardings = state_shardings(jax.eval_shape(lambda: init_state(params, tx, config.seed)), mesh, fsdp_min_size)
    init = jax.jit(functools.partial(init_state, tx=tx, seed=config.seed), out_shardings=shardings)
    initial_state = functools.partial(init, params)
    space = data_space(config, mesh)  # x0 from batches: pixels, online VAE encoding or stored moments
    data_sharding = batch_sharding(mesh, stacked=True)
    train_steps = under_mesh(mesh, jax.jit(
        make_multi_step(make_train_step(graphdef, model_rest, create_diffusion(learn_sigma=config.model.learn_sigma),
                                        tx, schedule, config.ema_decay, space.to_x0)),
        # None: the frozen VAE parameters keep the replicated sharding they were placed with.
        in_shardings=(shardings, data_sharding, None), out_shardings=(shardings, None), donate_argnums=0))
    return Trainer(model, initial_state, train_steps, data_sharding, space)


def next_batches(loader, count: int):
    """The loader's next `count` host batches stacked into leaves [count, batch, ...]."""
    if count == 1:  # a view: no copy of the batch on the default path
        return jax.tree.map(lambda leaf: leaf[None], next(loader))
    return jax.tree.map(lambda *leaves: np.stack(leaves), *(next(loader) for _ in range(count)))


def freeze_long_lived_objects() -> None:
    """Exempts every object alive now (the compiled step, traced jaxprs, caches: about half a million for DiG-S/2)
    from garbage collection. Call it once the train step has compiled: otherwise each full collection rescans them
    all, stalling the host 0.2-0.3 s every few dozen steps (1.1 s per 180 DiG-S/2 steps on an H100 host)."""
    gc.collect()
    gc.freeze()


class StopRequest:
    """While active, SIGTERM/SIGINT set a flag; the loop then saves a checkpoint and exits cleanly.

    A second SIGINT aborts at once. The previous handlers are restored on exit.
    """

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)


def stop_agreed(stop: StopRequest, step: int, sync_every: int) -> bool:
    """Whether to stop after `step`. With several processes all must stop at the same step (the save is
    collective), so each process's flag is shared every `sync_every` steps and any one of them stops all."""
    if jax.process_count() == 1:
        return stop.signal is not None
    if step % sync_every:
        return False
    return bool(np.any(multihost_utils.process_allgather(np.int32(stop.signal is not None))))


def check_finite(step: int, metrics: dict, checkpointer: ckpt.Checkpointer) -> None:
    if not all(np.isfinite(metrics[key]) for key in ("loss", "grad_norm")):
        checkpointer.wait()
        last = checkpointer.latest_step()
        saved = (f"The last good checkpoint is step {last} in {checkpointer.directory}" if last is not None else
                 f"No checkpoint was saved yet in {checkpointer.directory}")
        raise NonFiniteLossError(
            f"loss={metrics['loss']} grad_norm={metrics['grad_norm']} at step {step}: training diverged and was "
            f"stopped without saving. {saved}; try a lower config.optimizer.learning_rate or set "
            f"config.optimizer.grad_clip_norm.")


def host_ema(state: dict):
    """The EMA parameters on the host. FSDP may spread them over several processes: every process must call this."""
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(state["ema"], tiled=True)
    return jax.device_get(state["ema"])


def save_sample_grid(config: ConfigDict, model: nnx.Module, ema_params, workdir: str, step: int,
                     decode=None) -> str:
    """Samples `config.sample.per_class` images of every class with the EMA weights into samples_<step>.png: the grid
    `python -m dig_jax.sample --all_classes --per_class P --seed <config.seed>` with the same settings reproduces.

    decode: latents -> images (DataSpace.decode) in latent space.
    """
    nnx.update(model, ema_params)
    s = config.sample
    _, _, grid = sample_grid(model, range(config.model.num_classes), s.per_class, config.seed, decode=decode,
                             num_steps=s.num_steps, sampler=s.sampler, cfg_scale=s.cfg_scale,
                             clip_denoised=config.data.space == "pixel")
    path = os.path.join(workdir, f"samples_{step}.png")
    save_png(path, grid)
    return path


def train(config: ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) training; returns the last logged metrics."""
    distributed.initialize(config)  # first: connects the processes of a multi-host job before any device is used
    validate_config(config)
    check_workdir(workdir)
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    config_json = config.to_json_best_effort(indent=2)
    ckpt.check_run_config(workdir, config_json)

    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, seq=config.mesh.seq)
    if is_main:  # process 0 alone writes config.json, logs, metrics and samples; every process saves its shards
        print(f"{distributed.describe_processes()}; mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']} x "
              f"seq={mesh.shape['seq']}", flush=True)
    trainer = build_trainer(config, mesh)
    state = trainer.initial_state()
    space, data_sharding = trainer.space, trainer.data_sharding
    try:  # loads the Inception weights and the reference statistics before the first step
        evaluator = TrainingEvaluator(config, space.decode) if config.eval.every else None
    except ValueError as error:
        raise ConfigError(str(error)) from error

    source = create_dataset(config.data.name, split=config.data.split, image_size=config.data.image_size,
                            **config.data.kwargs.to_dict())
    loader = make_loader(source, global_batch_size=config.global_batch_size, seed=config.seed,
                         random_flip=config.data.random_flip, batch_reads=config.data.batch_reads,
                         worker_count=config.data.worker_count, read_threads=config.data.read_threads,
                         prefetch=config.data.prefetch)

    if is_main:
        print(f"Data: {source!r}, {len(source)} records, read {loader.reading}; batch {config.global_batch_size}, "
              f"{config.steps_per_call} step(s) per call", flush=True)
    checkpointer = ckpt.Checkpointer(workdir, keep=config.keep_checkpoints)
    start_step = checkpointer.latest_step() or 0
    if start_step % config.steps_per_call:  # checked before the restore, which can take minutes
        raise ConfigError(f"the checkpoint of step {start_step} cannot resume with config.steps_per_call="
                          f"{config.steps_per_call}: use a value that divides {start_step}")
    if start_step:
        state = distributed.restore_checkpoint(checkpointer, start_step, state, loader)
        if is_main:
            print(f"Resumed from step {start_step} in {checkpointer.directory}", flush=True)
    if is_main:  # recorded once its checkpoint (if any) restored with it
        ckpt.write_run_config(workdir, config_json)
    if start_step >= config.num_steps and is_main:
        print(f"Nothing to do: the run already reached config.num_steps={config.num_steps}.", flush=True)

    logger = MetricsLogger(workdir, start_step=start_step, total_steps=config.num_steps,
                           global_batch_size=config.global_batch_size, is_main=is_main)

    def log(step, metrics):
        scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
        check_finite(step, scalars, checkpointer)  # before logging: a diverged step is no log row
        return logger.write(step, scalars)

    logged, stopping = {}, False
    unlogged = None  # (step, metrics) to log once the next call is dispatched (see below)
    if is_main and start_step < config.num_steps:
        print(f"Compiling the train step of {config.model.name} (the first step waits for it) ...", flush=True)
    with StopRequest() as stop:
        try:
            steps_per_call = config.steps_per_call
            for step in range(start_step + steps_per_call, config.num_steps + 1, steps_per_call):
                started = time.perf_counter()
                batches = to_global_batch(next_batches(loader, steps_per_call), data_sharding)
                logger.count_data_time(time.perf_counter() - started)
                # The steps up to and including `step`.
                state, metrics = trainer.train_steps(state, batches, space.frozen)
                if step == start_step + steps_per_call:  # compiled
                    freeze_long_lived_objects()
                if unlogged:  # waits for the previous call only: this one is already queued behind it
                    logged, unlogged = log(*unlogged), None
                last = step == config.num_steps
                stopping = stop_agreed(stop, step, config.log_every)
                logging = step % config.log_every == 0 or last
                saving = step % config.checkpoint_every == 0 or last or stopping
                evaluating = evaluator is not None and step % config.eval.every == 0 and not stopping
                if logging:
                    if saving or evaluating:  # they wait for the step anyway
                        logged = log(step, metrics)
                    else:  # fetched after the next dispatch, so that the GPU does not idle while the host logs
                        unlogged = (step, metrics)
                if saving:
                    if not logging:  # a logged step was checked above
                        check_finite(step, jax.device_get(metrics), checkpointer)
                    checkpointer.save(step, state, loader)
                if evaluating:
                    nnx.update(trainer.model, host_ema(state))  # every process samples the same images
                    logger.write_eval(step, evaluator(trainer.model))
                if stopping:
                    print(f"{stop.signal or 'a signal on another process'} received: saved step {step} to "
                          f"{checkpointer.directory}; rerun the same command to resume.", flush=True)
                    break
        finally:
            loader.close()
            checkpointer.close()
            logger.close()
    grid_exists = os.path.exists(os.path.join(workdir, f"samples_{int(state['step'])}.png"))  # a rerun keeps it
    if not stopping and config.sample.per_class and not grid_exists:
        ema = host_ema(state)
        if is_main:
            path = save_sample_grid(config, trainer.model, ema, workdir, int(state["step"]), space.decode)
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
        exit_with_error(str(error))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=parse_config_flags)
