"""The "shapes" dataset: procedurally generated, class-conditional RGB images that ship with the code.

Each class is one (shape, texture, colour) combination -- "red filled circle", "blue square outline", ... -- drawn
at a random position, scale and small rotation, with a little colour jitter, on a plain, random, darkish
background. Classes differ in shape, colour and texture at once, so a sample's class is recognisable by eye even at
32x32, which makes the dataset a quick end-to-end check of class-conditional generation.

Images are computed on demand from (seed, split, index): `ds[i]` is deterministic, needs no pre-generation and is
cheap (pure numpy, about a thousand 32x32 images per second per core or better). Shapes are rendered analytically
with anti-aliased edges in coordinates relative to the image, so every `image_size` shows the same picture.
"""

from __future__ import annotations

import dataclasses

import numpy as np

_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}

# Texture period in shape-local units (a shape spans [-1, 1]): about four stripes/checks across a shape.
_TEXTURE_PERIOD = 0.5
# Softness of texture edges, as a fraction of the period: soft enough not to alias at 32x32.
_TEXTURE_SOFTNESS = 0.12


@dataclasses.dataclass(frozen=True)
class ShapeClass:
    """One class: `shape` outline, `texture` fill pattern, and the two texture colours (RGB in [0, 1])."""

    name: str
    shape: str
    texture: str
    colour: tuple[float, float, float]
    second_colour: tuple[float, float, float] = (0.0, 0.0, 0.0)


SHAPE_CLASSES: tuple[ShapeClass, ...] = (
    ShapeClass("red filled circle", "circle", "solid", (0.92, 0.12, 0.10)),
    ShapeClass("blue square outline", "square_outline", "solid", (0.15, 0.35, 1.00)),
    ShapeClass("green striped triangle", "triangle", "stripes", (0.10, 0.85, 0.20), (0.95, 0.95, 0.95)),
    ShapeClass("yellow checkered diamond", "diamond", "checker", (1.00, 0.90, 0.10), (0.05, 0.05, 0.05)),
    ShapeClass("magenta filled star", "star", "solid", (0.95, 0.15, 0.85)),
    ShapeClass("cyan ring", "ring", "solid", (0.10, 0.90, 0.95)),
    ShapeClass("orange filled square", "square", "solid", (1.00, 0.55, 0.05)),
    ShapeClass("white plus sign", "plus", "solid", (0.97, 0.97, 0.97)),
    ShapeClass("purple dotted circle", "circle", "dots", (0.60, 0.20, 0.90), (0.97, 0.97, 0.97)),
    ShapeClass("teal crescent", "crescent", "solid", (0.05, 0.65, 0.55)),
    ShapeClass("pink striped square", "square", "stripes", (1.00, 0.55, 0.70), (0.30, 0.05, 0.15)),
    ShapeClass("lime x cross", "x_cross", "solid", (0.65, 1.00, 0.10)),
)


def _box(x: np.ndarray, y: np.ndarray, half_width: float, half_height: float) -> np.ndarray:
    """Signed distance (approximate outside the corners) to an axis-aligned box centred at the origin."""
    return np.maximum(np.abs(x) - half_width, np.abs(y) - half_height)


