"""The Square dataset of the CFKD/SCE authors, written in the folder format (background brightness confounded with the class).

64x64 RGB: grey background of brightness b plus Gaussian noise; a 12x12 patch at a random position whose inner
8x8 is red with intensity a (G = B = 0) plus noise. Class = a >= 128 (the true feature), confounder = b >= 128.
In train/val exactly round(p * n) images have confounder == class; the test split is unbiased (p = 0.5).
``shortcut_mask`` (for benchmarks) is the background, where the confounder lives.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.config import SquareConfig

SPLITS = {"train": 0.6, "val": 0.2, "test": 0.2}
PATCH, INNER = 12, 8  # the patch and its red centre, pixels
GROUPS = ("dark", "bright")  # group column = confounder value (background brightness)


def _split_sizes(n: int) -> dict[str, int]:
    sizes = {name: int(round(n * share)) for name, share in SPLITS.items()}
    sizes["train"] = n - sizes["val"] - sizes["test"]
    return sizes


def _intensities(rng: np.random.Generator, high: np.ndarray) -> np.ndarray:
    """Uniform on [128, 255] where high, else on [0, 127]."""
    return np.where(high, rng.integers(128, 256, high.size), rng.integers(0, 128, high.size))


def _render(
    rng: np.random.Generator, a: int, b: int, size: int, noise: float
) -> tuple[np.ndarray, np.ndarray]:
    image = np.full((size, size, 3), float(b))
    x, y = rng.integers(0, size - PATCH + 1, 2)
    o = (PATCH - INNER) // 2
    rows, cols = slice(y + o, y + o + INNER), slice(x + o, x + o + INNER)
    image[rows, cols] = (a, 0, 0)
    image += rng.normal(0.0, noise, image.shape) if noise > 0 else 0.0
    mask = np.zeros((size, size), np.uint8)
    mask[rows, cols] = 255
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


def generate(out: str | Path, config: SquareConfig = SquareConfig()) -> pd.DataFrame:
    """Write the dataset to ``out`` (images/, masks/, metadata.csv, dataset.json); return the metadata."""
    out = Path(out)
    rng = np.random.default_rng(config.seed)
    rows = []
    for split, n in _split_sizes(config.n).items():
        poison = 0.5 if split == "test" else config.poison
        label = rng.permutation(np.arange(n) < n // 2 + rng.integers(0, 2) * (n % 2))  # balanced classes
        aligned = np.zeros(n, bool)
        for cls in (False, True):  # exact share with confounder == class, within each class
            members = rng.permutation(np.flatnonzero(label == cls))
            aligned[members[: int(round(poison * members.size))]] = True
        confounder = np.where(aligned, label, ~label)
        a, b = _intensities(rng, label), _intensities(rng, confounder)
        for folder in ("images", "masks", "shortcut"):
            (out / folder / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, mask = _render(rng, int(a[i]), int(b[i]), config.size, config.noise)
            path, mask_path = f"images/{split}/{i:05d}.png", f"masks/{split}/{i:05d}.png"
            shortcut_path = f"shortcut/{split}/{i:05d}.png"
            Image.fromarray(image).save(out / path)
            Image.fromarray(mask).save(out / mask_path)
            Image.fromarray(255 - mask).save(out / shortcut_path)  # the background: the shortcut
            rows.append(
                {
                    "path": path,
                    "label": int(label[i]),
                    "split": split,
                    "group": GROUPS[int(confounder[i])],
                    "feature_mask": mask_path,
                    "shortcut_mask": shortcut_path,
                    "foreground": int(a[i]),
                    "background": int(b[i]),
                }
            )
    table = pd.DataFrame(rows)
    table.to_csv(out / "metadata.csv", index=False)
    card = {"generator": "square", **asdict(config), "splits": _split_sizes(config.n), "classes": ["0", "1"]}
    (out / "dataset.json").write_text(json.dumps(card, indent=2))
    return table
