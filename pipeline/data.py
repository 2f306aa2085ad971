"""The folder dataset: ``<root>/metadata.csv`` (path, label, split, optional group and feature_mask).

Loading validates every row and reports all bad rows in one error naming their CSV line numbers; nothing is
silently dropped. ``ImageDataset`` serves one split to torch with torchvision transforms v2, ``Counterfactuals``
the saved counterfactual images with the labels their verdicts give.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

from pipeline.errors import UserError

REQUIRED = ("path", "label", "split")
SPLIT_NAMES = ("train", "val", "test")
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # maps [0, 1] to [-1, 1], the scale the generator uses too
MAX_LISTED = 20  # bad rows spelled out in the error; the count always covers all of them
RESIZE = ("pad", "crop", "stretch")
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "P"}  # P: checked by its palette below
GREY_TOLERANCE = 3  # an RGB file whose channels differ by at most this much (JPEG noise) is greyscale


def hw(size) -> tuple[int, int]:
    """(height, width) from an int side or an [H, W] pair."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


@dataclass
class FolderData:
    root: Path
    table: pd.DataFrame  # one row per image; columns path, label, split, group, feature_mask, line
    classes: list[str]  # class names, sorted (numerically when all labels are integers)
    grey: bool = False  # every image is greyscale (one channel, or three equal ones)

    def split(self, name: str) -> pd.DataFrame:
        return self.table[self.table["split"] == name].reset_index(drop=True)

    def fingerprint(self, split: str | None = None) -> str:
        """sha256 of metadata rows and image bytes (of one split, or all): the 'hash of the training data'."""
        rows = self.table if split is None else self.split(split)
        digest = hashlib.sha256()
        for row in rows.itertuples():
            digest.update(f"{row.path}\0{row.label}\0{row.split}\0{row.group}\0".encode())
            digest.update((self.root / row.path).read_bytes())
        return digest.hexdigest()


def _sort_classes(labels) -> list[str]:
    labels = sorted(set(labels))
    try:
        return sorted(labels, key=int)
    except ValueError:
        return labels


def _inside(root: Path, rel: str) -> Path | None:
    """The resolved file for a relative path, or None when it points outside root (absolute, ../, link)."""
    if not rel or Path(rel).is_absolute():
        return None
    path = (root / rel).resolve()
    return path if path.is_relative_to(root) else None


def _is_grey(image: Image.Image) -> bool:
    if image.mode in GREY_MODES - {"P"}:
        return True
    rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    return int(np.abs(rgb - rgb.mean(-1, keepdims=True)).max()) <= GREY_TOLERANCE


def _image_size(path: Path, grey: list | None = None) -> tuple[int, int] | str:
    """(width, height) after a full decode, or the reason it cannot be read; appends greyness to ``grey``."""
    try:
        with Image.open(path) as image:
            image.load()
            if grey is not None:
                grey.append(_is_grey(image))
            return image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return f"unreadable image '{path.name}' ({exc})"


def _row_problems(root: Path, row: dict, seen: dict[str, int], line: int, grey: list) -> list[str]:
    problems = []
    rel = row["path"].strip()
    if not row["label"].strip():
        problems.append("empty label")
    if row["split"].strip() not in SPLIT_NAMES:
        problems.append(f"unknown split '{row['split']}' (expected train, val or test)")
    if rel in seen:
        problems.append(f"duplicate path '{rel}' (first at line {seen[rel]})")
        return problems
    seen[rel] = line
    path = _inside(root, rel)
    if path is None:
        return problems + [f"path '{rel}' is empty or outside the dataset folder"]
    if not path.is_file():
        return problems + [f"missing file '{rel}'"]
    size = _image_size(path, grey)
    if isinstance(size, str):
        return problems + [size]
    mask_rel = row.get("feature_mask", "").strip()
    if mask_rel:
        mask = _inside(root, mask_rel)
        if mask is None or not mask.is_file():
            problems.append(f"missing or outside feature_mask '{mask_rel}'")
        else:
            mask_size = _image_size(mask)
            if isinstance(mask_size, str):
                problems.append(f"feature_mask: {mask_size}")
            elif mask_size != size:
                problems.append(
                    f"feature_mask '{mask_rel}' is {mask_size[0]}x{mask_size[1]}, image is {size[0]}x{size[1]}"
                )
    return problems


