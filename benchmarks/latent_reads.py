"""How fast the 'latents' dataset reads, by the ArrayRecord options its shards were written with: one record in random
order (`LatentDataset[i]`: read and parse) and the loader alone (batches of 32, in this process, no read-ahead), a
batch at a time (`read_batch`, the default) and record by record through grain with 0 and 16 read threads.

    python benchmarks/latent_reads.py --records 4096 --out latent_reads.jsonl

The records are random float16 moments of DiG's 256 px latents (32x32x4, with flipped views: 32 KiB each), written
by train_loop.write_random_latents with each of --options. Any machine; prints a table last.
"""

import argparse
import tempfile
import time

import numpy as np
from results import report
from train_loop import write_random_latents

from dig_jax.data import make_loader
from dig_jax.data.latents import SHARD_WRITER_OPTIONS, LatentDataset


def record_us(dataset, count: int) -> float:
    """Microseconds per `dataset[i]` over `count` distinct indices in random order."""
    indices = np.random.default_rng(0).permutation(len(dataset))[:count]
    started = time.perf_counter()
    for index in indices:
        dataset[int(index)]
    return 1e6 * (time.perf_counter() - started) / count


def loader_images_per_s(dataset, batches: int, batch_reads: bool, read_threads: int = 0) -> float:
    loader = make_loader(dataset, global_batch_size=32, seed=0, batch_reads=batch_reads, read_threads=read_threads,
                         prefetch=0)
    try:
        next(loader)  # starts the reading threads
        started = time.perf_counter()
        for _ in range(batches):
            next(loader)
        return batches * 32 / (time.perf_counter() - started)
    finally:
        loader.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--options", default=f"{SHARD_WRITER_OPTIONS};group_size:1",
                        help="';'-separated ArrayRecord writer options ('group_size:1' alone: ArrayRecord's zstd)")
    parser.add_argument("--records", type=int, default=4096)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for options in args.options.split(";"):
        with tempfile.TemporaryDirectory() as directory:
            write_random_latents(directory, args.records, writer_options=options)
            dataset = LatentDataset(data_dir=directory)
            row = {"options": options, "record_us": record_us(dataset, min(args.records, 2000)),
                   "loader_batch_reads_img_s": loader_images_per_s(dataset, args.batches, batch_reads=True),
                   **{f"loader_threads_{n}_img_s": loader_images_per_s(dataset, args.batches, False, n)
                      for n in (0, 16)}}
        rows.append(row)
        report(row, args.out)
    print(f"\n{'writer options':28} {'us per record':>13} {'loader img/s: batch reads':>26} "
          f"{'per record, 0 threads':>21} {'16 threads':>11}")
    for r in rows:
        print(f"{r['options']:28} {r['record_us']:13.1f} {r['loader_batch_reads_img_s']:26.0f} "
              f"{r['loader_threads_0_img_s']:21.0f} {r['loader_threads_16_img_s']:11.0f}")


if __name__ == "__main__":
    main()
