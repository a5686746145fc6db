"""Per-host input pipeline (grain) and the helper that assembles per-host batches into global jax.Arrays.

Each JAX process reads its own disjoint shard of the source, shuffles it, repeats it, flips and scales each image,
and batches to the per-host batch (global batch / process count). `to_global_batch` then stitches the per-host
batches into arrays sharded over the mesh.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import grain
import jax
import numpy as np
from absl import flags

from dig_jax.data.transforms import FlipAndScale


class RandomAccessSource(Protocol):
    """What the loader reads: `len(source)`, `source[i]` -> {"image": uint8 [H, W, 3], "label": int}.

    `repr(source)` must be the same in every process and run (no memory addresses): grain stores it in the
    iterator state and refuses to restore a state into a loader over a different source. With worker_count > 0
    the source is pickled into the worker processes.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


class Loader(Iterator[dict[str, np.ndarray]]):
    """Endless (or `num_epochs`-long) iterator of per-host batches with a restorable position.

    `next(loader)` -> {"image": float32 [local_batch_size, H, W, 3] in [-1, 1], "label": int32 [local_batch_size]}.

    With prefetch > 0 a background thread reads up to that many batches ahead, so that reading overlaps the
    training loop's own host work (dispatching the step, logging) instead of adding to it. The position saved
    and restored (`get_state`) is always that of the batches handed out, not of those read ahead.
    """

    def __init__(self, data_loader: grain.DataLoader, local_batch_size: int, prefetch: int = 2):
        self.local_batch_size = local_batch_size
        self._iterator = iter(data_loader)
        self._state = self._iterator.get_state()  # after the batches handed out so far
        self._prefetch = prefetch
        self._reader = None

    def __next__(self) -> dict[str, np.ndarray]:
        if not self._prefetch:
            iterator = self._open_iterator()
            batch = _own_memory(next(iterator))
            self._state = iterator.get_state()
            return batch
        self.start_prefetch()
        batch, self._state = self._reader.next()
        return batch

    def start_prefetch(self) -> None:
        """Starts reading ahead now rather than at the first `next` (grain's checkpoint handler calls it after
        restoring a position)."""
        self._open_iterator().start_prefetch()
        if self._prefetch and self._reader is None:
            self._reader = _ReadAhead(self._iterator, self._prefetch)

    def get_state(self) -> bytes:
        """This host's position in the stream (grain's JSON state). Every host has its own: save one per process."""
        return self._state

    def set_state(self, state: bytes) -> None:
        """Continues from a state returned by `get_state` of a loader built with the same arguments."""
        iterator = self._open_iterator()
        self._stop_reading_ahead()
        iterator.set_state(state)
        self._state = iterator.get_state()

    def close(self) -> None:
        """Stops reading and ends the worker processes; `get_state` still gives the position of the batches handed
        out. Without it, grain's workers and their shared memory are only released when the interpreter exits,
        which then warns of leaked shared-memory segments."""
        self._stop_reading_ahead()
        self._iterator = None  # grain closes its pipeline, workers included, when its iterator is collected

    def _open_iterator(self):
        if self._iterator is None:
            raise ValueError("the loader is closed: build a new one with make_loader to read again")
        return self._iterator

    def _stop_reading_ahead(self) -> None:
        # What was read ahead is dropped; the position stays that of the batches handed out.
        if self._reader is not None:
            self._reader.stop()
            self._reader = None


