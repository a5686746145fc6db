"""Class-conditional sampling with a trained model: DDPM, DDIM or DPM-Solver++(2M), optional classifier-free
guidance and upsample guidance, sharded over this process's devices.

Randomness is per image: image i of a seed's stream is drawn with `image_keys(seed, i, 1)` (its x_T and any step
noise) and, for random classes, has class `random_classes(seed, ...)[i]`, so an image depends only on (seed, i)
and the settings, never on the batch, the number of devices or of processes that computed it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dig_jax.diffusion import cfg_model_fn, create_diffusion
from dig_jax.diffusion.dpm_solver import dpm_solver_2m_sample_loop
from dig_jax.diffusion.upsample_guidance import UpsampleGuidance, upsample_guided_model_fn
from dig_jax.images import make_grid, to_uint8
from dig_jax.models import at_input_size

SAMPLERS = ("ddpm", "ddim", "dpm++2m")
GRID_BATCH_SIZE = 64  # images per call for sample grids: the trainer's and the CLI's grids use the same batches
_NOISE_STREAM, _CLASS_STREAM = 0, 1


def image_keys(seed: int, first_index: int, count: int) -> jax.Array:
    """PRNG keys [count] of images first_index, ..., first_index + count - 1 of the stream of `seed`."""
    root = jax.random.fold_in(jax.random.key(seed), _NOISE_STREAM)
    return jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.arange(first_index, first_index + count))


def random_classes(seed: int, num_images: int, num_classes: int) -> np.ndarray:
    """int32 [num_images]: uniformly random classes, image i's drawn from (seed, i) alone (a prefix of a longer
    stream is the shorter stream)."""
    root = jax.random.fold_in(jax.random.key(seed), _CLASS_STREAM)
    draw = jax.vmap(lambda i: jax.random.randint(jax.random.fold_in(root, i), (), 0, num_classes))
    return np.asarray(draw(jnp.arange(num_images)), np.int32)


def local_mesh() -> Mesh:
    """A 1-D mesh ("batch",) over this process's devices: each process samples its own images."""
    return Mesh(np.asarray(jax.local_devices()), ("batch",))


def replicate_locally(model: nnx.Module) -> None:
    """Places the model's state on every device of this process, in place, as `generate` needs it: done once, the
    calls that follow do not copy it (arrays already placed so, like `load_ema_model`'s, are not copied at all)."""
    nnx.update(model, jax.device_put(nnx.state(model), NamedSharding(local_mesh(), PartitionSpec())))


