"""The "shapes" dataset, the dataset registry, the loader (sharding, epochs, flips, state; record by record through
grain and a batch at a time) and global batches."""

import multiprocessing
import time

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dig_jax.data import ShapesDataset, create_dataset, make_loader, to_global_batch
from dig_jax.data.loader import LoaderStateError
from dig_jax.data.shapes import SHAPE_CLASSES


class IndexSource:
    """Record i is a 2x2 image filled with i % 256, its right column 0, and label i, so batches reveal which records
    they hold and whether they were mirrored."""

    def __init__(self, num_records: int):
        self.num_records = num_records

    def __len__(self):
        return self.num_records

    def __repr__(self):
        return f"IndexSource({self.num_records})"

    def __getitem__(self, index):
        image = np.full((2, 2, 3), index % 256, np.uint8)
        image[:, 1] = 0
        return {"image": image, "label": index}


class BatchReading:
    """Any per-record source, read by the loader a batch at a time (`read_batch` stacks the records); counts reads."""

    def __init__(self, source):
        self.source = source
        self.batch_reads = 0

    def __len__(self):
        return len(self.source)

    def __repr__(self):
        return f"BatchReading({self.source!r})"

    def read_batch(self, indices):
        self.batch_reads += 1
        records = [self.source[int(i)] for i in indices]
        return {key: np.stack([record[key] for record in records]) for key in records[0]}


def BatchIndexSource(num_records):  # noqa: N802 (used like the IndexSource class beside it)
    return BatchReading(IndexSource(num_records))


BOTH_WAYS = pytest.mark.parametrize("source_class", [IndexSource, BatchIndexSource], ids=["records", "batches"])


def _labels(loader, num_batches):
    return [next(loader)["label"].tolist() for _ in range(num_batches)]


def _foreground(image: np.ndarray) -> np.ndarray:
    """Pixels far from the background colour (the colour of the most common corner)."""
    pixels = image.astype(np.float32) / 255
    corners = [pixels[0, 0], pixels[0, -1], pixels[-1, 0], pixels[-1, -1]]
    background = max(corners, key=lambda c: sum(np.abs(c - d).max() < 0.02 for d in corners))
    return np.abs(pixels - background).max(axis=-1) > 0.25


def test_shapes_are_deterministic_random_access_images():
    dataset = create_dataset("shapes", split="train", image_size=32, num_images=100, seed=5)
    assert isinstance(dataset, ShapesDataset) and len(dataset) == 100
    assert len(set(dataset.class_names)) == dataset.num_classes >= 10
    example = dataset[37]
    assert example["image"].shape == (32, 32, 3) and example["image"].dtype == np.uint8
    assert example["label"].dtype == np.int32 and example["label"] == 37 % dataset.num_classes
    again = ShapesDataset(split="train", image_size=32, num_images=100, seed=5)[37]
    np.testing.assert_array_equal(example["image"], again["image"])
    other_split = ShapesDataset(split="validation", image_size=32, num_images=100, seed=5)[37]
    other_seed = ShapesDataset(split="train", image_size=32, num_images=100, seed=6)[37]
    assert not np.array_equal(example["image"], other_split["image"])
    assert not np.array_equal(example["image"], other_seed["image"])
    assert ShapesDataset(image_size=45)[0]["image"].shape == (45, 45, 3)
    with pytest.raises(IndexError):
        dataset[100]
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(split="val")


def test_every_shapes_class_shows_a_visible_object_in_its_colour():
    dataset = ShapesDataset(image_size=32, seed=1)
    for label, shape_class in enumerate(SHAPE_CLASSES):
        for k in range(6):
            image = dataset[label + k * dataset.num_classes]["image"]
            mask = _foreground(image)
            assert 0.03 < mask.mean() < 0.7, (shape_class.name, mask.mean())
            if shape_class.texture == "solid":
                colour = np.median(image[mask].astype(np.float32) / 255, axis=0)
                np.testing.assert_allclose(colour, shape_class.colour, atol=0.1, err_msg=shape_class.name)


def test_shapes_look_the_same_at_every_size():
    small = ShapesDataset(image_size=32)[3]["image"].astype(np.float32)
    large = ShapesDataset(image_size=128)[3]["image"].astype(np.float32)
    downsampled = large.reshape(32, 4, 32, 4, 3).mean(axis=(1, 3))
    assert np.abs(downsampled - small).mean() < 3  # different images differ by ~30


def test_create_dataset_rejects_unknown_names():
    with pytest.raises(ValueError, match="shapes"):
        create_dataset("mnist", split="train", image_size=32)


def test_loader_batches_are_scaled_and_deterministic():
    source = ShapesDataset(num_images=200)
    loader = make_loader(source, global_batch_size=8, seed=3, shard_index=0, shard_count=1)
    batch = next(loader)
    assert loader.local_batch_size == 8
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["image"].max() - batch["image"].min() > 1.0  # the [0, 255] range was used, not clipped
    same = next(make_loader(source, global_batch_size=8, seed=3, shard_index=0, shard_count=1))
    other = next(make_loader(source, global_batch_size=8, seed=4, shard_index=0, shard_count=1))
    np.testing.assert_array_equal(batch["image"], same["image"])
    assert not np.array_equal(batch["label"], other["label"])


