"""ImageNet-1k (TFDS "imagenet2012") as a random-access source, read without TensorFlow, plus a data-dir validator.

Training reads the TFDS-prepared ArrayRecord files through `tfds.data_source` (random access, no TensorFlow),
decodes the stored JPEG bytes with PIL and applies the ADM center crop; the loader adds the random flip.

Preparing the files is a one-time step (it needs TensorFlow installed; reading them does not):

    mkdir -p DATA_DIR/downloads/manual
    # put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from image-net.org) there, then:
    tfds build imagenet2012 --data_dir DATA_DIR --file_format array_record

Check a data dir with:

    python -m dig_jax.data.imagenet --data_dir DATA_DIR --dry_run
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import sys
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from dig_jax.data.transforms import adm_center_crop

DATASET_NAME = "imagenet2012"
_MANUAL_TARS = {
    "train": "ILSVRC2012_img_train.tar",
    "validation": "ILSVRC2012_img_val.tar",
    "test": "ILSVRC2012_img_test.tar",
}


class ImageNetDataError(ValueError):
    """The data dir cannot be read as prepared imagenet2012; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class ImageNetSummary:
    """What `validate_data_dir` found: the prepared version, its folder, and examples per split."""

    version: str
    version_dir: Path
    split_sizes: dict[str, int]
    class_names: list[str]


def _build_instructions(data_dir: Path) -> str:
    return (
        f"Download {_MANUAL_TARS['train']} and {_MANUAL_TARS['validation']} from https://image-net.org into "
        f"{data_dir / 'downloads' / 'manual'} and run "
        f"`tfds build {DATASET_NAME} --data_dir {data_dir} --file_format array_record` "
        "(building needs `pip install tensorflow` once; training reads the files without it)."
    )


def _prepared_versions(dataset_dir: Path) -> list[str]:
    """Version folders of `dataset_dir` that hold a dataset_info.json, highest version first."""
    if not dataset_dir.is_dir():
        return []
    versions = [
        child.name
        for child in dataset_dir.iterdir()
        if tfds.core.Version.is_valid(child.name) and (child / "dataset_info.json").is_file()
    ]
    return sorted(versions, key=tfds.core.Version, reverse=True)


def _check_array_record(info: tfds.core.DatasetInfo, version_dir: Path) -> None:
    formats = {f.value for f in info.available_file_formats()}
    if "array_record" in formats:
        return
    found = ", ".join(sorted(formats)) or "no file format"
    raise ImageNetDataError(
        f"{version_dir} holds {DATASET_NAME} as {found}, but random access without TensorFlow needs array_record. "
        f"Convert it in place with `tfds convert_format --dataset_version_dir {version_dir} "
        "--out_file_format array_record` (needs TensorFlow to read the old files), or rebuild it with "
        f"`tfds build {DATASET_NAME} --data_dir {version_dir.parent.parent} --file_format array_record --overwrite`."
    )


def _check_split(info: tfds.core.DatasetInfo, version_dir: Path, split: str) -> None:
    if split not in info.splits:
        tar = _MANUAL_TARS.get(split, f"the archive of split {split!r}")
        data_dir = version_dir.parent.parent
        raise ImageNetDataError(
            f"{version_dir} has no {split!r} split (found: {', '.join(info.splits) or 'none'}). "
            f"Put {tar} into {data_dir / 'downloads' / 'manual'} next to the other archives and rebuild with "
            f"`tfds build {DATASET_NAME} --data_dir {data_dir} --file_format array_record --overwrite`."
        )
    expected_shards = len(info.splits[split].shard_lengths)
    shards = list(version_dir.glob(f"{DATASET_NAME}-{split}.array_record-*"))
    if len(shards) != expected_shards:
        raise ImageNetDataError(
            f"{version_dir} should hold {expected_shards} array_record shards of split {split!r} but has "
            f"{len(shards)}: the copy is incomplete. Copy the whole folder again or rebuild the dataset."
        )


