"""The benchmark datasets by name: name -> (config dataclass, generator writing the folder format, what it is).
One table for `cfkd data NAME` and benchmarks/suite.py."""

from __future__ import annotations

from pipeline import confounded, shapes, square
from pipeline.config import SquareConfig

GENERATORS = {
    "square": (SquareConfig, square.generate, "red-square brightness, 2 classes, a background shortcut"),
    "shapes": (shapes.ShapesConfig, shapes.generate, "greyscale 48x64, 3 classes, a corner-tag shortcut"),
    "stamp": (
        confounded.StampConfig,
        confounded.generate_stamp,
        "natural textures, 3 classes, a corner-watermark shortcut",
    ),
    "stain": (
        confounded.StainConfig,
        confounded.generate_stain,
        "histology-like tiles, 2 classes, a scanner colour-cast shortcut",
    ),
    "ruler": (
        confounded.RulerConfig,
        confounded.generate_ruler,
        "skin-lesion-like images, 2 classes, a ruler present or absent at any edge",
    ),
}
