"""ADM's sample metrics from the command line: `python -m dig_jax.evaluate --samples S.npz --reference R.npz`.

Examples:
    python -m dig_jax.evaluate --samples samples.npz --reference VIRTUAL_imagenet256_labeled.npz \
        --inception_weights pt_inception-2015-12-05-6726825d.pth --out results.json
    python -m dig_jax.evaluate --write_reference shapes_32.npz --dataset shapes --image_size 32 \
        --inception_weights inception_fid.safetensors

The first prints FID, sFID, Inception Score, precision and recall (ADM's definitions, dig_jax.evaluation.metrics),
then the same as one JSON line (also written to --out). The second writes reference statistics (and
--store_images images for precision and recall) of a dataset of `dig_jax.data`, in ADM's reference-batch layout.
Bad input prints one `error:` line and exits with status 2. Details: docs/evaluation.md.
"""

import argparse
import json
import sys
import time

from dig_jax.data import create_dataset
from dig_jax.evaluation import (
    EvaluationError,
    FeatureExtractor,
    InceptionWeightsError,
    evaluate,
    load_inception,
    write_reference,
)
from dig_jax.images import atomic_write_bytes

IMAGE_DATASETS = ("shapes", "imagenet2012")  # the datasets of dig_jax.data whose records are images
METRIC_LINES = (("FID", "fid"), ("sFID", "sfid"), ("Inception Score", "inception_score"),
                ("Precision", "precision"), ("Recall", "recall"))


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dig_jax.evaluate", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inception_weights", required=True,
                        help="pytorch-fid's pt_inception-2015-12-05-*.pth, or its .safetensors conversion")
    parser.add_argument("--batch_size", type=int, default=64, help="images per Inception call")
    parser.add_argument("--out", help="also write the results as JSON to this file")
    evaluation = parser.add_argument_group("evaluate samples")
    evaluation.add_argument("--samples", help="npz with arr_0: uint8 [N, H, W, 3] samples")
    evaluation.add_argument("--reference", help="ADM reference batch: arr_0 images and/or mu, sigma, mu_s, sigma_s")
    evaluation.add_argument("--distance_dtype", choices=("float16", "float32"), default="float16",
                            help="precision/recall distances: float16 as ADM (float32 where it overflows)")
    reference = parser.add_argument_group("write reference statistics of a dataset")
    reference.add_argument("--write_reference", metavar="PATH", help="the reference npz to write")
    reference.add_argument("--dataset", choices=IMAGE_DATASETS, help="image dataset of dig_jax.data")
    reference.add_argument("--image_size", type=int, help="image side of the dataset's images")
    reference.add_argument("--split", default="train")
    reference.add_argument("--data_dir", help="dataset folder (imagenet2012: the TFDS data dir)")
    reference.add_argument("--num_images", type=int, default=50_000, help="images the statistics use (at most all)")
    reference.add_argument("--store_images", type=int, default=10_000,
                           help="of those, images stored as arr_0 for precision and recall (0: statistics only)")
    reference.add_argument("--seed", type=int, default=0, help="seed of the random subset of --num_images")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if args.write_reference:
        if args.samples or args.reference:
            raise EvaluationError("--write_reference cannot be combined with --samples/--reference")
        for name in ("dataset", "image_size"):
            if getattr(args, name) is None:
                raise EvaluationError(f"--write_reference needs --{name}")
        if args.image_size < 1:
            raise EvaluationError(f"--image_size must be >= 1, got {args.image_size}")
        if args.dataset == "imagenet2012" and not args.data_dir:
            raise EvaluationError("--dataset imagenet2012 needs --data_dir (the TFDS data dir, docs/imagenet.md)")
    elif not (args.samples and args.reference):
        raise EvaluationError("pass --samples S.npz and --reference R.npz (or --write_reference PATH --dataset ...)")


def run(args: argparse.Namespace) -> dict:
    check_args(args)
    extractor = FeatureExtractor(load_inception(args.inception_weights), batch_size=args.batch_size)
    start = time.perf_counter()
    if args.write_reference:
        kwargs = {"data_dir": args.data_dir} if args.dataset == "imagenet2012" else {}
        try:
            source = create_dataset(args.dataset, split=args.split, image_size=args.image_size, **kwargs)
        except ValueError as error:  # ImageNetDataError is one
            raise EvaluationError(f"--dataset {args.dataset}: {error}") from error
        results = write_reference(args.write_reference, source, extractor, num_images=args.num_images,
                                  store_images=args.store_images, seed=args.seed)
        results["path"] = args.write_reference
        print(f"Wrote {args.write_reference}: statistics of {results['num_images']} images, "
              f"{results['stored_images']} stored", flush=True)
    else:
        results = evaluate(args.samples, args.reference, extractor, distance_dtype=args.distance_dtype)
        for label, key in METRIC_LINES:
            value = results[key]
            print(f"{label}: {value}" if value is not None else f"{label}: n/a (the reference holds no images)")
    results["seconds"] = time.perf_counter() - start
    line = json.dumps(results)
    print(line, flush=True)
    if args.out:
        atomic_write_bytes(args.out, (line + "\n").encode())
    return results


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except (EvaluationError, InceptionWeightsError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
