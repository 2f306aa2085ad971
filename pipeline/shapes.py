"""Shapes: a greyscale, non-square, three-class dataset in the folder format, with a local shortcut.

Each image (default 48 x 64 px, one channel) shows one object on a dark noisy background: a disc, a bar or a
ring (the class; ``feature_mask`` is the object). A small square tag sits in the top-left corner; its brightness
(dim, mid, bright) is the confounder (``group``). In train/val a share ``poison`` of the images carries the tag
of their own class, the rest one of another class; the test split is unconfounded (tags drawn at random). It is
the kind of data a user brings (greyscale, not square, more than two classes, a scanner-tag-like shortcut) and
the suite's case for it; same seed, same bytes. ``shortcut_mask`` (for benchmarks) is the tag.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

NAMES = ("disc", "bar", "ring")
TAG_LEVELS = (70, 150, 235)  # tag brightness per confounder value


@dataclass(frozen=True)
class ShapesConfig:
    n: int = 900  # images in all splits together (60 % train, 20 % val, 20 % test)
    poison: float = 1.0  # share of train/val images whose tag is their own class's (1 / 3 = unconfounded)
    height: int = 48
    width: int = 64
    noise: float = 12.0  # background noise std, 0-255
    tag: int = 6  # tag side in pixels
    contrast: float = 1.0  # the object's brightness above the background, as a share of the default (150-230)
    seed: int = 0


def _object(kind: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of one object at a random place away from the tag corner."""
    yy, xx = np.mgrid[:height, :width]
    r = rng.uniform(0.16, 0.22) * height
    cy = rng.uniform(0.35, 0.65) * height
    cx = rng.uniform(0.35, 0.65) * width
    d = np.hypot(yy - cy, xx - cx)
    if kind == 0:
        return d <= r
    if kind == 1:
        return (np.abs(yy - cy) <= r * 0.35) & (np.abs(xx - cx) <= r * 1.4)
    return (d <= r) & (d >= r * 0.55)


def generate(
    out: str | Path, c: ShapesConfig = ShapesConfig(), names: tuple[str, ...] = NAMES
) -> pd.DataFrame:
    """Write images/, masks/ and metadata.csv into ``out``; returns the table."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    (out / "shortcut").mkdir(exist_ok=True)
    rng = np.random.default_rng(c.seed)
    splits = np.array(["train"] * int(0.6 * c.n) + ["val"] * int(0.2 * c.n))
    splits = np.concatenate([splits, ["test"] * (c.n - len(splits))])
    rows = []
    for i, split in enumerate(splits):
        label = int(rng.integers(3))
        confounded = split != "test" and rng.random() < c.poison
        tag = (
            label
            if confounded
            else int(rng.choice([k for k in range(3) if k != label] if split != "test" else range(3)))
        )
        mask = _object(label, c.height, c.width, rng)
        image = 40 + c.noise * rng.standard_normal((c.height, c.width))
        level = 40 + c.contrast * (rng.uniform(150, 230) - 40)
        image[mask] = level + c.noise * rng.standard_normal(mask.sum())
        image[1 : 1 + c.tag, 1 : 1 + c.tag] = TAG_LEVELS[tag]
        shortcut = np.zeros((c.height, c.width), np.uint8)
        shortcut[1 : 1 + c.tag, 1 : 1 + c.tag] = 255
        path, mask_path, shortcut_path = (
            f"{folder}/{i:05d}.png" for folder in ("images", "masks", "shortcut")
        )
        Image.fromarray(np.clip(image, 0, 255).round().astype(np.uint8), "L").save(out / path)
        Image.fromarray((mask * 255).astype(np.uint8), "L").save(out / mask_path)
        Image.fromarray(shortcut, "L").save(out / shortcut_path)
        rows.append(
            {
                "path": path,
                "label": names[label],
                "split": split,
                "group": f"tag{tag}",
                "feature_mask": mask_path,
                "shortcut_mask": shortcut_path,
            }
        )
    table = pd.DataFrame(rows)
    table.to_csv(out / "metadata.csv", index=False)
    return table
