"""The folder dataset: ``<root>/metadata.csv`` (path, label, split, optional group and feature_mask).

Loading validates every row and reports all bad rows in one error naming their CSV line numbers; nothing is
silently dropped. ``ImageDataset`` serves one split to torch with torchvision transforms v2.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

from pipeline.errors import UserError

REQUIRED = ("path", "label", "split")
SPLIT_NAMES = ("train", "val", "test")
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # maps [0, 1] to [-1, 1], the scale the generator uses too
MAX_LISTED = 20  # bad rows spelled out in the error; the count always covers all of them


@dataclass
class FolderData:
    root: Path
    table: pd.DataFrame  # one row per image; columns path, label, split, group, feature_mask, line
    classes: list[str]  # class names, sorted (numerically when all labels are integers)

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


def _image_size(path: Path) -> tuple[int, int] | str:
    """(width, height) after a full decode, or the reason it cannot be read."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"unreadable image '{path.name}' ({exc})"


def _row_problems(root: Path, row: dict, seen: dict[str, int], line: int) -> list[str]:
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
    size = _image_size(path)
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
        raise UserError(f"{csv}: missing column(s) {', '.join(missing)} (required: {', '.join(REQUIRED)})")
    if table.empty:
        raise UserError(f"{csv}: no rows")
    return table


def load_folder(root: str | Path) -> FolderData:
    """Read and validate a folder dataset; raise one UserError that lists every bad row."""
    root = Path(root).resolve()
    csv = root / "metadata.csv"
    table = _read_csv(csv)
    seen: dict[str, int] = {}
    bad = []
    for index, row in enumerate(table.to_dict("records")):
        line = index + 2  # line 1 is the header
        bad += [f"line {line}: {p}" for p in _row_problems(root, row, seen, line)]
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
    return FolderData(root=root, table=table, classes=_sort_classes(table["label"]))


def make_transform(image_size: int, mean=MEAN, std=STD) -> v2.Compose:
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((image_size, image_size), antialias=True),
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
            x = self.transform(image.convert("RGB"))
        return x, self.targets[i], i
