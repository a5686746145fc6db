"""Samples images from a training run's EMA weights: `python -m dig_jax.sample --workdir DIR`.

Examples:
    python -m dig_jax.sample --workdir workdirs/quickstart --per_class 8 --num_steps 50 --cfg_scale 2
    python -m dig_jax.sample --workdir runs/dig_xl2 --classes 207,360,387 --sampler ddim --num_steps 50
    python -m dig_jax.sample --workdir runs/dig_xl2 --num_images 50000 --cfg_scale 1.5 --npz samples.npz

The run's config.json rebuilds the model; only the EMA weights of the checkpoint are read. Class selections
(--classes, --all_classes, or by default the first 16 classes) write a PNG grid, one row per class, and an ADM-layout
.npz; --num_images (random classes, e.g. 50K for FID) writes only the .npz unless --png is given. Default outputs go
to DIR/samples/, named after the step and the settings. Every process computes the same images; process 0 writes.
"""

import argparse
import os
import sys
import time

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from dig_jax import checkpoint as ckpt
from dig_jax.config_base import model_from_config
from dig_jax.images import make_grid, save_npz, save_png, to_uint8
from dig_jax.latents import make_decoder
from dig_jax.models import split_params
from dig_jax.sampling import SAMPLERS, generate
from dig_jax.vae import load_vae

DEFAULT_GRID_CLASSES = 16  # classes in the default grid (all of them for smaller label sets)


class SampleError(ValueError):
    """The run or the arguments cannot be sampled as given; the message names the problem."""


def load_ema_model(workdir: str, step: int | None = None) -> tuple[nnx.Module, ConfigDict, int]:
    """The model of the run in `workdir` holding the EMA weights of checkpoint `step` (default: the latest).

    Returns (model, the run's config, the step restored).
    """
    config = load_run_config(workdir)
    checkpointer = ckpt.Checkpointer(workdir)
    try:
        step = _checked_step(checkpointer, step)
        model = model_from_config(config)
        _, params, _ = split_params(model)
        abstract_ema = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        nnx.update(model, checkpointer.restore_ema(step, abstract_ema))
    finally:
        checkpointer.close()
    return model, config, step


def load_run_config(workdir: str) -> ConfigDict:
    """The config.json the run in `workdir` was trained with."""
    if not os.path.isdir(workdir):
        raise SampleError(f"--workdir {workdir} does not exist")
    return ConfigDict(ckpt.read_run_config(workdir))


def _checked_step(checkpointer: ckpt.Checkpointer, step: int | None) -> int:
    latest = checkpointer.latest_step()
    if latest is None:
        raise SampleError(f"no checkpoint in {checkpointer.directory}: train the run first")
    if step is None:
        return latest
    if not os.path.isdir(os.path.join(checkpointer.directory, str(step))):
        raise SampleError(f"--step {step}: no such checkpoint in {checkpointer.directory} (the latest is {latest})")
    return step


def load_decoder(config: ConfigDict, vae_path: str | None = None):
    """x0 latents -> float32 images for latent-space runs (the VAE at `vae_path`, else config.vae.path), the same
    decoding the trainer's sample grid uses; None for pixel-space runs."""
    if config.data.space != "latent":
        return None
    path = vae_path or config.vae.path
    if not path:
        raise SampleError("latent model: pass --vae_path DIR or set vae.path in the run's config.json to the "
                          "diffusers AutoencoderKL folder its latents came from")
    return make_decoder(load_vae(path, dtype=config.vae.get("compute_dtype", "float32")))


def sample_images(model: nnx.Module, labels: np.ndarray, seed: int, *, batch_size: int, decode=None,
                  **settings) -> np.ndarray:
    """uint8 [N, H, W, C] images for int labels [N], `batch_size` at a time.

    Batch i uses the key fold_in(key(seed), i), so the same seed, labels and batch_size give the same images.
    `settings` go to `dig_jax.sampling.generate` (num_steps, sampler, cfg_scale, guided_channels, eta,
    clip_denoised); `decode`
    (see `load_decoder`) turns latents into images after each batch.
    """
    key = jax.random.key(seed)
    batches = []
    for index, start in enumerate(range(0, len(labels), batch_size)):
        batch = labels[start:start + batch_size]
        # The last batch is padded to the full size: one batch shape, one compilation.
        padded = np.pad(batch, (0, batch_size - len(batch)), mode="edge")
        images = generate(model, padded, jax.random.fold_in(key, index), **settings)
        if decode is not None:
            images = decode(images)
        batches.append(to_uint8(images)[:len(batch)])
    return np.concatenate(batches)


