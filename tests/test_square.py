import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import square
from pipeline.config import SquareConfig


@pytest.mark.parametrize("poison", [1.0, 0.8, 0.5, 0.0])
def test_poisoning_shares_are_exact(tmp_path, poison):
    table = square.generate(tmp_path, SquareConfig(n=200, size=32, poison=poison, seed=1))
    aligned = table["group"].map({"dark": 0, "bright": 1}) == table["label"]
    for split in ("train", "val"):
        rows = table["split"] == split
        assert aligned[rows].sum() == round(poison * rows.sum())
    test = table["split"] == "test"
    assert aligned[test].sum() == test.sum() // 2  # the test split is unbiased whatever the poison
    assert (table.groupby("split")["label"].mean() == 0.5).all()  # balanced classes


def test_labels_groups_and_masks_follow_the_generator(tmp_path):
    table = square.generate(tmp_path, SquareConfig(n=60, size=32, noise=0.0, seed=2))
    assert list(table.columns[:5]) == ["path", "label", "split", "group", "feature_mask"]
    assert (table["label"] == (table["foreground"] >= 128)).all()
    assert (table["group"] == np.where(table["background"] >= 128, "bright", "dark")).all()
    for row in table.itertuples():
        image = np.asarray(Image.open(tmp_path / row.path))
        mask = np.asarray(Image.open(tmp_path / row.feature_mask)) > 0
        assert mask.sum() == 64  # the inner 8x8
        assert (image[mask] == [row.foreground, 0, 0]).all()  # red square, G = B = 0 (no noise here)
        assert (image[~mask] == row.background).all()  # grey background everywhere else
    assert pd.read_csv(tmp_path / "metadata.csv").shape[0] == 60


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = square.generate(tmp_path / "a", SquareConfig(n=30, size=32, seed=5))
    b = square.generate(tmp_path / "b", SquareConfig(n=30, size=32, seed=5))
    c = square.generate(tmp_path / "c", SquareConfig(n=30, size=32, seed=6))
    assert a.equals(b)
    same = [(tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes() for p in a["path"]]
    assert all(same)
    assert not a[["foreground", "background"]].equals(c[["foreground", "background"]])


def test_noise_has_the_configured_std(tmp_path):
    table = square.generate(tmp_path, SquareConfig(n=20, size=64, noise=20.0, seed=0))
    row = table[(table["background"] > 80) & (table["background"] < 170)].iloc[0]
    image = np.asarray(Image.open(tmp_path / row["path"])).astype(float)
    mask = np.asarray(Image.open(tmp_path / row["feature_mask"])) > 0
    assert abs(image[~mask].std() - 20.0) < 1.5
