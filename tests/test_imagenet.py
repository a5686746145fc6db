"""ImageNet through TFDS without TensorFlow: ADM crop, the array_record source, the data-dir validator, the CLI.

The prepared folders are written here the way `tfds build imagenet2012 --file_format array_record` lays them out
(dataset_info.json, features.json, <name>-<split>.array_record-<shard>), with PIL-encoded JPEGs of odd sizes, so
the real `tfds.data_source` reading path runs end to end.
"""

import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from PIL import Image

from dig_jax.data import create_dataset, make_loader
from dig_jax.data.imagenet import ImageNet2012, ImageNetDataError, main, validate_data_dir
from dig_jax.data.transforms import adm_center_crop

# (height, width) of the stored training JPEGs: tiny, tall, square, wide and large enough to be halved twice.
TRAIN_SIZES = [(37, 91), (300, 200), (64, 64), (513, 1030)]
VALIDATION_SIZES = [(80, 120), (120, 80)]


def _jpeg_bytes(height: int, width: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    # Smooth content (a colour ramp plus noise) so JPEG keeps it close and crops are informative.
    ramp = np.linspace(0, 200, width, dtype=np.float32)[None, :, None] + np.zeros((height, 1, 3), np.float32)
    pixels = np.clip(ramp + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_prepared_imagenet(data_dir, split_sizes: dict, file_format: str = "array_record") -> None:
    """Writes a tiny prepared imagenet2012 (one shard per split); example i of a split has label i."""
    builder = tfds.builder("imagenet2012", data_dir=str(data_dir), file_format=file_format)
    version_dir = builder.data_path
    version_dir.mkdir(parents=True, exist_ok=True)
    split_infos = []
    for split, sizes in split_sizes.items():
        template = tfds.core.ShardedFileTemplate(
            data_dir=version_dir, dataset_name="imagenet2012", split=split, filetype_suffix=file_format
        )
        path = template.sharded_filepath(shard_index=0, num_shards=1)
        if file_format == "array_record":
            writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
            for i, (height, width) in enumerate(sizes):
                example = {"image": _jpeg_bytes(height, width, seed=i), "label": i, "file_name": f"{split}_{i}.JPEG"}
                writer.write(builder.info.features.serialize_example(example))
            writer.close()
        else:
            path.write_bytes(b"")  # only the layout matters: the validator must stop before reading
        split_infos.append(
            tfds.core.SplitInfo(name=split, shard_lengths=[len(sizes)], num_bytes=0, filename_template=template)
        )
    builder.info.set_splits(tfds.core.SplitDict(split_infos))
    builder.info.write_to_directory(version_dir)


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    write_prepared_imagenet(data_dir, {"train": TRAIN_SIZES, "validation": VALIDATION_SIZES})
    return data_dir


def test_adm_center_crop_matches_hand_built_reference():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (700, 1100, 3), dtype=np.uint8))  # PIL size (1100, 700)
    # By hand for size 256: 700 >= 512, so one BOX halving to (550, 350); then BICUBIC so the short side is 256:
    # width round(550 * 256 / 350) = 402; center crop columns 73 .. 328.
    halved = image.resize((550, 350), resample=Image.BOX)
    resized = np.asarray(halved.resize((402, 256), resample=Image.BICUBIC))
    expected = resized[0:256, 73:329]
    np.testing.assert_array_equal(adm_center_crop(image, 256), expected)


def test_adm_center_crop_tall_and_small_images_give_exact_squares():
    rng = np.random.default_rng(1)
    tall = Image.fromarray(rng.integers(0, 256, (1000, 257, 3), dtype=np.uint8))
    # 257 >= 2 * 64 twice: halved to (128, 500), then to (64, 250); BICUBIC to the same size; crop rows 93 .. 156.
    quarter = tall.resize((128, 500), resample=Image.BOX).resize((64, 250), resample=Image.BOX)
    expected = np.asarray(quarter.resize((64, 250), resample=Image.BICUBIC))[93:157]
    np.testing.assert_array_equal(adm_center_crop(tall, 64), expected)
    grey_small = Image.fromarray(rng.integers(0, 256, (17, 47), dtype=np.uint8))  # upsampled, grey -> RGB
    assert adm_center_crop(grey_small, 64).shape == (64, 64, 3)


