"""Image output: [-1, 1] floats to uint8, grids, PNG and ADM-style .npz, all written atomically."""

import io
import math
import os
import tempfile

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


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes to a temporary file in the same folder, then renames: a crash never leaves a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; outputs should be readable like any other file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


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