def test_random_flip_mirrors_about_half_of_the_images():
    source = ShapesDataset(num_images=64)
    kwargs = {"global_batch_size": 32, "seed": 0, "shard_index": 0, "shard_count": 1}
    flipped = next(make_loader(source, random_flip=True, **kwargs))["image"]
    plain = next(make_loader(source, random_flip=False, **kwargs))["image"]
    mirrored = [not np.array_equal(f, p) for f, p in zip(flipped, plain)]
    for f, p, was_mirrored in zip(flipped, plain, mirrored):
        np.testing.assert_array_equal(f, p[:, ::-1] if was_mirrored else p)
    assert 4 <= sum(mirrored) <= 28


@BOTH_WAYS
def test_epochs_repeat_with_a_new_order_and_can_stop(source_class):
    source = source_class(40)
    kwargs = {"global_batch_size": 8, "seed": 0, "shard_index": 0, "shard_count": 1}
    labels = np.array(_labels(make_loader(source, **kwargs), 10)).reshape(2, 40)
    assert sorted(labels[0]) == sorted(labels[1]) == list(range(40))
    assert labels[0].tolist() != labels[1].tolist()
    in_order = _labels(make_loader(source, shuffle=False, **kwargs), 1)
    assert in_order == [list(range(8))]
    one_epoch = make_loader(source, num_epochs=1, **kwargs)
    assert len(_labels(one_epoch, 5)) == 5
    with pytest.raises(StopIteration):
        next(one_epoch)


@BOTH_WAYS
def test_hosts_read_disjoint_equal_shards(source_class):
    source = source_class(41)
    per_host = []
    for host in range(2):
        loader = make_loader(source, global_batch_size=8, seed=7, shard_index=host, shard_count=2, num_epochs=1)
        assert loader.local_batch_size == 4
        per_host.append([label for batch in loader for label in batch["label"].tolist()])
    assert len(per_host[0]) == len(per_host[1]) == 20  # 41 // 2 records each, the odd one dropped
    assert not set(per_host[0]) & set(per_host[1])
    assert set(per_host[0]) | set(per_host[1]) <= set(range(41))
    with pytest.raises(ValueError, match="multiple of the host count 2"):
        make_loader(source, global_batch_size=9, seed=0, shard_index=0, shard_count=2)


def _restored_state_continues_with_the_same_batches(source, kwargs):
    """Reads 3 batches, saves the position, reads 3 more; a new loader restored at the position yields those 3.
    Returns (the state, the 3 batches)."""
    loader = make_loader(source, **kwargs)
    _labels(loader, 3)
    state = loader.get_state()
    expected = [next(loader) for _ in range(3)]
    loader.close()
    restored = make_loader(source, **kwargs)
    restored.set_state(state)
    for batch in expected:
        actual = next(restored)
        np.testing.assert_array_equal(actual["label"], batch["label"])
        np.testing.assert_array_equal(actual["image"], batch["image"])
    return state, expected


def test_restored_state_continues_with_the_same_batches():
    source = ShapesDataset(num_images=40)  # batches of 16 cross epoch boundaries
    kwargs = {"global_batch_size": 16, "seed": 11, "shard_index": 0, "shard_count": 1}
    state, _ = _restored_state_continues_with_the_same_batches(source, kwargs)
    with pytest.raises(ValueError, match="[Ss]ampler"):
        make_loader(source, **{**kwargs, "seed": 12}).set_state(state)


@BOTH_WAYS
def test_read_ahead_saves_the_position_of_the_batches_handed_out(source_class):
    """With batches read ahead in the background, the saved position is still right after the last batch the
    caller took, and a loader reading on demand continues from it with the same batches."""
    source = source_class(64)
    kwargs = {"global_batch_size": 4, "seed": 3, "shard_index": 0, "shard_count": 1}
    ahead = make_loader(source, **kwargs, prefetch=4)
    on_demand = make_loader(source, **kwargs, prefetch=0)
    assert _labels(ahead, 3) == _labels(on_demand, 3)
    deadline = time.monotonic() + 10
    while ahead._reader._queue.qsize() < 4 and time.monotonic() < deadline:  # the reader is 4 batches ahead
        time.sleep(0.01)
    assert ahead._reader._queue.qsize() == 4
    state = ahead.get_state()
    assert state == on_demand.get_state()
    expected = _labels(on_demand, 5)
    restored = make_loader(source, **kwargs, prefetch=0)
    restored.set_state(state)
    assert _labels(restored, 5) == expected == _labels(ahead, 5)
    ahead.set_state(state)  # stops the reader and drops what it read ahead
    assert _labels(ahead, 2) == expected[:2]
    ahead.close()