def test_mock_data_source_images_crop_to_exact_squares():
    # tfds' mock yields decoded random images of random sizes without TensorFlow (with SkipDecoding it would
    # need TensorFlow to encode them, so the JPEG path is tested on real files below).
    with tfds.testing.mock_data(num_examples=6):
        records = tfds.data_source("imagenet2012", split="train")
        shapes = set()
        for i in range(len(records)):
            shapes.add(records[i]["image"].shape)
            crop = adm_center_crop(Image.fromarray(records[i]["image"]), 64)
            assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
    assert len(shapes) > 1


def test_source_reads_array_record_jpegs_and_crops(prepared_dir):
    source = create_dataset("imagenet2012", split="train", image_size=64, data_dir=prepared_dir)
    assert isinstance(source, ImageNet2012)
    assert len(source) == len(TRAIN_SIZES)
    assert source.num_classes == 1000 and source.class_names[0] == "n01440764"
    assert "tfds" not in repr(source) and "split='train'" in repr(source)
    for i, (height, width) in enumerate(TRAIN_SIZES):
        example = source[i]
        assert example["label"] == i and example["label"].dtype == np.int32
        with Image.open(io.BytesIO(_jpeg_bytes(height, width, seed=i))) as stored:
            np.testing.assert_array_equal(example["image"], adm_center_crop(stored, 64))


@pytest.mark.parametrize("worker_count", [0, 2])  # 2: the source is pickled into loader processes
def test_loader_over_imagenet_source(prepared_dir, worker_count):
    source = ImageNet2012(data_dir=prepared_dir, split="validation", image_size=32)
    loader = make_loader(source, global_batch_size=2, seed=0, shard_index=0, shard_count=1,
                         worker_count=worker_count)
    batch = next(loader)
    loader.close()
    assert batch["image"].shape == (2, 32, 32, 3) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert sorted(batch["label"].tolist()) == [0, 1]


def test_validator_summary(prepared_dir):
    summary = validate_data_dir(prepared_dir, splits=("train", "validation"))
    assert summary.version == "5.1.0"
    assert summary.split_sizes == {"train": len(TRAIN_SIZES), "validation": len(VALIDATION_SIZES)}


def test_validator_missing_folder(tmp_path):
    with pytest.raises(ImageNetDataError, match="does not exist") as error:
        validate_data_dir(tmp_path / "nowhere")
    message = str(error.value)
    assert "downloads/manual" in message and "ILSVRC2012_img_train.tar" in message
    assert "tfds build imagenet2012 --data_dir" in message and "--file_format array_record" in message


def test_validator_folder_without_prepared_files(tmp_path):
    (tmp_path / "imagenet2012" / "5.1.0").mkdir(parents=True)  # an interrupted build: no dataset_info.json
    with pytest.raises(ImageNetDataError, match="no prepared imagenet2012") as error:
        validate_data_dir(tmp_path)
    message = str(error.value)
    assert "ILSVRC2012_img_val.tar" in message and str(tmp_path / "downloads" / "manual") in message
    assert f"tfds build imagenet2012 --data_dir {tmp_path} --file_format array_record" in message


def test_validator_tfrecord_format(tmp_path):
    write_prepared_imagenet(tmp_path, {"train": TRAIN_SIZES}, file_format="tfrecord")
    with pytest.raises(ImageNetDataError, match="as tfrecord") as error:
        validate_data_dir(tmp_path)
    message = str(error.value)
    assert "tfds convert_format" in message and "--out_file_format array_record" in message
    assert "--file_format array_record --overwrite" in message


def test_validator_missing_split_and_missing_shards(tmp_path):
    write_prepared_imagenet(tmp_path, {"train": TRAIN_SIZES[:1]})
    with pytest.raises(ImageNetDataError, match="no 'validation' split") as error:
        validate_data_dir(tmp_path, splits=("train", "validation"))
    assert "ILSVRC2012_img_val.tar" in str(error.value) and "found: train" in str(error.value)
    next((tmp_path / "imagenet2012" / "5.1.0").glob("*train.array_record*")).unlink()
    with pytest.raises(ImageNetDataError, match="incomplete"):
        validate_data_dir(tmp_path)


def test_cli_dry_run(prepared_dir, tmp_path, capsys):
    assert main(["--data_dir", str(prepared_dir), "--dry_run", "--image_size", "32"]) == 0
    output = capsys.readouterr().out
    assert "train: 4 examples" in output and "validation: 2 examples" in output
    assert "train[0]: image uint8 [32, 32, 3], label 0" in output
    assert main(["--data_dir", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
