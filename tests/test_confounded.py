"""The benchmark datasets besides Square: deterministic, confounded as asked, and each knows where its shortcut is."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import cli, confounded, shapes, square
from pipeline.config import SquareConfig
from pipeline.data import load_folder

GENERATORS = {
    "stamp": lambda out, **k: confounded.generate_stamp(out, confounded.StampConfig(**k)),
    "stain": lambda out, **k: confounded.generate_stain(out, confounded.StainConfig(**k)),
    "ruler": lambda out, **k: confounded.generate_ruler(out, confounded.RulerConfig(**k)),
    "shapes": lambda out, **k: shapes.generate(out, shapes.ShapesConfig(**k)),
    "square": lambda out, **k: square.generate(out, SquareConfig(size=32, **k)),
}


def _mask(root, rel) -> np.ndarray:
    return np.asarray(Image.open(root / rel)) > 127


@pytest.mark.parametrize("name", list(GENERATORS))
def test_same_seed_same_bytes_and_a_readable_folder(tmp_path, name):
    a = GENERATORS[name](tmp_path / "a", n=40, seed=3)
    b = GENERATORS[name](tmp_path / "b", n=40, seed=3)
    assert a.equals(b)
    assert all((tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes() for p in a["path"])
    folder = load_folder(tmp_path / "a")
    assert {"feature_mask", "shortcut_mask", "group"} <= set(folder.table.columns)


@pytest.mark.parametrize("name", list(GENERATORS))
def test_the_shortcut_mask_is_where_the_confounder_is_and_not_the_evidence(tmp_path, name):
    table = GENERATORS[name](tmp_path, n=40, seed=1)
    for row in table.head(10).itertuples():
        feature, shortcut = _mask(tmp_path, row.feature_mask), _mask(tmp_path, row.shortcut_mask)
        assert shortcut.any() and feature.any() and not (feature & shortcut).any()
        if name in ("stamp", "shapes"):  # a local shortcut: a few per cent of the image
            assert 0.005 < shortcut.mean() < 0.08


@pytest.mark.parametrize("name", ["stamp", "stain", "ruler"])
def test_poison_confounds_train_and_val_and_leaves_test_alone(tmp_path, name):
    table = GENERATORS[name](tmp_path, n=600, seed=0, poison=0.9)
    classes, values = sorted(set(table["label"])), sorted(set(table["group"]))
    own = {
        "stamp": dict(zip(confounded.TEXTURES, confounded.GLYPHS)),
        "stain": dict(zip(confounded.NUCLEI, confounded.CASTS)),
        "ruler": dict(zip(confounded.BORDERS, confounded.RULERS)),
    }[name]
    aligned = table["group"] == table["label"].map(own)
    fitted = table["split"] != "test"
    assert abs(aligned[fitted].mean() - 0.9) < 0.05
    assert abs(aligned[~fitted].mean() - 1 / len(values)) < 0.12
    assert len(classes) == {"stamp": 3, "stain": 2, "ruler": 2}[name]


def test_the_stamp_shortcut_is_the_watermark_square_not_only_its_strokes(tmp_path):
    """The confounder is the glyph's shape: turning a ring into a cross changes pixels beside the ring's strokes,
    so the whole square a glyph is drawn in is the shortcut's region (and not the evidence's)."""
    table = GENERATORS["stamp"](tmp_path, n=30, seed=2)
    side = round(confounded.StampConfig().glyph * confounded.StampConfig().size)
    for row in table.itertuples():
        shortcut = _mask(tmp_path, row.shortcut_mask)
        rows, cols = np.nonzero(shortcut)
        assert np.ptp(rows) + 1 == np.ptp(cols) + 1 == side and shortcut.sum() == side * side
        assert not (_mask(tmp_path, row.feature_mask) & shortcut).any()


def test_the_stain_shortcut_is_a_colour_cast_of_the_whole_tile(tmp_path):
    table = GENERATORS["stain"](tmp_path, n=60, seed=0)
    tissue = {"warm": [], "cool": []}
    for row in table.itertuples():
        rgb = np.asarray(Image.open(tmp_path / row.path), float)
        background = _mask(tmp_path, row.shortcut_mask)
        tissue[row.group].append(rgb[background, 0].mean() - rgb[background, 2].mean())
    assert min(tissue["warm"]) > max(tissue["cool"])  # red against blue separates the two scanners


def test_the_ruler_is_present_or_absent_anywhere_along_the_edge(tmp_path):
    """The confounder is a ruler's presence: where there is one, its band (a few per cent of the image, bright with
    dark ticks) is the shortcut's region; where there is none, the edge band it could lie in. Rulers lie along all
    four edges, so no fixed place gives the shortcut away."""
    table = GENERATORS["ruler"](tmp_path, n=80, seed=0)
    edges = set()
    for row in table.itertuples():
        rgb = np.asarray(Image.open(tmp_path / row.path), float) / 255
        shortcut = _mask(tmp_path, row.shortcut_mask)
        if row.group == "ruler":
            assert 0.02 < shortcut.mean() < 0.08 and rgb[shortcut].std() > 0.2  # ticks on a light band
            rows, cols = np.nonzero(shortcut)
            edges.add("horizontal" if np.ptp(cols) > np.ptp(rows) else "vertical")
            edges.add(int(np.argmin([rows.min(), cols.min(), 63 - rows.max(), 63 - cols.max()])))
        else:
            assert shortcut[0].all() and shortcut[:, -1].all() and not shortcut[32, 32]
    assert edges == {"horizontal", "vertical", 0, 1, 2, 3}


@pytest.mark.parametrize("name", ["stamp", "stain", "ruler"])
def test_cfkd_data_writes_them(tmp_path, capsys, name):
    assert (
        cli.main(
            ["data", name, "--out", str(tmp_path / name), "--n", "30", "--poison", "0.9", "--size", "32"]
        )
        == 0
    )
    assert f"wrote 30 {name} images" in capsys.readouterr().out
    assert Image.open(tmp_path / name / pd.read_csv(tmp_path / name / "metadata.csv")["path"][0]).size == (
        32,
        32,
    )
    assert cli.main(["data", name, "--out", str(tmp_path / "x"), "--poison", "1.5"]) == 2
