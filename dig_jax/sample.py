"""Samples images from a training run's EMA weights: `python -m dig_jax.sample --workdir DIR`.

Examples:
    python -m dig_jax.sample --workdir workdirs/quickstart --per_class 8 --num_steps 50 --cfg_scale 2
    python -m dig_jax.sample --workdir runs/dig_xl2 --classes 207,360,387 --sampler dpm++2m --num_steps 20
    python -m dig_jax.sample --workdir runs/dig_xl2 --num_images 50000 --cfg_scale 1.5 --batch_size 256
    python -m dig_jax.sample --workdir workdirs/quickstart --per_class 4 --upsample_guidance 2

The run's config.json rebuilds the model; only the EMA weights of the checkpoint are read. Class selections
(--classes, --all_classes, or by default the first 16 classes) write a PNG grid, one row per class, and an ADM-layout
.npz (arr_0 uint8 images, arr_1 labels); --num_images (random classes, e.g. 50K for FID) writes the .npz, and a PNG
grid only if --png is given. Outputs default to DIR/samples/<name>.{png,npz}, named after the step and the settings.

--num_images runs on every device of every process (launch one process per host as for training; the environment
variables of dig_jax/distributed.py connect them) and each process takes its share of the batches of one global
stream: image i's class and noise depend only on (--seed, i), so the result does not depend on the number of
devices or hosts. Each finished batch is saved to <npz without .npz>.parts/ (on a filesystem every host sees); a
rerun of the same command skips them, so an interrupted run resumes. Process 0 then writes the .npz and removes
the parts. Class grids are computed by process 0 alone.
"""

import argparse
import json
import os
import shutil
import sys
import time

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from dig_jax import checkpoint as ckpt
from dig_jax import distributed
from dig_jax.config_base import base_config, model_from_config
from dig_jax.diffusion.upsample_guidance import DEFAULT_ETA, DEFAULT_THETA, UpsampleGuidance
from dig_jax.images import atomic_write_bytes, make_grid, save_npz, save_npz_chunks, save_png
from dig_jax.models import split_params
from dig_jax.sampling import SAMPLERS, local_mesh, random_classes, sample_grid, sample_images
from dig_jax.vae import load_vae
from dig_jax.vae_programs import make_decoder

DEFAULT_GRID_CLASSES = 16  # classes in the default grid (all of them for smaller label sets)


class SampleError(ValueError):
    """The run or the arguments cannot be sampled as given; the message names the problem."""


def load_ema_model(workdir: str, step: int | None = None) -> tuple[nnx.Module, ConfigDict, int]:
    """The model of the run in `workdir` holding the EMA weights of checkpoint `step` (default: the latest).

    Returns (model, the run's config, the step restored). The weights are replicated over this process's devices
    (`dig_jax.sampling.local_mesh`), ready for sampling; with several processes each restores its own copy.
    """
    config = load_run_config(workdir)
    checkpointer = ckpt.Checkpointer(workdir)
    try:
        step = _checked_step(checkpointer, step)
        model = model_from_config(config)
        _, params, _ = split_params(model)
        replicated = NamedSharding(local_mesh(), PartitionSpec())
        abstract_ema = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), params)
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


def select_classes(args: argparse.Namespace, num_classes: int) -> list[int] | None:
    """The classes of a grid (--classes, --all_classes, or the first ones), None for --num_images."""
    if args.num_images is not None:
        return None
    if args.all_classes:
        return list(range(num_classes))
    if args.classes is None:
        return list(range(min(num_classes, DEFAULT_GRID_CLASSES)))
    bad = [c for c in args.classes if not 0 <= c < num_classes]
    if bad:
        raise SampleError(f"--classes {bad}: class indices must be in [0, {num_classes - 1}] for this model")
    return args.classes


def upsample_settings(args: argparse.Namespace) -> UpsampleGuidance | None:
    if args.upsample_guidance is None:
        return None
    return UpsampleGuidance(args.upsample_guidance, args.upsample_theta, args.upsample_eta)


def output_paths(args: argparse.Namespace, step: int, num_images: int) -> tuple[str | None, str]:
    """(png or None, npz): the paths given, else defaults in <workdir>/samples/. The npz is always written; the PNG
    grid by default only for class selections."""
    settings = f"{args.sampler}{args.num_steps}_cfg{args.cfg_scale:g}"
    if args.sampler == "ddim" and args.eta:
        settings += f"_eta{args.eta:g}"
    if args.upsample_guidance is not None:
        settings += f"_ug{args.upsample_guidance}x{args.upsample_theta:g}x{args.upsample_eta:g}"
    stem = os.path.join(args.workdir, "samples", f"step{step}_{settings}_seed{args.seed}_{num_images}img")
    png = args.png or (stem + ".png" if args.num_images is None else None)
    return png, args.npz or stem + ".npz"