def generate(model: nnx.Module, labels, keys: jax.Array, *, num_steps: int = 250, sampler: str = "ddpm",
             cfg_scale: float = 1.0, guided_channels: int | None = 3, eta: float = 0.0, clip_denoised: bool = False,
             upsample: UpsampleGuidance | None = None, decode=None):
    """Samples one image per label, the batch split over this process's devices.

    Args:
      model: a DiG/DiT (its config gives the latent shape and the null class = num_classes).
      labels: int [N] class indices.
      keys: PRNG keys [N], one per image (`image_keys`): image i depends on keys[i] and labels[i] only.
      num_steps: sampling steps. ddpm/ddim: respaced diffusion steps (ADM semantics: "250" keeps
        t = round(i * 999 / 249); DDIM takes DDIM's stride); dpm++2m: solver steps uniform in time (one model
        evaluation each).
      sampler: "ddpm" (ancestral), "ddim" (eta 0 = deterministic) or "dpm++2m" (DPM-Solver++(2M), deterministic).
      cfg_scale: classifier-free guidance scale; 1.0 disables guidance (and the doubled batch).
      guided_channels: eps channels that guidance applies to (3 = DiT's choice); None for all.
      clip_denoised: clip each step's x0 prediction to [-1, 1] (ADM's choice for pixel-space models; DiT's
        latent models do not clip).
      upsample: sample at upsample.factor times the model's size with upsample guidance; None for the model's size.
      decode: optional latents -> images function (the VAE); None for pixel-space models. Pass the same function
        object on every call: it is part of the compilation cache key.
    Returns:
      float32 [N, H, W, C] in the model's space (or decoded images in [-1, 1] when `decode` is given), H = W =
      the model's input size (times the upsample factor).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    labels = jnp.asarray(labels, jnp.int32)
    if keys.shape != labels.shape:
        raise ValueError(f"expected one key per label ({labels.shape[0]}), got keys of shape {keys.shape}")
    mesh = local_mesh()
    count = labels.shape[0]
    pad = -count % mesh.size  # a batch every device takes an equal share of
    labels = jnp.concatenate([labels, jnp.repeat(labels[-1:], pad)])
    keys = jnp.concatenate([keys, jnp.repeat(keys[-1:], pad)])
    rows, replicated = NamedSharding(mesh, PartitionSpec("batch")), NamedSharding(mesh, PartitionSpec())
    graphdef, state = nnx.split(model)
    high_graphdef, high_state = None, None
    if upsample is not None:
        high_graphdef, high_state = nnx.split(at_input_size(model, upsample.factor * model.config.input_size))
        high_state = jax.device_put(high_state, replicated)
    samples = _sample_loop(graphdef, jax.device_put(state, replicated), high_graphdef, high_state,
                           jax.device_put(labels, rows), jax.device_put(keys, rows), num_steps=num_steps,
                           sampler=sampler, cfg_scale=float(cfg_scale), guided_channels=guided_channels,
                           eta=float(eta), clip_denoised=bool(clip_denoised), upsample=upsample, decode=decode)
    return samples[:count]


@functools.partial(jax.jit, static_argnames=("graphdef", "high_graphdef", "num_steps", "sampler", "cfg_scale",
                                             "guided_channels", "eta", "clip_denoised", "upsample", "decode"))
def _sample_loop(graphdef, state, high_graphdef, high_state, labels, keys, *, num_steps, sampler, cfg_scale,
                 guided_channels, eta, clip_denoised, upsample, decode):
    # Compiled once per (model structure, settings, batch size): later batches reuse the program.
    net = nnx.merge(graphdef, state)
    config = net.config
    base = create_diffusion(learn_sigma=config.learn_sigma)  # the training schedule the model's timesteps index
    size = config.input_size

    def model_fn(x, t, y):
        return net(x, t, y, train=False)

    if upsample is not None:
        high_net = nnx.merge(high_graphdef, high_state)
        model_fn = upsample_guided_model_fn(lambda x, t, y: high_net(x, t, y, train=False), model_fn,
                                            base.schedule.alphas_cumprod, upsample)
        size *= upsample.factor
    if cfg_scale != 1.0:
        model_fn = cfg_model_fn(model_fn, cfg_scale, null_class=config.num_classes, guided_channels=guided_channels)
    shape = (labels.shape[0], size, size, config.in_channels)
    if sampler == "dpm++2m":
        samples = dpm_solver_2m_sample_loop(model_fn, shape, keys, labels, base.schedule.alphas_cumprod,
                                            num_steps=num_steps, learn_sigma=config.learn_sigma,
                                            clip_denoised=clip_denoised)
    elif sampler == "ddpm":
        diffusion = create_diffusion(str(num_steps), learn_sigma=config.learn_sigma)
        samples = diffusion.p_sample_loop(model_fn, shape, keys, labels, clip_denoised=clip_denoised)
    else:
        diffusion = create_diffusion(f"ddim{num_steps}", learn_sigma=config.learn_sigma)
        samples = diffusion.ddim_sample_loop(model_fn, shape, keys, labels, eta=eta, clip_denoised=clip_denoised)
    return samples if decode is None else decode(samples)


def sample_images(model: nnx.Module, labels: np.ndarray, seed: int, *, batch_size: int, first_index: int = 0,
                  decode=None, **settings) -> np.ndarray:
    """uint8 [N, H, W, C] images for int labels [N], `batch_size` at a time: image i is image first_index + i of the
    stream of `seed` (see the module doc).

    `settings` go to `generate` (num_steps, sampler, cfg_scale, guided_channels, eta, clip_denoised, upsample);
    `decode` (latents -> images, e.g. dig_jax.sample.load_decoder) runs after each batch, outside the sampler's
    program, so that the VAE's weights stay arguments of its own compiled function.
    """
    replicate_locally(model)
    batches = []
    for start in range(0, len(labels), batch_size):
        batch = labels[start:start + batch_size]
        # The last batch is padded to the full size (one batch shape, one compilation); the padding images are
        # the stream's next ones, sampled and dropped.
        padded = np.pad(batch, (0, batch_size - len(batch)), mode="edge")
        images = generate(model, padded, image_keys(seed, first_index + start, batch_size), **settings)
        if decode is not None:
            images = decode(images)
        batches.append(to_uint8(images)[:len(batch)])
    return np.concatenate(batches)


def sample_grid(model: nnx.Module, classes, per_class: int, seed: int, *, batch_size: int = GRID_BATCH_SIZE,
                decode=None, **settings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A grid with one row of `per_class` images per class: what the trainer writes at the end of training and
    `python -m dig_jax.sample` in class mode (the same images for the same classes, seed and settings).

    Returns (labels int32 [R * per_class], images uint8 [R * per_class, H, W, C], grid uint8 image).
    """
    labels = np.repeat(np.asarray(classes, np.int32), per_class)
    images = sample_images(model, labels, seed, batch_size=batch_size, decode=decode, **settings)
    return labels, images, make_grid(images, columns=per_class)
