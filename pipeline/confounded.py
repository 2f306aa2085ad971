"""Confounded benchmark datasets of other kinds than Square, in the folder format, deterministic (same seed, same
bytes). Each knows where its shortcut lives and writes it as a ``shortcut_mask`` column (for benchmarks; users'
datasets do not need one) beside ``feature_mask`` (the real class evidence) and ``group`` (the confounder).

- **stamp**: natural textures (brick, grass, gravel from scikit-image's bundled photos; the class) in random
  colour tints, with a small semi-transparent watermark in a corner whose glyph (ring, cross, triangle) is the
  confounder: a local shortcut on natural-looking content, three classes. ``shortcut_mask`` is the watermark's
  square (a change of the glyph's shape lies there), ``feature_mask`` the texture around it.
- **stain**: histology-like tiles, pink tissue with purple nuclei whose shape (round or elongated) is the class;
  the slide's colour cast (warm or cool, as two scanners or staining protocols give) is the confounder: a global
  colour shortcut. Its ``shortcut_mask`` is the tissue around the nuclei, where the cast is the only signal.
- **ruler**: skin-lesion-like images, a brown lesion on skin whose border (regular or irregular) is the class; a
  ruler lying along any of the four edges, present or absent, is the confounder (as rulers in dermoscopy photos):
  a shortcut of presence, not of one value among several, at no fixed place. ``shortcut_mask`` is the ruler's band,
  or in an image without one the edge band a ruler could lie in.

In train/val a share ``poison`` of the images carries the confounder value of their own class, the rest another
one; the test split is unconfounded. Every size (crop, glyph, nucleus, blur) is a share of the image side.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

SPLITS = (("train", 0.6), ("val", 0.2), ("test", 0.2))


def splits(n: int) -> list[str]:
    sizes = [int(share * n) for _, share in SPLITS[:-1]]
    return [name for (name, _), k in zip(SPLITS, [*sizes, n - sum(sizes)]) for _ in range(k)]


def confounder(label: int, split: str, poison: float, values: int, rng: np.random.Generator) -> int:
    """Own class's value with probability ``poison`` in train/val, another value otherwise; uniform in test."""
    if split == "test":
        return int(rng.integers(values))
    if rng.random() < poison:
        return label
    return int(rng.choice([v for v in range(values) if v != label]))


def _save(out: Path, rel: str, array: np.ndarray) -> None:
    Image.fromarray(array).save(out / rel)