def sample_in_parts(model: nnx.Module, labels: np.ndarray, seed: int, npz_path: str, *, batch_size: int,
                    decode, record: dict, **settings) -> None:
    """Samples the stream's images [0, N) of `labels` [N] into the ADM npz at `npz_path`, resumably.

    Batch b (images [b * batch_size, (b + 1) * batch_size)) is computed by process b % process_count and saved to
    <npz_path without .npz>.parts/ as soon as it is done; batches found there are skipped. `record` (the settings
    that determine the images) is kept in the folder and must match on resume. Once every process is through,
    process 0 writes the npz from the parts and removes them.
    """
    parts = os.path.splitext(npz_path)[0] + ".parts"
    _check_parts_record(parts, record)
    batches = [(start, min(start + batch_size, len(labels))) for start in range(0, len(labels), batch_size)]
    mine = batches[jax.process_index()::jax.process_count()]
    todo = [batch for batch in mine if not os.path.exists(_part_path(parts, *batch))]
    prefix = f"[process {jax.process_index()}/{jax.process_count()}] " if jax.process_count() > 1 else ""
    total = sum(end - start for start, end in todo)
    print(f"{prefix}{len(mine) - len(todo)} of {len(mine)} batches already in {parts}; sampling {total} images on "
          f"{jax.local_device_count()} devices", flush=True)
    started, done = time.perf_counter(), 0
    for index, (start, end) in enumerate(todo):
        images = sample_images(model, labels[start:end], seed, batch_size=batch_size, first_index=start,
                               decode=decode, **settings)
        save_npz(_part_path(parts, start, end), images, labels[start:end])
        done += end - start
        seconds = time.perf_counter() - started
        print(f"{prefix}batch {index + 1}/{len(todo)} (images {start}-{end - 1}): {done}/{total} images, "
              f"{done / seconds:.2f} images/s including compilation, {(total - done) * seconds / done:.0f} s left",
              flush=True)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("dig_jax.sample: all parts written")
    if jax.process_index() == 0:
        _write_npz_from_parts(parts, batches, labels, npz_path)
        shutil.rmtree(parts)


def _part_path(parts: str, start: int, end: int) -> str:
    return os.path.join(parts, f"images_{start:07d}-{end - 1:07d}.npz")


_RECORD_FILE = "settings.json"


def _check_parts_record(parts: str, record: dict) -> None:
    path = os.path.join(parts, _RECORD_FILE)
    if not os.path.exists(path):
        atomic_write_bytes(path, json.dumps(record, indent=2, sort_keys=True).encode())
        return
    with open(path) as f:
        saved = json.load(f)
    if saved != record:
        different = sorted(key for key in record.keys() | saved.keys() if saved.get(key) != record.get(key))
        raise SampleError(f"{parts} holds images sampled with other settings ({', '.join(different)}: "
                          f"{ {k: saved.get(k) for k in different} } there, { {k: record.get(k) for k in different} } "
                          f"now): delete that folder or pass another --npz")


def _write_npz_from_parts(parts: str, batches: list, labels: np.ndarray, npz_path: str) -> None:
    missing = [_part_path(parts, *batch) for batch in batches if not os.path.exists(_part_path(parts, *batch))]
    if missing:
        raise SampleError(f"{len(missing)} batches are missing from {parts} (e.g. {missing[0]}): did a process "
                          f"fail? Rerun the same command to sample them")

    def chunks():
        for start, end in batches:
            with np.load(_part_path(parts, start, end), allow_pickle=False) as part:
                yield part["arr_0"]

    with np.load(_part_path(parts, *batches[0]), allow_pickle=False) as first:
        image_shape = first["arr_0"].shape[1:]
    save_npz_chunks(npz_path, chunks(), (len(labels), *image_shape), labels)


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


