"""Per-image transforms: the ADM center crop (ImageNet preprocessing) and the loader's flip + [-1, 1] scaling (of one
record or a batch)."""

from __future__ import annotations

import grain
import numpy as np
from PIL import Image


def adm_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """ADM / DiT center crop: uint8 [size, size, 3] from a PIL image of any size.

    Halves the image with a BOX filter while its short side is at least 2 * size (cheap, alias-free
    downscaling), resizes with BICUBIC so that the short side equals `size`, then crops the center.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    pixels = np.asarray(image)
    top = (pixels.shape[0] - size) // 2
    left = (pixels.shape[1] - size) // 2
    return pixels[top : top + size, left : left + size]


def to_signed_unit(image: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, C] in [0, 255] -> float32 in [-1, 1]."""
    return image.astype(np.float32) / 127.5 - 1.0


def flip_and_scale(element: dict, flip) -> dict[str, np.ndarray]:
    """The loader's output for one record (`flip` a bool) or a batch of them (leaves [b, ...], `flip` bool [b]).

    Images (uint8 [..., H, W, 3]) are mirrored where `flip`, then scaled to float32 in [-1, 1]. Latent records
    ({"moments", "flipped_moments"?, "label"}, see dig_jax.data.latents) are not mirrored: a flip picks the moments
    the encoder stored for the mirrored image (mirroring a latent is not encoding a mirrored image), records without
    them always give "moments", and moments keep their storage dtype (the train step casts them). Labels -> int32.
    """
    where = np.reshape(flip, np.shape(flip) + (1, 1, 1))  # broadcasts over each record's [H, W, C]
    label = np.asarray(element["label"], np.int32)
    if "moments" in element:
        if "flipped_moments" not in element:
            return {"moments": np.ascontiguousarray(element["moments"]), "label": label}
        return {"moments": np.where(where, element["flipped_moments"], element["moments"]), "label": label}
    image = element["image"]
    return {"image": to_signed_unit(np.where(where, image[..., ::-1, :], image)), "label": label}


class FlipAndScale(grain.transforms.RandomMap):
    """Per-record loader transform: `flip_and_scale` with a random flip (probability 1/2) when `random_flip`.

    The random generator comes from the loader and is seeded per record (from the loader seed and the record's
    position in the stream), so a given stream position is always flipped the same way.
    """

    def __init__(self, random_flip: bool):
        self.random_flip = random_flip

    def random_map(self, element: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return flip_and_scale(element, self.random_flip and rng.random() < 0.5)