def test_worker_processes_resume_exactly_and_end_on_close():
    """With grain worker processes (the configuration that keeps up with small models on a GPU host), a restored
    position continues with the same batches, batches are plain arrays that outlive the loader, and `close` ends
    the workers."""
    source = ShapesDataset(num_images=64)
    kwargs = {"global_batch_size": 8, "seed": 5, "shard_index": 0, "shard_count": 1, "worker_count": 2}
    loader = make_loader(source, **kwargs)
    first = [next(loader) for _ in range(3)]
    state = loader.get_state()
    expected = [next(loader) for _ in range(4)]  # crosses the epoch boundary at 64 records
    assert multiprocessing.active_children()
    loader.close()
    assert not multiprocessing.active_children()
    for use_after_close in (lambda: next(loader), loader.start_prefetch, lambda: loader.set_state(state)):
        with pytest.raises(ValueError, match="loader is closed"):
            use_after_close()
    assert all(type(batch["image"]) is np.ndarray for batch in first + expected)
    restored = make_loader(source, **kwargs, prefetch=0)
    restored.set_state(state)
    for batch in expected:
        actual = next(restored)
        np.testing.assert_array_equal(actual["label"], batch["label"])
        np.testing.assert_array_equal(actual["image"], batch["image"])
    restored.close()


def test_batch_reads_read_once_per_batch_and_flip_each_record_by_its_own_coin():
    source = BatchIndexSource(64)
    kwargs = {"global_batch_size": 16, "seed": 2, "shard_index": 0, "shard_count": 1, "prefetch": 0}
    flipped = next(make_loader(source, random_flip=True, **kwargs))
    assert source.batch_reads == 1
    plain = next(make_loader(source, random_flip=False, **kwargs))
    np.testing.assert_array_equal(flipped["label"], plain["label"])  # flips do not change the order
    assert flipped["image"].dtype == np.float32 and flipped["label"].dtype == np.int32
    mirrored = flipped["image"][:, :, 0, 0] == -1.0  # the zero column moved to the left
    np.testing.assert_array_equal(flipped["image"], np.where(mirrored[:, :, None, None],
                                                             plain["image"][:, :, ::-1], plain["image"]))
    assert 2 <= mirrored[:, 0].sum() <= 14 and (mirrored[:, 0] == mirrored[:, 1]).all()
    loader = make_loader(source, random_flip=True, **kwargs)
    for _ in range(4 + 1):  # into the second epoch: a new order and new coins
        batch = next(loader)
    assert not np.array_equal(batch["label"], flipped["label"])


def test_batch_read_state_resumes_exactly_and_refuses_another_stream():
    source = BatchIndexSource(40)  # batches of 16: two per epoch, 8 records of each epoch unread
    kwargs = {"global_batch_size": 16, "seed": 11, "shard_index": 0, "shard_count": 1}
    state, expected = _restored_state_continues_with_the_same_batches(source, kwargs)
    moved = make_loader(source, **kwargs, prefetch=0)
    moved.set_state(moved.state_after(3))
    assert _labels(moved, 3) == [batch["label"].tolist() for batch in expected]
    with pytest.raises(LoaderStateError, match="seed: saved 11, now 12"):
        make_loader(source, **{**kwargs, "seed": 12}).set_state(state)
    other_source = r"source: saved 'BatchReading\(IndexSource\(40\)\)', now 'BatchReading\(IndexSource\(48"
    with pytest.raises(LoaderStateError, match=other_source):
        make_loader(BatchIndexSource(48), **kwargs).set_state(state)
    per_record = make_loader(source, batch_reads=False, **kwargs)
    assert make_loader(source, **kwargs).reading == "a batch at a time"
    assert per_record.reading == "record by record (in this process, 16 read threads)"
    with pytest.raises(LoaderStateError, match="config.data.batch_reads = False"):
        make_loader(source, **kwargs).set_state(per_record.get_state())
    with pytest.raises(ValueError, match="hold no full batch of 16"):
        make_loader(BatchIndexSource(20), global_batch_size=32, seed=0, shard_index=0, shard_count=2)


def test_sources_need_a_stable_repr():
    class AnonymousSource(IndexSource):
        __repr__ = object.__repr__

    with pytest.raises(ValueError, match="stable __repr__"):
        make_loader(AnonymousSource(8), global_batch_size=4, seed=0)


def test_to_global_batch_shards_the_batch_over_all_devices():
    devices = jax.devices()
    assert len(devices) == 8  # tests/conftest.py forces 8 host devices
    sharding = NamedSharding(Mesh(np.array(devices), ("data",)), PartitionSpec("data"))
    loader = make_loader(ShapesDataset(num_images=64), global_batch_size=16, seed=0)
    local = next(loader)
    global_batch = to_global_batch(local, sharding)
    assert global_batch["image"].shape == (16, 32, 32, 3) and global_batch["label"].shape == (16,)
    assert global_batch["image"].sharding == sharding
    assert {shard.data.shape for shard in global_batch["image"].addressable_shards} == {(2, 32, 32, 3)}
    np.testing.assert_array_equal(np.asarray(global_batch["image"]), local["image"])
    np.testing.assert_array_equal(np.asarray(global_batch["label"]), local["label"])
