"""Evaluate a classifier on one split: accuracy, per-class, per-group (label x group) and worst-group accuracy,
confusion matrix; written as metrics.json, predictions.csv and a PNG plot."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, accuracy_score, confusion_matrix  # noqa: E402
from torch import nn  # noqa: E402

from pipeline import models  # noqa: E402
from pipeline.data import FolderData, ImageDataset  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.rundir import write_json  # noqa: E402
from pipeline.train import predict  # noqa: E402


def group_names(table: pd.DataFrame) -> pd.Series:
    """Group = label x group attribute (label alone when the dataset has no group column)."""
    label = "label=" + table["label"].astype(str)
    has_group = table["group"].astype(str).str.len() > 0
    return label.where(~has_group, label + "|group=" + table["group"].astype(str))


def metrics_from_predictions(table: pd.DataFrame, classes: list[str]) -> dict:
    """table: one row per image with columns label, group, pred (class index)."""
    target = table["label"].map(classes.index).to_numpy()
    pred = table["pred"].to_numpy()
    correct = pd.Series(target == pred, index=table.index)
    groups = group_names(table)
    per_group = {g: {"n": int(c.size), "accuracy": float(c.mean())} for g, c in correct.groupby(groups)}
    worst = min(per_group, key=lambda g: per_group[g]["accuracy"])
    return {
        "n": int(len(table)),
        "accuracy": float(accuracy_score(target, pred)),
        "per_class": {
            cls: float(correct[target == i].mean()) for i, cls in enumerate(classes) if (target == i).any()
        },
        "per_group": per_group,
        "worst_group": worst,
        "worst_group_accuracy": per_group[worst]["accuracy"],
        "classes": classes,
        "confusion_matrix": confusion_matrix(target, pred, labels=range(len(classes))).tolist(),
    }


def evaluate(
    model: nn.Module, card: models.ModelCard, data: FolderData, split: str = "test"
) -> tuple[dict, pd.DataFrame]:
    if data.split(split).empty:
        raise UserError(f"dataset {data.root} has no '{split}' images to evaluate on")
    dataset = ImageDataset(data, split, card.classes, models.input_transform(card))
    probs = predict(model, dataset)
    table = dataset.rows[["path", "label", "split", "group"]].assign(
        pred=probs.argmax(1), confidence=probs.max(1)
    )
    for i, cls in enumerate(card.classes):
        table[f"p_{cls}"] = probs[:, i]
    return metrics_from_predictions(table, card.classes), table


def plot(metrics: dict, title: str, path: Path) -> None:
    """Confusion matrix and per-group accuracy side by side."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), gridspec_kw={"width_ratios": [1, 1.4]})
    ConfusionMatrixDisplay(np.array(metrics["confusion_matrix"]), display_labels=metrics["classes"]).plot(
        ax=left, colorbar=False, cmap="Blues"
    )
    left.set_title("confusion matrix")
    names = list(metrics["per_group"])
    values = [metrics["per_group"][g]["accuracy"] for g in names]
    right.barh(names, values, color=["tab:red" if v < 0.5 else "tab:blue" for v in values])
    right.set_xlim(0, 1)
    right.set_xlabel("accuracy")
    right.set_title(f"per group (worst {metrics['worst_group_accuracy']:.2f})")
    fig.suptitle(f"{title}: accuracy {metrics['accuracy']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(
    checkpoint: Path, data: FolderData, out: Path, split: str = "test", title: str = "classifier"
) -> dict:
    model, card = models.load(checkpoint)
    metrics, table = evaluate(model, card, data, split)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    table.to_csv(out / "predictions.csv", index=False)
    plot(metrics, title, out / "evaluation.png")
    return metrics
