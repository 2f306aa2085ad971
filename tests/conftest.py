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
    }
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        raw.setdefault(section, {})[field] = value
    return config.from_dict(raw)


@pytest.fixture(scope="session")
def square_dir(tmp_path_factory):
    """A small poisoned Square dataset (read-only: copy it before changing it)."""
    out = tmp_path_factory.mktemp("square")
    square.generate(out, config.SquareConfig(n=100, size=32, poison=1.0, seed=3))
    return out
