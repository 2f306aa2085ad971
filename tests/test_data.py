import shutil

import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.data import ImageDataset, load_folder, make_transform
from pipeline.errors import UserError


@pytest.fixture
def folder(square_dir, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(square_dir, root)
    return root


def _edit(root, change):
    table = pd.read_csv(root / "metadata.csv", dtype=str, keep_default_na=False)
    change(table)
    table.to_csv(root / "metadata.csv", index=False)


def test_valid_folder_loads(square_dir):
    data = load_folder(square_dir)
    assert data.classes == ["0", "1"]
    assert len(data.split("train")) == 60 and len(data.split("test")) == 20
    dataset = ImageDataset(data, "test", data.classes, make_transform(24))
    x, y, i = dataset[0]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and -1.0 <= x.min() <= x.max() <= 1.0
    assert y in (0, 1) and i == 0


def test_every_bad_row_is_reported_with_its_line(folder):
    (folder / "images/train/00001.png").unlink()  # missing file -> row 1 (line 3)
    data = (folder / "images/train/00002.png").read_bytes()
    (folder / "images/train/00002.png").write_bytes(data[: len(data) // 2])  # truncated -> line 4
    Image.new("L", (10, 10)).save(folder / "masks/train/00005.png")  # mask of the wrong size -> line 7

    def change(t):
        t.loc[2, "split"] = "training"  # line 4 also
        t.loc[3, "label"] = ""  # line 5
        t.loc[4, "path"] = t.loc[0, "path"]  # duplicate -> line 6
        t.loc[6, "path"] = "../../etc/passwd"  # outside -> line 8

    _edit(folder, change)
    with pytest.raises(UserError) as err:
        load_folder(folder)
    message = str(err.value)
    assert "\n" not in message
    for needle in [
        "line 3: missing file",
        "line 4: unknown split 'training'",
        "line 4: unreadable image",
        "line 5: empty label",
        "line 6: duplicate path 'images/train/00000.png' (first at line 2)",
        "line 7: feature_mask 'masks/train/00005.png' is 10x10, image is 32x32",
        "line 8: path '../../etc/passwd' is empty or outside the dataset folder",
    ]:
        assert needle in message
    assert "7 problem(s)" in message


def test_missing_columns_and_unparsable_csv(folder):
    _edit(folder, lambda t: t.drop(columns=["split"], inplace=True))
    with pytest.raises(UserError, match="missing column.*split"):
        load_folder(folder)
    (folder / "metadata.csv").write_bytes(b"\xff\xfe\x00garbage\x00\n")
    with pytest.raises(UserError):
        load_folder(folder)
    (folder / "metadata.csv").unlink()
    with pytest.raises(UserError, match="no metadata.csv"):
        load_folder(folder)


def test_optional_columns_and_named_classes(tmp_path, square_dir):
    table = pd.read_csv(square_dir / "metadata.csv")[["path", "label", "split"]]
    table["label"] = table["label"].map({0: "healthy", 1: "lesion"})
    shutil.copytree(square_dir / "images", tmp_path / "images")
    table.to_csv(tmp_path / "metadata.csv", index=False)
    data = load_folder(tmp_path)
    assert data.classes == ["healthy", "lesion"]
    assert (data.table["group"] == "").all() and (data.table["feature_mask"] == "").all()


def test_fingerprint_changes_with_image_bytes(folder):
    before = load_folder(folder).fingerprint("train")
    Image.new("RGB", (32, 32), "white").save(folder / "images/train/00000.png")
    assert load_folder(folder).fingerprint("train") != before
    assert load_folder(folder).fingerprint("test") == load_folder(folder).fingerprint("test")