def validate_data_dir(data_dir: str | Path, splits: tuple[str, ...] = ("train",)) -> ImageNetSummary:
    """Checks that `data_dir` holds imagenet2012 prepared as array_record with `splits`; reads no images.

    Returns:
      the newest prepared version found, with the size of every split it has.

    Raises:
      ImageNetDataError: with the command that fixes it, when the folder is missing, has no prepared
        imagenet2012, is in another file format (e.g. tfrecord), or lacks one of `splits` (or its files).
    """
    data_dir = Path(data_dir).expanduser().absolute()
    if not data_dir.is_dir():
        raise ImageNetDataError(f"ImageNet data_dir {data_dir} does not exist. {_build_instructions(data_dir)}")
    versions = _prepared_versions(data_dir / DATASET_NAME)
    if not versions:
        raise ImageNetDataError(
            f"{data_dir} has no prepared {DATASET_NAME} (expected {data_dir / DATASET_NAME}/<version>/"
            f"dataset_info.json, e.g. version 5.1.0). {_build_instructions(data_dir)}"
        )
    version_dir = data_dir / DATASET_NAME / versions[0]
    info = tfds.builder_from_directory(str(version_dir)).info
    _check_array_record(info, version_dir)
    for split in splits:
        _check_split(info, version_dir, split)
    return ImageNetSummary(
        version=versions[0],
        version_dir=version_dir,
        split_sizes={name: split.num_examples for name, split in info.splits.items()},
        class_names=list(info.features["label"].names),
    )


class ImageNet2012:
    """Random-access ImageNet: `ds[i]` -> {"image": uint8 [image_size, image_size, 3], "label": int32 []}.

    Images are the ADM center crops (see `adm_center_crop`) of the stored JPEGs. Labels index `class_names`,
    the WordNet ids in sorted order: the same indices as an ImageFolder over the train folders (DiT, DiG).
    """

    def __init__(self, *, data_dir: str | Path, split: str = "train", image_size: int = 256):
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        summary = validate_data_dir(data_dir, splits=(split,))
        self.split = split
        self.image_size = image_size
        self.version = summary.version
        self.class_names = summary.class_names
        self.num_classes = len(summary.class_names)
        self._records = tfds.data_source(
            f"{DATASET_NAME}:{summary.version}",
            split=split,
            data_dir=str(summary.version_dir.parent.parent),
            download=False,
            # Keep the JPEG bytes: PIL decodes them here, the same way for every install.
            decoders={"image": tfds.decode.SkipDecoding()},
        )

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        # No data_dir: a loader state saved on one machine must restore where the files live elsewhere.
        return (
            f"ImageNet2012(version={self.version!r}, split={self.split!r}, image_size={self.image_size}, "
            f"num_records={len(self)})"
        )

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        record = self._records[int(index)]
        with Image.open(io.BytesIO(record["image"])) as image:
            pixels = adm_center_crop(image, self.image_size)
        return {"image": pixels, "label": np.int32(record["label"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check a TFDS imagenet2012 data dir (array_record, no TensorFlow).")
    parser.add_argument("--data_dir", required=True, help="the TFDS data dir that holds imagenet2012/<version>/")
    parser.add_argument(
        "--dry_run", action="store_true", help="also decode and crop the first image of each checked split"
    )
    parser.add_argument("--splits", default="train,validation", help="comma-separated splits that must exist")
    parser.add_argument("--image_size", type=int, default=256, help="crop size for --dry_run")
    args = parser.parse_args(argv)
    splits = tuple(s for s in args.splits.split(",") if s)
    try:
        summary = validate_data_dir(args.data_dir, splits=splits)
    except ImageNetDataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"{DATASET_NAME} {summary.version} at {summary.version_dir} (array_record, {len(summary.class_names)} classes)"
    )
    for name, size in summary.split_sizes.items():
        print(f"  {name}: {size} examples")
    if args.dry_run:
        for split in splits:
            example = ImageNet2012(data_dir=args.data_dir, split=split, image_size=args.image_size)[0]
            image = example["image"]
            print(f"  {split}[0]: image {image.dtype} {list(image.shape)}, label {int(example['label'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