def _write(out: Path, rows: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    table.to_csv(out / "metadata.csv", index=False)
    return table


def _folders(out: Path) -> None:
    for folder in ("images", "masks", "shortcut"):
        (out / folder).mkdir(parents=True, exist_ok=True)


def _record(out: Path, i: int, image: np.ndarray, feature: np.ndarray, shortcut: np.ndarray, **row) -> dict:
    """Image ``i`` (RGB in [0, 1]) and its two masks saved; its metadata row (``row``: label, split, group)."""
    path, mask, short = f"images/{i:05d}.png", f"masks/{i:05d}.png", f"shortcut/{i:05d}.png"
    _save(out, path, (np.clip(image, 0, 1) * 255).round().astype(np.uint8))
    _save(out, mask, np.where(feature, 255, 0).astype(np.uint8))
    _save(out, short, np.where(shortcut, 255, 0).astype(np.uint8))
    return {"path": path, **row, "feature_mask": mask, "shortcut_mask": short}


# -- stamp ---------------------------------------------------------------------------------------------------
TEXTURES = ("brick", "grass", "gravel")
GLYPHS = ("ring", "cross", "triangle")


@dataclass(frozen=True)
class StampConfig:
    n: int = 900  # images in all splits (60 % train, 20 % val, 20 % test)
    poison: float = (
        1.0  # share of train/val images whose watermark is their own class's (1 / 3 = unconfounded)
    )
    size: int = 64  # image side, px
    glyph: float = 0.22  # watermark side, share of the image side
    opacity: float = 0.6  # how strongly the watermark covers the texture
    contrast: float = 0.5  # the textures' contrast around their mean (lower: subtler real evidence)
    noise: float = 0.04  # pixel noise std on the [0, 1] scale
    seed: int = 0


def _textures() -> dict[str, np.ndarray]:
    import skimage.data

    return {name: getattr(skimage.data, name)().astype(np.float32) / 255 for name in TEXTURES}


def _crop(texture: np.ndarray, size: int, contrast: float, rng: np.random.Generator) -> np.ndarray:
    """A random window (a quarter to a half of the photo's side) resized to ``size``, in a random tint."""
    side = int(rng.uniform(0.25, 0.5) * texture.shape[0])
    y, x = rng.integers(0, texture.shape[0] - side + 1), rng.integers(0, texture.shape[1] - side + 1)
    window = Image.fromarray((texture[y : y + side, x : x + side] * 255).astype(np.uint8))
    grey = np.asarray(window.resize((size, size), Image.BILINEAR), np.float32) / 255
    grey = grey.mean() + contrast * (grey - grey.mean())
    tint = rng.uniform(0.55, 1.0, 3)
    return grey[..., None] * tint / tint.max()


def _glyph(kind: int, size: int, side: int, corner: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of one watermark glyph in one corner (0 top-left, clockwise), jittered a little."""
    margin = max(1, round(0.04 * size))
    jitter = int(rng.integers(0, margin + 1))
    x0 = margin + jitter if corner in (0, 3) else size - margin - jitter - side
    y0 = margin + jitter if corner in (0, 1) else size - margin - jitter - side
    canvas = Image.new("L", (size, size))
    draw = ImageDraw.Draw(canvas)
    box = (x0, y0, x0 + side - 1, y0 + side - 1)
    width = max(1, round(side * 0.2))
    if kind == 0:
        draw.ellipse(box, outline=255, width=width)
    elif kind == 1:
        mid = side // 2
        draw.line((x0 + mid, y0, x0 + mid, y0 + side - 1), fill=255, width=width)
        draw.line((x0, y0 + mid, x0 + side - 1, y0 + mid), fill=255, width=width)
    else:
        draw.polygon([(x0 + side / 2, y0), (x0, y0 + side - 1), (x0 + side - 1, y0 + side - 1)], fill=255)
    return np.asarray(canvas) > 0


def _box(glyph: np.ndarray) -> np.ndarray:
    """The watermark's square: where the confounder lives. Its value is the glyph's shape, so an edit that turns a
    ring into a cross changes pixels beside the ring's strokes, and those are the shortcut's too."""
    rows, cols = np.nonzero(glyph)
    box = np.zeros_like(glyph)
    box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
    return box


def generate_stamp(out: str | Path, c: StampConfig = StampConfig()) -> pd.DataFrame:
    out = Path(out)
    _folders(out)
    rng, textures = np.random.default_rng(c.seed), _textures()
    side = max(4, round(c.glyph * c.size))
    rows = []
    for i, split in enumerate(splits(c.n)):
        label = int(rng.integers(len(TEXTURES)))
        mark = confounder(label, split, c.poison, len(GLYPHS), rng)
        image = _crop(textures[TEXTURES[label]], c.size, c.contrast, rng)
        glyph = _glyph(mark, c.size, side, int(rng.integers(4)), rng)
        image[glyph] = (1 - c.opacity) * image[glyph] + c.opacity  # a light, semi-transparent mark
        image += rng.normal(0, c.noise, image.shape)
        mark_box = _box(glyph)  # the texture around it is the evidence
        rows.append(
            _record(
                out, i, image, ~mark_box, mark_box, label=TEXTURES[label], split=split, group=GLYPHS[mark]
            )
        )
    return _write(out, rows)


# -- stain ---------------------------------------------------------------------------------------------------
NUCLEI = ("round", "elongated")
CASTS = ("warm", "cool")


@dataclass(frozen=True)
class StainConfig:
    n: int = 900
    poison: float = (
        1.0  # share of train/val images whose colour cast is their own class's (0.5 = unconfounded)
    )
    size: int = 64
    nuclei: int = 7  # nuclei per tile
    radius: float = 0.055  # a round nucleus's radius, share of the image side
    cast: float = 0.12  # strength of a scanner's colour cast (channel gain, red against blue)
    seed: int = 0


def _tissue(size: int, rng: np.random.Generator) -> np.ndarray:
    """Pink tissue with smooth, blotchy density (noise blurred over a tenth of the side)."""
    noise = Image.fromarray((rng.random((size, size)) * 255).astype(np.uint8))
    blotch = np.asarray(noise.filter(ImageFilter.GaussianBlur(size / 10)), np.float32) / 255
    density = (blotch - blotch.mean()) * 4 + rng.normal(0, 0.03, (size, size))
    pink = np.array([0.93, 0.72, 0.82], np.float32)
    return np.clip(pink - density[..., None] * np.array([0.05, 0.12, 0.08]), 0, 1)


def _nuclei(kind: int, size: int, count: int, radius: float, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    mask = np.zeros((size, size), bool)
    for _ in range(count):
        r = radius * size * rng.uniform(0.85, 1.15)
        a, b = (r, r) if kind == 0 else (r * 1.9, r * 0.55)
        angle = rng.uniform(0, np.pi)
        cy, cx = rng.uniform(0.12, 0.88, 2) * size
        u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        mask |= (u / a) ** 2 + (v / b) ** 2 <= 1
    return mask


def generate_stain(out: str | Path, c: StainConfig = StainConfig()) -> pd.DataFrame:
    out = Path(out)
    _folders(out)
    rng = np.random.default_rng(c.seed)
    rows = []
    for i, split in enumerate(splits(c.n)):
        label = int(rng.integers(len(NUCLEI)))
        source = confounder(label, split, c.poison, len(CASTS), rng)
        image = _tissue(c.size, rng)
        nuclei = _nuclei(label, c.size, c.nuclei, c.radius, rng)
        purple = np.array([0.42, 0.22, 0.58]) + rng.normal(0, 0.04, (int(nuclei.sum()), 3))
        image[nuclei] = purple
        sign = 1 if source == 0 else -1
        gain = 1 + sign * c.cast * rng.uniform(0.8, 1.2) * np.array([1.0, 0.0, -1.0])
        image = image * gain + rng.normal(0, 0.015, image.shape)
        rows.append(
            _record(out, i, image, nuclei, ~nuclei, label=NUCLEI[label], split=split, group=CASTS[source])
        )
    return _write(out, rows)


# -- ruler ---------------------------------------------------------------------------------------------------
BORDERS = ("regular", "irregular")
RULERS = ("none", "ruler")


@dataclass(frozen=True)
class RulerConfig:
    n: int = 900
    poison: float = (
        1.0  # share of train/val images with a ruler exactly when the border is irregular (0.5 = none)
    )
    size: int = 64
    frame: float = 0.12  # the edge band a ruler lies in, share of the side (the lesion never reaches it)
    irregularity: float = 0.3  # an irregular border's radial wobble, share of the lesion's radius
    noise: float = 0.02  # pixel noise std on the [0, 1] scale
    seed: int = 0


def _skin(size: int, rng: np.random.Generator) -> np.ndarray:
    """Skin of a random tone with smooth blotches (noise blurred over an eighth of the side)."""
    noise = Image.fromarray((rng.random((size, size)) * 255).astype(np.uint8))
    blotch = np.asarray(noise.filter(ImageFilter.GaussianBlur(size / 8)), np.float32) / 255
    tone = np.array([0.88, 0.68, 0.58], np.float32) * rng.uniform(0.85, 1.05)
    return np.clip(tone + (blotch - blotch.mean())[..., None] * 2.5 * np.array([0.10, 0.08, 0.07]), 0, 1)


def _lesion(irregular: bool, size: int, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """A lesion near the centre: an ellipse (regular) or a border whose radius wobbles with the angle (irregular),
    never farther than 0.38 of the side from the centre."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32) + 0.5
    cy, cx = rng.uniform(0.44, 0.56, 2) * size
    angle = np.arctan2(yy - cy, xx - cx)
    radius = rng.uniform(0.17, 0.22) * size
    stretch = rng.uniform(1.0, 1.25)
    tilt = rng.uniform(0, np.pi)
    r = radius / np.sqrt((np.cos(angle - tilt) * stretch) ** 2 + np.sin(angle - tilt) ** 2) * stretch**0.5
    if irregular:
        lobes = rng.choice(np.arange(3, 8), 2, replace=False)
        wobble = sum(np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in lobes) / 2
        r = r * (1 + amplitude * wobble)
    return np.hypot(yy - cy, xx - cx) <= r


def _ruler(size: int, frame: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A ruler along a random edge, at a random place within the edge band: (its band, its tick marks)."""
    width = max(3, round(0.07 * size))
    length = round(rng.uniform(0.55, 0.8) * size)
    start = int(rng.integers(0, size - length + 1))
    offset = int(rng.integers(1, max(2, round(frame * size) - width)))
    band, ticks = np.zeros((size, size), bool), np.zeros((size, size), bool)
    band[offset : offset + width, start : start + length] = True
    step = max(2, round(0.06 * size))
    for x in range(start + 1, start + length - 1, step):
        ticks[offset : offset + (width if (x - start) // step % 2 else width // 2 + 1), x] = True
    turns = int(rng.integers(4))  # which edge: the band rotated to it
    return np.rot90(band, turns), np.rot90(ticks, turns)


def generate_ruler(out: str | Path, c: RulerConfig = RulerConfig()) -> pd.DataFrame:
    out = Path(out)
    _folders(out)
    rng = np.random.default_rng(c.seed)
    edge = max(1, round(c.frame * c.size))
    frame = np.ones((c.size, c.size), bool)
    frame[edge:-edge, edge:-edge] = False
    rows = []
    for i, split in enumerate(splits(c.n)):
        label = int(rng.integers(len(BORDERS)))
        present = confounder(label, split, c.poison, len(RULERS), rng)
        image = _skin(c.size, rng)
        lesion = _lesion(label == 1, c.size, c.irregularity, rng) & ~frame
        image[lesion] = np.array([0.42, 0.26, 0.19]) * rng.uniform(0.8, 1.1) + rng.normal(
            0, 0.03, (lesion.sum(), 3)
        )
        shortcut = frame  # where a ruler could lie: the shortcut's region in an image without one
        if present:
            band, ticks = _ruler(c.size, c.frame, rng)
            image[band] = rng.uniform(0.85, 0.95)
            image[ticks] = 0.15
            shortcut = band
        image = image + rng.normal(0, c.noise, image.shape)
        rows.append(
            _record(out, i, image, lesion, shortcut, label=BORDERS[label], split=split, group=RULERS[present])
        )
    return _write(out, rows)
