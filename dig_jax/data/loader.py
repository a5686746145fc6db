"""Per-host input pipeline and the helper that assembles per-host batches into global jax.Arrays.

Each JAX process reads its own disjoint shard of the source, shuffles it, repeats it, flips and scales each image,
and batches to the per-host batch (global batch / process count). Two ways to read, one `Loader` interface:
- a batch at a time, for sources with `read_batch` (the "latents" dataset): one read per batch, a few numpy calls,
  no per-record Python; fast enough in the trainer's process that it needs neither workers nor threads;
- record by record through grain (images: decoding is per record), in worker processes and reading threads.
`to_global_batch` then stitches the per-host batches into arrays sharded over the mesh.
"""

from __future__ import annotations

import functools
import json
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import grain
import jax
import numpy as np
from absl import flags

from dig_jax.data.transforms import FlipAndScale, flip_and_scale


class RandomAccessSource(Protocol):
    """What the loader reads: `len(source)`, `source[i]` -> {"image": uint8 [H, W, 3], "label": int}.

    `repr(source)` must be the same in every process and run (no memory addresses): the loader's state records it,
    and a state is refused by a loader over a different source. With worker_count > 0 the source is pickled into
    the worker processes.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


class BatchSource(RandomAccessSource, Protocol):
    """A source the loader can read a batch at a time: `source.read_batch(indices)` (int [b]) -> the records'
    `source[i]` dicts stacked along a leading [b] axis."""

    def read_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]: ...


class Loader(Iterator[dict[str, np.ndarray]]):
    """Endless (or `num_epochs`-long) iterator of per-host batches with a restorable position.

    `next(loader)` -> {"image": float32 [local_batch_size, H, W, 3] in [-1, 1], "label": int32 [local_batch_size]}
    (latents: {"moments": [local_batch_size, h, w, 2C] in their storage dtype, "label"}).

    With prefetch > 0 a background thread reads up to that many batches ahead, so that reading overlaps the
    training loop's own host work (dispatching the step, logging) instead of adding to it. The position saved
    and restored (`get_state`) is always that of the batches handed out, not of those read ahead.
    """

    def __init__(self, iterator, local_batch_size: int, state_after: Callable[[bytes, int], bytes],
                 prefetch: int, reading: str):
        # iterator: batches, with get_state() -> bytes, set_state(bytes) and start_prefetch() (grain's, or
        # _BatchReads). state_after(state, batches): the state after `batches` batches, kept from `state` what
        # identifies the stream. reading: how the batches are read, for the log.
        self.local_batch_size = local_batch_size
        self.reading = reading
        self._iterator = iterator
        self._state_after = state_after
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

    def state_after(self, batches: int) -> bytes:
        """The state of this loader after it handed out `batches` batches, without reading them (e.g. to continue a
        run at its step on another number of hosts, see dig_jax.distributed.restore_checkpoint)."""
        return self._state_after(self._state, batches)

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


class LoaderStateError(ValueError):
    """A saved loader position does not belong to this loader; the message says which setting differs."""


class _BatchReads:
    """This host's batches of a `BatchSource`, one `read_batch` each, with a position that is one number.

    Host `shard_index` of `shard_count` reads records [shard_index * n, (shard_index + 1) * n), n = len(source) //
    shard_count. Epoch e reads them in a permutation drawn from (seed, shard_index, e), each record flipped by a
    coin drawn with it; an epoch ends after its last full batch (up to batch_size - 1 records of it go unread). The
    state is the number of batches read and the settings that define the stream, checked on restore.
    """

    FORMAT = "dig_jax.batch_reads/1"

    def __init__(self, source: BatchSource, *, batch_size: int, seed: int, random_flip: bool, shuffle: bool,
                 num_epochs: int | None, shard_index: int, shard_count: int):
        self._source = source
        self._records_per_host = len(source) // shard_count
        self._batches_per_epoch = self._records_per_host // batch_size
        if not self._batches_per_epoch:
            raise ValueError(f"the host's {self._records_per_host} of {len(source)} records ({shard_count} hosts) "
                             f"hold no full batch of {batch_size}: use a smaller global_batch_size or more data")
        self._settings = {"format": self.FORMAT, "source": repr(source), "seed": seed, "shuffle": shuffle,
                          "random_flip": random_flip, "num_epochs": num_epochs, "batch_size": batch_size,
                          "shard_index": shard_index, "shard_count": shard_count}
        self._batches_read = 0
        self._epoch = (None, None, None)  # (epoch, record order, flips) of the epoch read last

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        epoch, batch = divmod(self._batches_read, self._batches_per_epoch)
        if self._settings["num_epochs"] is not None and epoch >= self._settings["num_epochs"]:
            raise StopIteration
        order, flips = self._epoch_draws(epoch)
        rows = slice(batch * self._settings["batch_size"], (batch + 1) * self._settings["batch_size"])
        element = flip_and_scale(self._source.read_batch(order[rows]), flips[rows])
        self._batches_read += 1
        return element

    def _epoch_draws(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch[0] != epoch:
            settings, count = self._settings, self._records_per_host
            rng = np.random.default_rng([settings["seed"], settings["shard_index"], epoch])
            order = rng.permutation(count) if settings["shuffle"] else np.arange(count)
            flips = rng.random(count) < 0.5 if settings["random_flip"] else np.zeros(count, bool)
            self._epoch = (epoch, settings["shard_index"] * count + order, flips)
        return self._epoch[1:]

    def start_prefetch(self) -> None:
        """Nothing runs ahead inside the stream (Loader's read-ahead thread does): reads happen in `next`."""

    def get_state(self) -> bytes:
        return json.dumps({**self._settings, "batches_read": self._batches_read}).encode()

    def set_state(self, state: bytes) -> None:
        saved = json.loads(state)
        if saved.get("format") != self.FORMAT:
            raise LoaderStateError(
                "the saved data position was written by the record-by-record (grain) loader, this loader reads "
                "a batch at a time: resume that run with config.data.batch_reads = False (make_loader(..., "
                "batch_reads=False))")
        differences = [f"{key}: saved {saved.get(key)!r}, now {value!r}" for key, value in self._settings.items()
                       if saved.get(key) != value]
        if differences:
            raise LoaderStateError("the saved data position belongs to another stream (" + "; ".join(differences) +
                                   "): restore it into a loader built with the saved settings")
        self._batches_read = int(saved["batches_read"])

    def state_after(self, state: bytes, batches: int) -> bytes:
        return json.dumps({**json.loads(state), "batches_read": batches}).encode()


def _grain_state_after(state: bytes, batches: int, *, shard_index: int, shard_count: int, batch_size: int) -> bytes:
    """grain's state after `batches` batches of a host's stream. grain numbers a shard's records i = 0, 1, ... as
    sampler positions i * shard_count + shard_index and, with W worker processes, makes batch k in worker k % W
    (the workers read disjoint interleaved positions). A state records each worker's last position and the
    worker of the last batch; the sampler and source descriptions are kept from `state`, so grain still checks
    them in `set_state`."""
    state = json.loads(state)
    workers = state["worker_count"]
    if workers == 0:
        state["last_seen_indices"] = {"0": (batches * batch_size - 1) * shard_count + shard_index}
        state["last_worker_index"] = -1
    else:
        stride = workers * shard_count
        state["last_seen_indices"] = {
            str(w): shard_index - stride + w * shard_count + len(range(w, batches, workers)) * batch_size * stride
            for w in range(workers)}
        state["last_worker_index"] = batches % workers - 1
    return json.dumps(state, indent=4).encode()


def make_loader(
    source: RandomAccessSource,
    *,
    global_batch_size: int,
    seed: int,
    random_flip: bool = True,
    shuffle: bool = True,
    num_epochs: int | None = None,
    batch_reads: bool = True,
    worker_count: int = 0,
    read_threads: int = 16,
    shard_index: int | None = None,
    shard_count: int | None = None,
    prefetch: int = 2,
) -> Loader:
    """Builds this host's loader over `source`.

    Args:
      source: random-access images, see `RandomAccessSource` (and `BatchSource`).
      global_batch_size: batch size summed over all hosts; must be divisible by `shard_count`.
      seed: shuffling and flipping seed (0 <= seed < 2**32); the same seed gives the same batches.
      random_flip: flip each image horizontally with probability 1/2.
      shuffle: shuffle the records (a new order every epoch).
      num_epochs: stop after this many passes over the host's shard; None repeats forever.
      batch_reads: read a `BatchSource` (a source with `read_batch`) a batch at a time; False, and sources without
        `read_batch`, read record by record through grain, with the two options below. The two ways give
        different batches (each draws its own order), so keep this fixed when restoring a state.
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
        raise ValueError(f"source needs a stable __repr__ (the loader state records it), got {source!r}")
    local_batch_size = global_batch_size // shard_count
    if batch_reads and hasattr(source, "read_batch"):
        stream = _BatchReads(source, batch_size=local_batch_size, seed=seed, random_flip=random_flip,
                             shuffle=shuffle, num_epochs=num_epochs, shard_index=shard_index, shard_count=shard_count)
        return Loader(stream, local_batch_size, stream.state_after, prefetch, reading="a batch at a time")
    if worker_count > 0 and not flags.FLAGS.is_parsed():
        # grain 0.2.18 reads one of its absl flags when it starts workers, which fails unless absl parsed the
        # command line (scripts not run by absl.app); the defaults are what such scripts want (grain issue #1355).
        flags.FLAGS.mark_as_parsed()
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
    state_after = functools.partial(_grain_state_after, shard_index=shard_index, shard_count=shard_count,
                                    batch_size=local_batch_size)
    threads = f"{read_threads} read threads" if read_threads else "no read threads"
    reading = (f"record by record ({worker_count} worker processes, {threads} each)" if worker_count
               else f"record by record (in this process, {threads})")
    return Loader(iter(data_loader), local_batch_size, state_after, prefetch, reading)


def to_global_batch(local_batch: Any, sharding: jax.sharding.Sharding) -> Any:
    """Turns each host's batch (a pytree of numpy arrays, batch-major) into global jax.Arrays.

    With `sharding` = NamedSharding(mesh, P("data")) (the spec names the leading axis only, so it fits every
    leaf), leaves [b, ...] on each host become arrays [b * process_count, ...] whose rows on this host's devices
    are this host's rows; with P(None, "data"), stacked leaves [steps, b, ...] become [steps, b * process_count, ...].
    """
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
