import json
import os

import numpy as np
import pandas as pd
import torch

from pipeline import models, train
from pipeline.config import ClassifierConfig, SquareConfig
from pipeline.data import ImageDataset, load_folder, make_transform
from pipeline.square import generate


def test_tiny_classifier_learns_the_shortcut_and_round_trips(tmp_path):
    generate(tmp_path / "data", SquareConfig(n=200, size=32, poison=1.0, seed=0))
    data = load_folder(tmp_path / "data")
    config = ClassifierConfig(arch="small_cnn", epochs=3, batch_size=32, lr=3e-3)
    result = train.run(data, config, 32, tmp_path / "ckpt")

    # the artefacts: safetensors + card + Lightning CSV and TensorBoard logs
    card = json.loads((tmp_path / "ckpt" / "card.json").read_text())
    assert card["arch"] == "small_cnn" and card["classes"] == ["0", "1"] and card["image_size"] == [32, 32]
    assert card["channels"] == 3 and card["stem"] == "standard"  # small_cnn on colour data
    assert card["data_hash"] == data.fingerprint("train") and card["metrics"]["epochs"] == 3
    assert (tmp_path / "ckpt" / "model.safetensors").exists()
    logs = pd.read_csv(tmp_path / "ckpt" / "logs" / "metrics.csv")
    assert {"train_loss", "val_acc"} <= set(logs.columns)
    assert list((tmp_path / "ckpt" / "logs").glob("events.out.tfevents*"))

    # fully confounded Square: the background alone separates train/val, so the model learns it
    assert result.card.metrics["val_acc"] >= 0.9
    model, _ = models.load(tmp_path / "ckpt")
    test = ImageDataset(data, "test", data.classes, make_transform(32))
    probs = train.predict(model, test)
    assert probs.shape == (40, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
    x = torch.stack([test[i][0] for i in range(4)])
    # predict ran on the GPU where there is one (TF32 convolutions: 3e-5 seen on an H200)
    with torch.no_grad():
        assert np.allclose(torch.softmax(model(x), -1).numpy(), probs[:4], atol=1e-4)


def test_balanced_sampler_draws_classes_evenly(tmp_path):
    generate(tmp_path / "data", SquareConfig(n=60, size=32, seed=0))
    data = load_folder(tmp_path / "data")
    dataset = ImageDataset(data, "train", data.classes, make_transform(32))
    dataset.targets = [0] * 30 + [1] * 6  # an imbalanced view of the same images
    dataset.rows = dataset.rows.head(36)
    torch.manual_seed(0)
    loader = train._loader(dataset, 36, True, balanced=True)
    drawn = [int(y) for _ in range(20) for _, ys, _ in loader for y in ys]
    assert 0.4 < np.mean(drawn) < 0.6


def test_every_trainer_asks_for_deterministic_kernels(monkeypatch):
    # a GPU adds in a varying order unless told not to: same seed, same counterfactuals and weights there too
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")
    torch.use_deterministic_algorithms(False)  # as a process starts
    try:
        train.make_trainer(accelerator="cpu")
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # cuBLAS's fixed-order workspace
    finally:
        torch.use_deterministic_algorithms(True)
