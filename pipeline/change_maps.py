"""Pictures of the change between an original and its counterfactual, for the app, the report and Label Studio.

numpy and matplotlib only, so the annotation app loads no torch. The signed brightness map (written by explain)
shows where an edit made the image brighter or darker; a change of hue at equal brightness cancels out there, so the
colour map shows the per-pixel colour distance as well: any change of hue, saturation or brightness lights up.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image

FULL = 127.5  # a colour distance of half the value range is shown at full strength


def scale_for(width: int, side: int) -> int:
    """The whole-pixel enlargement that brings an image ``side`` pixels wide to at least ``width``."""
    return max(1, -(-width // side))


def colour_change(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Euclidean RGB distance per pixel (0-255 arrays, greyscale or RGB) as an (H, W, 3) uint8 magma image on a
    fixed scale; the square root lifts faint tints so a scattered one stays visible."""
    before, after = (np.atleast_3d(np.asarray(a, np.float32)) for a in (before, after))
    distance = np.linalg.norm(after - before, axis=-1)
    strength = np.sqrt(np.clip(distance / FULL, 0, 1))
    return (colormaps["magma"](strength)[..., :3] * 255).astype(np.uint8)


def read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def colour_change_png(original: Path, counterfactual: Path, scale: int = 1) -> bytes:
    """The colour map of two image files as PNG bytes, enlarged ``scale`` times pixel by pixel."""
    return png(colour_change(read(original), read(counterfactual)), scale)


def png(array: np.ndarray, scale: int = 1) -> bytes:
    """An image array as PNG bytes, enlarged by pixel repetition (no smoothing: an expert sees the real pixels)."""
    image = Image.fromarray(array)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def contact_sheet(paths: list[Path], side: int = 48, gap: int = 4) -> bytes:
    """Thumbnails of several images in one row, as one PNG (one picture to send, not one per member)."""
    sheet = Image.new("RGB", (len(paths) * (side + gap) - gap, side), "white")
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                sheet.paste(image.convert("RGB").resize((side, side), Image.BOX), (i * (side + gap), 0))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            continue  # an unreadable member stays a blank tile; its own card says why
    return png(np.asarray(sheet))


def flicker_gif(original: Path, counterfactual: Path, scale: int = 1, ms: int = 600) -> bytes:
    """An endless animation original <-> counterfactual: the eye finds a small change by its flicker."""
    frames = [Image.fromarray(read(p)) for p in (original, counterfactual)]
    if scale > 1:
        frames = [f.resize((f.width * scale, f.height * scale), Image.NEAREST) for f in frames]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=ms, loop=0)
    return buffer.getvalue()
