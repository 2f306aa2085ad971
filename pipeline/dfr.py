"""DFR-style baseline (Deep Feature Reweighting, Kirichenko et al. 2023): keep the classifier's features and
retrain only its last layer, by L1-regularised logistic regression on group-balanced validation data, averaged
over random balanced subsets, the regularisation chosen by worst-group accuracy on half of that data.

It needs group labels (here: label x background) for the validation images, which CFKD never sees. A fully
confounded validation split has no minority groups at all; then the baseline takes the validation split of the
reference (unbiased) data instead, and says so.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import DataLoader

from pipeline import models
from pipeline.config import BaselineConfig
from pipeline.data import FolderData, ImageDataset
from pipeline.evaluate import group_names
from pipeline.models import last_linear
from pipeline.train import make_trainer


class NoGroups(Exception):
    """No validation data with every label x group cell: the baseline cannot be fitted."""


C_GRID = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)  # inverse L1 strengths DFR searches


class Features(L.LightningModule):
    """The classifier with its last linear layer replaced by the identity: predict_step gives its input."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.body = copy.deepcopy(model)
        parent, _, leaf = last_linear(model).rpartition(".")
        setattr(self.body.get_submodule(parent) if parent else self.body, leaf, nn.Identity())

    def predict_step(self, batch, batch_idx):
        return self.body(batch[0]).flatten(1)


def features(model: nn.Module, dataset: ImageDataset) -> np.ndarray:
    trainer = make_trainer(devices=1)
    batches = trainer.predict(Features(model.eval()), DataLoader(dataset, batch_size=256))
    return torch.cat(batches).float().numpy()


def has_all_groups(data: FolderData, split: str) -> bool:
    """Whether every label x group cell of the dataset also occurs in this split."""
    rows = data.split(split)
    return len(rows) > 0 and set(group_names(rows)) >= set(group_names(data.table))


def balanced_subset(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices with as many images of each group as the smallest group has."""
    names, counts = np.unique(groups, return_counts=True)
    return np.concatenate(
        [rng.choice(np.flatnonzero(groups == g), counts.min(), replace=False) for g in names]
    )


def fit_head(x: np.ndarray, y: np.ndarray, groups: np.ndarray, c: float, subsets: int, seed: int):
    """Averaged (coef, intercept) of logistic regressions on balanced subsets, on standardised features."""
    rng = np.random.default_rng(seed)
    coefs, intercepts = [], []
    for _ in range(subsets):
        idx = balanced_subset(groups, rng)
        head = LogisticRegression(
            l1_ratio=1.0, C=c, solver="liblinear" if len(set(y)) == 2 else "saga", max_iter=1000
        )
        head.fit(x[idx], y[idx])
        coefs.append(head.coef_)
        intercepts.append(head.intercept_)
    return np.mean(coefs, 0), np.mean(intercepts, 0)


def as_head(coef: np.ndarray, intercept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(weight, bias) of a linear layer with one output per class (binary regression: -s/2, +s/2)."""
    if coef.shape[0] == 1:
        return np.concatenate([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
    return coef, intercept


def worst_group(pred: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    return min(float((pred[groups == g] == y[groups == g]).mean()) for g in np.unique(groups))


def choose_c(x, y, groups, subsets: int, seed: int) -> float:
    """DFR's tuning: fit on one half of the balanced data, score worst-group accuracy on the other."""
    half = np.random.default_rng(seed).permutation(len(y)) < len(y) // 2
    scores = {}
    for c in C_GRID:
        coef, intercept = fit_head(x[half], y[half], groups[half], c, subsets, seed)
        weight, bias = as_head(coef, intercept)
        pred = (x[~half] @ weight.T + bias).argmax(1)
        scores[c] = worst_group(pred, y[~half], groups[~half])
    return max(scores, key=scores.get)


def run(
    checkpoint: Path, data: FolderData, reference_data: FolderData | None, config: BaselineConfig, out: Path
) -> dict:
    """Retrain the head of the classifier at ``checkpoint``; write the checkpoint and what it used to ``out``."""
    source, source_name = data, "val split of the run's data"
    if not has_all_groups(data, "val"):
        if reference_data is None or not has_all_groups(reference_data, "val"):
            raise NoGroups("no validation data with every label x group cell (DFR needs group labels)")
        source, source_name = reference_data, "val split of the reference (unbiased) data"
    model, card = models.load(checkpoint)
    dataset = ImageDataset(source, "val", card.classes, models.input_transform(card))
    x = features(model, dataset)
    y, groups = np.asarray(dataset.targets), group_names(dataset.rows).to_numpy()
    scaler = StandardScaler().fit(x)
    xs = scaler.transform(x)
    c = choose_c(xs, y, groups, config.subsets, seed=0)
    coef, intercept = fit_head(xs, y, groups, c, config.subsets, seed=1)
    # fold the standardisation into the layer: ((x - m) / s) @ c + b = x @ (c / s) + (b - c @ (m / s))
    weight, bias = as_head(coef / scaler.scale_, intercept - coef @ (scaler.mean_ / scaler.scale_))
    head = model.get_submodule(last_linear(model))
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight).float())
        head.bias.copy_(torch.from_numpy(bias).float())
    info = {"source": source_name, "images": len(y), "groups": int(len(set(groups))), "C": c}
    models.save(model, replace(card, metrics=info, source=f"dfr:{checkpoint.name}"), out)
    return info