def _upsample_factor(text: str) -> int:
    if not (text.isdigit() and int(text) >= 2):
        raise argparse.ArgumentTypeError(f"expected an integer resolution multiple >= 2, got {text!r}")
    return int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dig_jax.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="the training run's --workdir")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddpm",
                        help="ancestral DDPM, DDIM, or DPM-Solver++(2M) (default: ddpm)")
    parser.add_argument("--num_steps", type=_positive_int, default=250,
                        help="sampling steps (default: 250; DPM-Solver++ needs about 20)")
    parser.add_argument("--cfg_scale", type=float, default=1.0,
                        help="classifier-free guidance scale (default: 1, no guidance)")
    parser.add_argument("--guided_channels", type=_guided_channels, default=3,
                        help="eps channels guidance applies to, or 'all' (default: 3, DiT's choice)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise (default: 0, deterministic)")
    parser.add_argument("--upsample_guidance", type=_upsample_factor, metavar="M",
                        help="sample at M times the trained resolution with upsample guidance (arXiv 2404.01709)")
    parser.add_argument("--upsample_theta", type=float, default=DEFAULT_THETA,
                        help=f"upsample guidance scale (default: {DEFAULT_THETA:g})")
    parser.add_argument("--upsample_eta", type=float, default=DEFAULT_ETA,
                        help=f"fraction of the diffusion time, from the noisy end, that upsample guidance applies to "
                             f"(default: {DEFAULT_ETA:g})")
    selection = parser.add_mutually_exclusive_group()
    selection.add_argument("--classes", type=_class_list, help="comma-separated class indices, e.g. 0,5,7")
    selection.add_argument("--all_classes", action="store_true", help="every class of the model")
    selection.add_argument("--num_images", type=_positive_int, help="this many images of uniformly random classes")
    parser.add_argument("--per_class", type=_positive_int, default=4,
                        help="images per selected class, one grid row (default: 4)")
    parser.add_argument("--seed", type=int, default=0,
                        help="(default: 0; the trainer's end-of-training grid uses the run's config.seed)")
    parser.add_argument("--batch_size", type=_positive_int, default=64,
                        help="images per sampling call on each process (default: 64)")
    parser.add_argument("--png", help="PNG grid path (default: <workdir>/samples/<name>.png for class selections)")
    parser.add_argument("--npz", help="ADM-layout .npz path, always written: uint8 [N, H, W, 3] as arr_0, labels as "
                                      "arr_1 (default: <workdir>/samples/<name>.npz)")
    parser.add_argument("--vae_path", help="diffusers AutoencoderKL folder for latent runs (overrides vae.path)")
    args = parser.parse_args(argv)
    if args.eta and args.sampler != "ddim":
        parser.error(f"--eta {args.eta} applies to --sampler ddim only")
    if args.upsample_guidance is None and (args.upsample_theta != DEFAULT_THETA or args.upsample_eta != DEFAULT_ETA):
        parser.error("--upsample_theta and --upsample_eta need --upsample_guidance M")
    if not 0.0 <= args.upsample_eta <= 1.0:
        parser.error(f"--upsample_eta {args.upsample_eta}: expected a fraction in [0, 1]")
    return args


def run(args: argparse.Namespace) -> None:
    # Before any device is used: connects the processes of a multi-host job (from the environment, as training).
    distributed.initialize(ConfigDict({"distributed": base_config().distributed}))
    config = load_run_config(args.workdir)  # checks the arguments against the run before the slow model load
    classes = select_classes(args, config.model.num_classes)
    decode = load_decoder(config, args.vae_path)
    model, config, step = load_ema_model(args.workdir, args.step)
    num_images = args.num_images if classes is None else len(classes) * args.per_class
    png_path, npz_path = output_paths(args, step, num_images)
    settings = dict(num_steps=args.num_steps, sampler=args.sampler, cfg_scale=args.cfg_scale,
                    guided_channels=args.guided_channels, eta=args.eta, clip_denoised=config.data.space == "pixel",
                    upsample=upsample_settings(args))
    description = (f"{args.sampler}, {args.num_steps} steps, cfg {args.cfg_scale:g}"
                   + (f", upsample guidance x{args.upsample_guidance}" if args.upsample_guidance else ""))
    if jax.process_index() == 0:
        print(f"Sampling {num_images} images of step {step} ({description}): {distributed.describe_processes()}",
              flush=True)
    start = time.perf_counter()
    if classes is None:
        labels = random_classes(args.seed, args.num_images, config.model.num_classes)
        record = {"checkpoint_step": step, "seed": args.seed, "num_images": args.num_images,
                  **{key: str(value) for key, value in settings.items()}}
        sample_in_parts(model, labels, args.seed, npz_path, batch_size=args.batch_size, decode=decode,
                        record=record, **settings)
        images = None
    elif jax.process_index() == 0:
        labels, images, grid = sample_grid(model, classes, args.per_class, args.seed, batch_size=args.batch_size,
                                           decode=decode, **settings)
    if jax.process_index() != 0:
        return
    seconds = time.perf_counter() - start
    print(f"Sampled {num_images} images of step {step} in {seconds:.1f} s, {num_images / seconds:.2f} images/s "
          f"including compilation", flush=True)
    if images is not None:
        save_npz(npz_path, images, labels)
    print(f"Wrote {npz_path}", flush=True)
    if png_path:
        if images is None:  # a grid of every random-class image: read back from the npz just written
            with np.load(npz_path, allow_pickle=False) as npz:
                grid = make_grid(npz["arr_0"])
        save_png(png_path, grid)
        print(f"Wrote {png_path}", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except (SampleError, ckpt.CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
