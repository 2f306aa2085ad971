"""The generic corpus the embedded codec learns from: procedural colour fields, gradients, shapes, textures and
noise, plus random crops of the two natural photos scikit-learn bundles. Never a task's dataset."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from sklearn.datasets import load_sample_images

KINDS = ("field", "gradient", "shapes", "texture", "photo")


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    if rng.random() < 0.3:  # greys are common in real data (and in Square backgrounds)
        v = int(rng.integers(0, 256))
        return v, v, v
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _gradient(rng, size: int) -> np.ndarray:
    a, b = np.array(_colour(rng), float), np.array(_colour(rng), float)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = np.cos(angle) * xx + np.sin(angle) * yy
    t = (t - t.min()) / max(np.ptp(t), 1e-6)
    return a + (b - a) * t[..., None]


def _background(rng, size: int) -> Image.Image:
    array = np.full((size, size, 3), _colour(rng), float) if rng.random() < 0.6 else _gradient(rng, size)
    return Image.fromarray(array.clip(0, 255).astype(np.uint8))


def _shapes(rng, size: int) -> Image.Image:
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 7))):
        w, h = rng.integers(3, max(4, size * 2 // 3), 2)
        x, y = rng.integers(-w // 2, size, 2)
        box = [int(x), int(y), int(x + w), int(y + h)]
        kind = rng.integers(0, 4)
        if kind == 0:
            draw.rectangle(box, fill=_colour(rng))
        elif kind == 1:
            draw.ellipse(box, fill=_colour(rng))
        elif kind == 2:
            points = [tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(int(rng.integers(3, 6)))]
            draw.polygon(points, fill=_colour(rng))
        else:
            draw.line(box, fill=_colour(rng), width=int(rng.integers(1, 5)))
    return image


def _texture(rng, size: int) -> Image.Image:
    a, b = np.array(_colour(rng), float), np.array(_colour(rng), float)
    yy, xx = np.mgrid[0:size, 0:size]
    if rng.random() < 0.5:  # grating
        f, angle = rng.uniform(0.05, 0.6), rng.uniform(0, np.pi)
        t = 0.5 + 0.5 * np.sin(f * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 6.3))
    else:  # checkerboard
        cell = int(rng.integers(2, max(3, size // 4)))
        t = ((xx // cell + yy // cell) % 2).astype(float)
    return Image.fromarray((a + (b - a) * t[..., None]).clip(0, 255).astype(np.uint8))


def _photo(rng, size: int, photos: list[np.ndarray]) -> Image.Image:
    photo = photos[int(rng.integers(len(photos)))]
    crop = int(rng.integers(size // 2, min(photo.shape[:2])))
    y, x = rng.integers(0, photo.shape[0] - crop), rng.integers(0, photo.shape[1] - crop)
    return Image.fromarray(photo[y : y + crop, x : x + crop]).resize((size, size), Image.BICUBIC)


def generate(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """n images, uint8 (n, size, size, 3): an equal share of each kind; half get pixel noise, some a blur."""
    rng = np.random.default_rng(seed)
    photos = list(load_sample_images().images)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        if kind == "field":
            image = _background(rng, size)
        elif kind == "gradient":
            image = Image.fromarray(_gradient(rng, size).clip(0, 255).astype(np.uint8))
        elif kind == "shapes":
            image = _shapes(rng, size)
        elif kind == "texture":
            image = _texture(rng, size)
        else:
            image = _photo(rng, size, photos)
        if rng.random() < 0.15:
            image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
        array = np.asarray(image, float)
        if rng.random() < 0.5:
            array = array + rng.normal(0, rng.uniform(2, 25), array.shape)
        out[i] = array.clip(0, 255).astype(np.uint8)
    return out


RECIPE = {
    "kinds": list(KINDS),
    "shares": "equal",
    "noise": "half the images, Gaussian std U(2, 25) on 0-255",
    "blur": "15 %, Gaussian radius U(0.5, 2)",
    "photos": "random crops of scikit-learn's bundled sample images (china.jpg, flower.jpg)",
    "augment": "random flips and 90-degree rotations",
}
