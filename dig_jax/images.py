"""Image output: [-1, 1] floats to uint8, grids, PNG and ADM-style .npz (also from chunks), all written atomically."""

import contextlib
import io
import math
import os
import tempfile
import zipfile
from collections.abc import Iterable

import numpy as np
from PIL import Image


def to_uint8(images) -> np.ndarray:
    """[N, H, W, C] floats in [-1, 1] -> uint8, as ADM/DiT: clamp(127.5 x + 128)."""
    return np.clip(127.5 * np.asarray(images, np.float32) + 128.0, 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, columns: int | None = None, padding: int = 2) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 [rows*(H+pad)+pad, cols*(W+pad)+pad, C] image, row-major."""
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, c), 255, np.uint8)
    for i, image in enumerate(images):
        top, left = padding + (i // columns) * (h + padding), padding + (i % columns) * (w + padding)
        grid[top:top + h, left:left + w] = image
    return grid


@contextlib.contextmanager
def atomic_output(path: str):
    """Yields a binary file that becomes `path` only once the block completes: it is written under a temporary name
    in the same folder and renamed, so a crash never leaves a half-written file (nor replaces a good one)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; outputs should be readable like any other file
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to `path` atomically (see `atomic_output`)."""
    with atomic_output(path) as f:
        f.write(data)


def save_png(path: str, image: np.ndarray) -> None:
    """uint8 [H, W, 3] (or [H, W, 1]) -> PNG file."""
    buffer = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def save_npz(path: str, images: np.ndarray, labels: np.ndarray | None = None) -> None:
    """ADM's sample layout: key `arr_0` holds uint8 [N, H, W, 3]; `arr_1` the class labels when given."""
    buffer = io.BytesIO()
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": np.asarray(labels)}
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def save_npz_chunks(path: str, chunks: Iterable[np.ndarray], shape: tuple, labels: np.ndarray) -> None:
    """`save_npz` for images too large for memory: arr_0 of `shape` [N, H, W, 3] is written from uint8 `chunks`
    [n_i, H, W, 3] (in order, their n_i summing to N) one at a time, arr_1 = `labels` [N]. Atomic like save_npz;
    the file is what np.savez writes (stored zip64 members), so np.load reads it as any other npz."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": tuple(shape)}
    with atomic_output(path) as f, zipfile.ZipFile(f, "w", allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_2_0(member, header)
            written = 0
            for chunk in chunks:
                if chunk.dtype != np.uint8 or chunk.shape[1:] != tuple(shape[1:]):
                    raise ValueError(f"image chunks must be uint8 [n, {', '.join(map(str, shape[1:]))}], got "
                                     f"{chunk.dtype} {chunk.shape}")
                member.write(np.ascontiguousarray(chunk).tobytes())
                written += chunk.shape[0]
            if written != shape[0]:
                raise ValueError(f"image chunks hold {written} images, expected {shape[0]}")
        with archive.open("arr_1.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array(member, np.asarray(labels))