def select_labels(args: argparse.Namespace, num_classes: int) -> np.ndarray:
    """int [N]: each selected class `per_class` times in a row (class mode), or `num_images` random classes."""
    if args.num_images is not None:
        return np.random.default_rng(args.seed).integers(num_classes, size=args.num_images, dtype=np.int32)
    if args.all_classes:
        classes = list(range(num_classes))
    elif args.classes is not None:
        classes = args.classes
    else:
        classes = list(range(min(num_classes, DEFAULT_GRID_CLASSES)))
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise SampleError(f"--classes {bad}: class indices must be in [0, {num_classes - 1}] for this model")
    return np.repeat(np.asarray(classes, np.int32), args.per_class)


def output_paths(args: argparse.Namespace, step: int, num_images: int) -> tuple[str | None, str | None]:
    """(png, npz): the paths given, else defaults in <workdir>/samples/ (no PNG for --num_images)."""
    if args.png or args.npz:
        return args.png, args.npz
    settings = f"{args.sampler}{args.num_steps}_cfg{args.cfg_scale:g}"
    if args.sampler == "ddim" and args.eta:
        settings += f"_eta{args.eta:g}"
    stem = os.path.join(args.workdir, "samples", f"step{step}_{settings}_seed{args.seed}_{num_images}img")
    return (None if args.num_images is not None else stem + ".png"), stem + ".npz"


def _class_list(text: str) -> list[int]:
    try:
        return [int(c) for c in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated class indices like 0,5,7, got {text!r}") from None


def _positive_int(text: str) -> int:
    if not (text.isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _guided_channels(text: str) -> int | None:
    if text == "all":
        return None
    if not (text.isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError(f"expected a positive channel count or 'all', got {text!r}")
    return int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dig_jax.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="the training run's --workdir")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddpm", help="(default: ddpm)")
    parser.add_argument("--num_steps", type=_positive_int, default=250, help="respaced diffusion steps (default: 250)")
    parser.add_argument("--cfg_scale", type=float, default=1.0,
                        help="classifier-free guidance scale (default: 1, no guidance)")
    parser.add_argument("--guided_channels", type=_guided_channels, default=3,
                        help="eps channels guidance applies to, or 'all' (default: 3, DiT's choice)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise (default: 0, deterministic)")
    selection = parser.add_mutually_exclusive_group()
    selection.add_argument("--classes", type=_class_list, help="comma-separated class indices, e.g. 0,5,7")
    selection.add_argument("--all_classes", action="store_true", help="every class of the model")
    selection.add_argument("--num_images", type=_positive_int, help="this many images of uniformly random classes")
    parser.add_argument("--per_class", type=_positive_int, default=4,
                        help="images per selected class, one grid row (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="(default: 0)")
    parser.add_argument("--batch_size", type=_positive_int, default=64, help="images per sampling call (default: 64)")
    parser.add_argument("--png", help="PNG grid path")
    parser.add_argument("--npz", help="ADM-layout .npz path: uint8 [N, H, W, 3] as arr_0, labels as arr_1")
    parser.add_argument("--vae_path", help="diffusers AutoencoderKL folder for latent runs (overrides vae.path)")
    args = parser.parse_args(argv)
    if args.eta and args.sampler != "ddim":
        parser.error(f"--eta {args.eta} applies to --sampler ddim only")
    return args


def run(args: argparse.Namespace) -> None:
    config = load_run_config(args.workdir)  # checks the arguments against the run before the slow model load
    labels = select_labels(args, config.model.num_classes)
    decode = load_decoder(config, args.vae_path)
    model, config, step = load_ema_model(args.workdir, args.step)
    png_path, npz_path = output_paths(args, step, len(labels))
    start = time.perf_counter()
    images = sample_images(model, labels, args.seed, batch_size=args.batch_size, decode=decode,
                           num_steps=args.num_steps, sampler=args.sampler, cfg_scale=args.cfg_scale,
                           guided_channels=args.guided_channels, eta=args.eta,
                           clip_denoised=config.data.space == "pixel")
    seconds = time.perf_counter() - start
    print(f"Sampled {len(images)} images of step {step} ({args.sampler}, {args.num_steps} steps, cfg "
          f"{args.cfg_scale:g}) in {seconds:.1f} s, {len(images) / seconds:.2f} images/s including compilation",
          flush=True)
    if jax.process_index() != 0:
        return
    if png_path:
        columns = None if args.num_images is not None else args.per_class
        save_png(png_path, make_grid(images, columns=columns))
        print(f"Wrote {png_path}", flush=True)
    if npz_path:
        save_npz(npz_path, images, labels)
        print(f"Wrote {npz_path}", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except (SampleError, ckpt.CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