def _read_csv(csv: Path) -> pd.DataFrame:
    if not csv.is_file():
        raise UserError(f"no metadata.csv in dataset folder {csv.parent}")
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"{csv}: not a readable CSV ({str(exc).strip().splitlines()[0]})") from None
    missing = [c for c in REQUIRED if c not in table.columns]
    if missing:
        header = ",".join(table.columns)
        other = next((name for sep, name in ((";", "semicolons"), ("\t", "tabs")) if sep in header), None)
        hint = f"; the header is separated by {other}: metadata.csv takes commas" if other else ""
        raise UserError(
            f"{csv}: missing column(s) {', '.join(missing)} (required: {', '.join(REQUIRED)}){hint}"
        )
    if table.empty:
        raise UserError(f"{csv}: no rows")
    return table


def load_folder(root: str | Path) -> FolderData:
    """Read and validate a folder dataset; raise one UserError that lists every bad row."""
    root = Path(root).resolve()
    csv = root / "metadata.csv"
    table = _read_csv(csv)
    seen: dict[str, int] = {}
    bad, grey = [], []
    for index, row in enumerate(table.to_dict("records")):
        line = index + 2  # line 1 is the header
        bad += [f"line {line}: {p}" for p in _row_problems(root, row, seen, line, grey)]
    if bad:
        listed = "; ".join(bad[:MAX_LISTED]) + (
            f"; ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        )
        raise UserError(f"{csv}: {len(bad)} problem(s): {listed}")
    table = table.assign(
        path=table["path"].str.strip(),
        label=table["label"].str.strip(),
        split=table["split"].str.strip(),
        group=table["group"].str.strip() if "group" in table else "",
        feature_mask=table["feature_mask"].str.strip() if "feature_mask" in table else "",
        line=range(2, len(table) + 2),
    )
    folder = FolderData(root=root, table=table, classes=_sort_classes(table["label"]), grey=all(grey))
    _check_training_classes(folder, csv)
    return folder


def _check_training_classes(folder: FolderData, csv: Path) -> None:
    """Every class needs training images (a dataset without a train split is an evaluation set: fine)."""
    trained = set(folder.split("train")["label"])
    absent = [c for c in folder.classes if c not in trained]
    if trained and absent:
        raise UserError(
            f"{csv}: class(es) {', '.join(repr(c) for c in absent)} have no training images "
            "(add train rows for them, or drop their rows)"
        )


def eight_bit(image: Image.Image) -> Image.Image:
    """16-bit and float greyscale (X-ray, microscopy PNG/TIFF) scaled to 8 bits; PIL's convert would clip."""
    if image.mode not in ("I", "I;16", "I;16B", "I;16L", "F"):
        return image
    values = np.asarray(image, dtype=np.float64)
    peak = 255.0 if values.max() <= 255 else 65535.0
    return Image.fromarray((np.clip(values, 0, peak) * (255.0 / peak)).round().astype(np.uint8), "L")


class ToChannels:
    """A PIL image as 1 channel (luminance) or 3 (greyscale replicated)."""

    def __init__(self, channels: int):
        self.mode = "L" if channels == 1 else "RGB"

    def __call__(self, image: Image.Image) -> Image.Image:
        return eight_bit(image).convert(self.mode)


class Fit(torch.nn.Module):
    """Resize to (height, width) by a policy: ``pad`` keeps the whole image and its aspect (letterbox, black
    borders), ``crop`` fills the frame and cuts the longer side, ``stretch`` distorts the aspect."""

    def __init__(self, size, policy: str = "pad"):
        super().__init__()
        self.size, self.policy = hw(size), policy

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        (height, width), (h, w) = self.size, image.shape[-2:]
        if self.policy == "stretch" or (h, w) == (height, width):
            return v2.functional.resize(image, [height, width], antialias=True)
        scale = (min if self.policy == "pad" else max)(height / h, width / w)
        fitted = [max(1, round(h * scale)), max(1, round(w * scale))]
        # center_crop pads with zeros where the crop is larger than the image: the letterbox
        return v2.functional.center_crop(v2.functional.resize(image, fitted, antialias=True), [height, width])


def read_rgb(path: Path, dtype=np.float32) -> np.ndarray:
    """An image file as an (H, W, 3) array on the 0-255 scale."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=dtype)


def load_mask(path: Path, size, resize: str = "pad") -> np.ndarray:
    """A feature mask (white = the true evidence) as a boolean (height, width) array, fitted to ``size`` by the
    same policy as its image, so it stays aligned whatever the aspect."""
    with Image.open(path) as image:
        mask = v2.functional.pil_to_tensor(eight_bit(image).convert("L"))
    return (Fit(size, resize)(mask)[0] > 127).numpy()


def make_transform(image_size, mean=MEAN, std=STD, channels: int = 3, resize: str = "pad") -> v2.Compose:
    """PIL image -> normalised float tensor of ``channels`` channels (greyscale replicated into RGB, RGB into
    luminance) at ``image_size`` (a side, or [height, width]) by the ``resize`` policy."""
    return v2.Compose(
        [
            ToChannels(channels),
            v2.ToImage(),
            Fit(image_size, resize),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


class ImageDataset(torch.utils.data.Dataset):
    """One split of a folder dataset: yields (image, class index, row index)."""

    def __init__(self, data: FolderData, split: str, classes: list[str], transform):
        self.root, self.rows = data.root, data.split(split)
        unknown = sorted(set(self.rows["label"]) - set(classes))
        if unknown:
            raise UserError(
                f"labels {unknown} in {data.root} are not among the classifier's classes {classes}"
            )
        self.classes = classes
        self.targets = [classes.index(label) for label in self.rows["label"]]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        with Image.open(self.root / self.rows["path"][i]) as image:
            x = self.transform(image)
        return x, self.targets[i], i


class Counterfactuals(torch.utils.data.Dataset):
    """Counterfactual PNGs with their training labels: yields (image, class index, i). With ``stretch`` > 1 each
    draw is original + a * (counterfactual - original), a ~ U(1, stretch), clipped to [0, 255]: always on the image
    the verdict was given on, never carried onto another (an expert judged this change on this image). With
    ``limits`` ((2, 3): the lowest and highest per-channel mean of real images, 0-255) a is drawn only up to where
    the image's overall colour would leave them: a change made stronger than any real image shows is one a
    classifier can learn apart from every real image."""

    def __init__(
        self,
        table: pd.DataFrame,
        folder: Path,
        classes: list[str],
        transform,
        stretch: float = 1.0,
        limits: np.ndarray | None = None,
    ):
        self.paths = [folder / p for p in table["counterfactual"]]
        self.originals = [folder / p for p in table["original"]] if stretch > 1 else []
        self.targets = [classes.index(label) for label in table["label"]]
        self.transform, self.stretch, self.limits = transform, stretch, limits

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        cf = read_rgb(self.paths[i])
        if self.originals:
            original = read_rgb(self.originals[i])
            a = float(torch.empty(()).uniform_(1.0, self.most(original, cf)))
            cf = np.clip(original + a * (cf - original), 0, 255)
        return self.transform(Image.fromarray(cf.round().astype(np.uint8))), self.targets[i], i

    def most(self, original: np.ndarray, cf: np.ndarray) -> float:
        """The largest stretch for this edit: ``stretch``, or less where the channel means would leave ``limits``."""
        if self.limits is None:
            return self.stretch
        start, change = original.mean((0, 1)), (cf - original).mean((0, 1))
        bound = np.where(change > 0, self.limits[1], self.limits[0])
        with np.errstate(divide="ignore", invalid="ignore"):
            reach = np.where(np.abs(change) > 1e-6, (bound - start) / change, np.inf)
        return float(np.clip(reach.min(), 1.0, self.stretch))
