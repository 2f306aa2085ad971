"""Shared fixtures: tiny Square datasets and configs, so every test runs real data through real code in seconds."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from pipeline import config, quiet, square  # noqa: E402

quiet.configure(verbose=False)


def tiny_config(**overrides) -> config.RunConfig:
    raw = {
        "name": "tiny",
        "data": {"square": {"n": 120, "size": 32, "poison": 1.0}, "image_size": 32},
        "classifier": {"arch": "small_cnn", "epochs": 1, "batch_size": 32},
        "explain": {"enabled": False},
    }
    for key, value in overrides.items():  # "section.field" or "section.sub.field"
        *path, field = key.split(".")
        node = raw
        for part in path:
            node = node.setdefault(part, {})
        node[field] = value
    return config.from_dict(raw)


@pytest.fixture(scope="session")
def square_dir(tmp_path_factory):
    """A small poisoned Square dataset (read-only: copy it before changing it)."""
    out = tmp_path_factory.mktemp("square")
    square.generate(out, config.SquareConfig(n=100, size=32, poison=1.0, seed=3))
    return out


@pytest.fixture(scope="session")
def tiny_codec(tmp_path_factory):
    """A small diffusers AutoencoderTiny, briefly trained on the procedural corpus, saved with save_pretrained."""
    from pipeline.codec import CodecConfig, train

    out = tmp_path_factory.mktemp("codec")
    train(
        out,
        CodecConfig(
            channels=(8, 8), corpus_size=320, size=32, batch_size=16, max_steps=100, lr=3e-3, max_minutes=2
        ),
    )
    return out


@pytest.fixture(scope="session")
def tiny_biased(tmp_path_factory):
    """A small_cnn trained on a fully confounded 32 px Square: (checkpoint dir, FolderData)."""
    from pipeline.config import ClassifierConfig
    from pipeline.data import load_folder
    from pipeline.train import run

    root = tmp_path_factory.mktemp("biased")
    square.generate(root / "data", config.SquareConfig(n=200, size=32, poison=1.0, seed=4))
    data = load_folder(root / "data")
    run(data, ClassifierConfig(arch="small_cnn", epochs=3, batch_size=32, lr=3e-3), 32, root / "ckpt")
    return root / "ckpt", data