def _own_memory(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch in plain numpy arrays: with worker processes grain hands out views of shared-memory segments,
    which would stay mapped (and be reported as leaked at exit) for as long as anything references the batch."""
    return {key: np.array(value) if type(value) is not np.ndarray else value for key, value in batch.items()}


class _ReadAhead:
    """A daemon thread that pulls (batch, iterator state after it) pairs into a bounded queue."""

    _END = object()

    def __init__(self, iterator, depth: int):
        self._iterator = iterator
        self._queue = queue.Queue(maxsize=depth)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="data-read-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                item = (_own_memory(next(self._iterator)), self._iterator.get_state())
            except StopIteration:
                item = self._END
            except Exception as error:  # handed to the consumer, which raises it in the training loop
                item = error
            while not self._stopped.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if not isinstance(item, tuple):
                return

    def next(self):
        item = self._queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, Exception):
            raise item
        return item

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()


def make_loader(
    source: RandomAccessSource,
    *,
    global_batch_size: int,
    seed: int,
    random_flip: bool = True,
    shuffle: bool = True,
    num_epochs: int | None = None,
    worker_count: int = 0,
    read_threads: int = 16,
    shard_index: int | None = None,
    shard_count: int | None = None,
    prefetch: int = 2,
) -> Loader:
    """Builds this host's loader over `source`.

    Args:
      source: random-access images, see `RandomAccessSource`.
      global_batch_size: batch size summed over all hosts; must be divisible by `shard_count`.
      seed: shuffling and flipping seed (0 <= seed < 2**32); the same seed gives the same batches.
      random_flip: flip each image horizontally with probability 1/2.
      shuffle: shuffle the records (a new order every epoch).
      num_epochs: stop after this many passes over the host's shard; None repeats forever.
      worker_count: grain worker processes (0 = load in this process, with reading threads). The batches depend
        on it (grain splits the record stream between workers), so keep it fixed when restoring a state.
      read_threads: threads reading records in each process (grain's default 16; the batches do not depend on
        it). 0 reads in the calling thread: best for sources computed in memory, which gain nothing from threads
        but contention for the GIL and the cores.
      shard_index: this host's shard; defaults to `jax.process_index()`.
      shard_count: number of shards; defaults to `jax.process_count()`.
      prefetch: batches read ahead by a background thread (0: read in the calling thread, on demand).

    Each host gets an equal, disjoint slice of the records (the remainder is dropped) and yields only full
    batches of `global_batch_size // shard_count` examples.
    """
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if global_batch_size < 1 or global_batch_size % shard_count:
        raise ValueError(
            f"global_batch_size must be a positive multiple of the host count {shard_count}, got {global_batch_size}"
        )
    if " at 0x" in repr(source):
        raise ValueError(f"source needs a stable __repr__ (grain checks it when restoring state), got {source!r}")
    if worker_count > 0 and not flags.FLAGS.is_parsed():
        # grain 0.2.18 reads one of its absl flags when it starts workers, which fails unless absl parsed the
        # command line (scripts not run by absl.app); the defaults are what such scripts want (grain issue #1355).
        flags.FLAGS.mark_as_parsed()
    local_batch_size = global_batch_size // shard_count
    shard_options = grain.sharding.ShardOptions(shard_index=shard_index, shard_count=shard_count, drop_remainder=True)
    sampler = grain.samplers.IndexSampler(
        num_records=len(source),
        shard_options=shard_options,
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=seed,
    )
    operations: Sequence[grain.transforms.Transformation] = (
        FlipAndScale(random_flip),
        grain.transforms.Batch(batch_size=local_batch_size, drop_remainder=True),
    )
    data_loader = grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=operations,
        worker_count=worker_count,
        shard_options=shard_options,
        read_options=grain.ReadOptions(num_threads=read_threads),
    )
    return Loader(data_loader, local_batch_size, prefetch)


def to_global_batch(local_batch: Any, sharding: jax.sharding.Sharding) -> Any:
    """Turns each host's batch (a pytree of numpy arrays, batch-major) into global jax.Arrays.

    With `sharding` = NamedSharding(mesh, P("data")) (the spec names the leading axis only, so it fits every
    leaf), leaves [b, ...] on each host become arrays [b * process_count, ...] whose rows on this host's devices
    are this host's rows; with P(None, "data"), stacked leaves [steps, b, ...] become [steps, b * process_count, ...].
    """
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