def _circle(x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    return np.sqrt(x * x + y * y) - radius


def _triangle(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Equilateral triangle pointing up (image y grows downwards), inscribed in the unit circle."""
    edge_normals = ((0.0, 1.0), (np.sqrt(3) / 2, -0.5), (-np.sqrt(3) / 2, -0.5))
    return np.max([nx * x + ny * y for nx, ny in edge_normals], axis=0) - 0.5


def _star(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Five-pointed star: a circle whose radius is modulated with the angle (not an exact distance)."""
    angle = np.arctan2(x, -y)
    radius = 0.62 + 0.36 * np.cos(5 * angle)
    return (np.sqrt(x * x + y * y) - radius) * 0.6


def _shape_distance(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) of `shape` at shape-local coordinates x, y; the shape fills ~[-1, 1]^2."""
    if shape == "circle":
        return _circle(x, y, 0.95)
    if shape == "square":
        return _box(x, y, 0.8, 0.8)
    if shape == "square_outline":
        return np.abs(_box(x, y, 0.72, 0.72)) - 0.16
    if shape == "triangle":
        return _triangle(x, y * 1.05 - 0.2)
    if shape == "diamond":
        return (np.abs(x) + np.abs(y) - 1.0) / np.sqrt(2)
    if shape == "star":
        return _star(x, y)
    if shape == "ring":
        return np.abs(_circle(x, y, 0.72)) - 0.2
    if shape == "plus":
        return np.minimum(_box(x, y, 0.28, 0.95), _box(x, y, 0.95, 0.28))
    if shape == "x_cross":
        u, v = (x + y) / np.sqrt(2), (x - y) / np.sqrt(2)
        return np.minimum(_box(u, v, 0.26, 1.0), _box(u, v, 1.0, 0.26))
    if shape == "crescent":
        return np.maximum(_circle(x, y, 0.95), -_circle(x - 0.5, y - 0.25, 0.75))
    raise ValueError(f"unknown shape {shape!r}")


def _texture_mix(texture: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Weight in [0, 1] of the second colour at each pixel: 0 everywhere for "solid"."""
    phase = 2 * np.pi / _TEXTURE_PERIOD
    gain = 1 / (2 * np.pi * _TEXTURE_SOFTNESS)
    if texture == "solid":
        return np.zeros_like(x)
    if texture == "stripes":
        wave = np.sin(phase * (x + y) / np.sqrt(2))
    elif texture == "checker":
        wave = np.sin(phase * x / 2) * np.sin(phase * y / 2) * 2
    elif texture == "dots":
        cell_x = np.mod(x, _TEXTURE_PERIOD) - _TEXTURE_PERIOD / 2
        cell_y = np.mod(y, _TEXTURE_PERIOD) - _TEXTURE_PERIOD / 2
        dot_radius = 0.3 * _TEXTURE_PERIOD
        return np.clip(
            (dot_radius - np.sqrt(cell_x**2 + cell_y**2)) / (_TEXTURE_SOFTNESS * _TEXTURE_PERIOD) + 0.5, 0, 1
        )
    else:
        raise ValueError(f"unknown texture {texture!r}")
    return np.clip(wave * gain + 0.5, 0, 1)


def render_shape(
    shape_class: ShapeClass,
    image_size: int,
    *,
    centre: tuple[float, float],
    scale: float,
    rotation: float,
    colour_shift: np.ndarray,
    background: np.ndarray,
) -> np.ndarray:
    """Draws one shape on a plain background.

    Args:
      shape_class: what to draw.
      image_size: output height and width in pixels.
      centre: (x, y) shape centre in image coordinates, the image spanning [-1, 1] on both axes.
      scale: shape half-size in the same coordinates.
      rotation: radians, counter-clockwise.
      colour_shift: [3] added to both shape colours (jitter).
      background: [3] RGB in [0, 1].

    Returns:
      uint8 [image_size, image_size, 3].
    """
    pixel_centres = (np.arange(image_size, dtype=np.float32) + 0.5) * (2 / image_size) - 1
    dx = pixel_centres[None, :] - centre[0]
    dy = pixel_centres[:, None] - centre[1]
    cos, sin = np.float32(np.cos(rotation)), np.float32(np.sin(rotation))
    scale = np.float32(scale)
    x = (cos * dx + sin * dy) / scale
    y = (-sin * dx + cos * dy) / scale
    # Anti-aliasing: coverage ramps from 0 to 1 over one pixel across the edge.
    pixel_in_shape_units = (2 / image_size) / scale
    coverage = np.clip(0.5 - _shape_distance(shape_class.shape, x, y) / pixel_in_shape_units, 0, 1)[..., None]
    mix = _texture_mix(shape_class.texture, x, y)[..., None]
    # float32 throughout: half the memory traffic of float64 on large images.
    first = np.clip(np.asarray(shape_class.colour) + colour_shift, 0, 1).astype(np.float32)
    second = np.clip(np.asarray(shape_class.second_colour) + colour_shift, 0, 1).astype(np.float32)
    background = np.asarray(background, np.float32)
    fill = first * (1 - mix) + second * mix
    image = background * (1 - coverage) + fill * coverage
    return np.round(image * 255).astype(np.uint8)


class ShapesDataset:
    """Random-access source of "shapes" images: `ds[i]` -> {"image": uint8 [H, W, 3], "label": int32 []}.

    Labels cycle through the classes (index % num_classes), so every class is equally frequent. The split name
    selects an independent random stream: "train", "validation" and "test" never show the same image.
    """

    def __init__(self, *, split: str = "train", image_size: int = 32, num_images: int = 50_000, seed: int = 0):
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)}, got {split!r}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        self.split = split
        self.image_size = image_size
        self.num_images = num_images
        self.seed = seed
        self.class_names = [c.name for c in SHAPE_CLASSES]
        self.num_classes = len(SHAPE_CLASSES)

    def __len__(self) -> int:
        return self.num_images

    def __repr__(self) -> str:
        # Stable across processes: the loader compares it when restoring an iterator state.
        return (
            f"ShapesDataset(split={self.split!r}, image_size={self.image_size}, "
            f"num_images={self.num_images}, seed={self.seed})"
        )

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], index])
        label = index % self.num_classes
        scale = rng.uniform(0.4, 0.7)
        # Keep at least most of the shape inside the frame.
        max_offset = 1.0 - scale * 0.9
        background_level = rng.uniform(0.12, 0.4)
        image = render_shape(
            SHAPE_CLASSES[label],
            self.image_size,
            centre=tuple(rng.uniform(-max_offset, max_offset, size=2)),
            scale=scale,
            rotation=rng.uniform(-0.3, 0.3),
            colour_shift=rng.uniform(-0.07, 0.07, size=3),
            background=np.clip(background_level + rng.uniform(-0.06, 0.06, size=3), 0, 1),
        )
        return {"image": image, "label": np.int32(label)}
