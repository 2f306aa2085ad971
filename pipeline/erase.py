"""The erase: CFKD's spurious verdicts generalised beyond the images they were given on.

The principal directions of what the spurious edits changed in the features the head reads
(f(counterfactual) - f(original)) are projected out of the head, which is refitted on the training images'
projected features. No logit can read those directions any more, on any image: a shortcut the edits moved is
removed as a feature, not memorised edit by edit. What the edits judged true moved (the real evidence) is spared.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from pipeline import models
from pipeline.config import DistilConfig
from pipeline.data import Counterfactuals, FolderData, ImageDataset
from pipeline.dfr import as_head, features


def edited_and_original(
    model: nn.Module, card, table: pd.DataFrame, folder: Path
) -> tuple[np.ndarray, np.ndarray]:
    """The features the classifier's head reads, of each row's counterfactual and of its original."""
    transform = models.input_transform(card)
    edited = features(model, Counterfactuals(table, folder, card.classes, transform))
    originals = table.assign(counterfactual=table["original"])
    return edited, features(model, Counterfactuals(originals, folder, card.classes, transform))


def feature_change(model: nn.Module, card, table: pd.DataFrame, folder: Path) -> np.ndarray:
    """f(counterfactual) - f(original) per row of ``table``, f being the features the classifier's head reads."""
    edited, original = edited_and_original(model, card, table, folder)
    return edited - original


def principal(
    change: np.ndarray, table: pd.DataFrame, k: int | dict[int, int], clip: bool = False
) -> np.ndarray:
    """The k principal directions of each round's changes, stacked (rows without a round count as one round; a
    dict gives each round its own k); with ``clip``, of the changes shortened to the round's median length."""
    rounds = table["round"].to_numpy() if "round" in table else np.zeros(len(table))
    parts = {r: change[rounds == r] for r in np.unique(rounds)}
    directions = [
        np.linalg.svd(clipped(rows) if clip else rows, full_matrices=False)[2][: rank_of(k, r)]
        for r, rows in parts.items()
    ]
    return np.concatenate(directions) if directions else np.zeros((0, change.shape[1]))


def rank_of(k: int | dict[int, int], round: int) -> int:
    """The directions erased of round ``round``'s edits: ``k`` itself, or its entry for that round (else 1)."""
    return k.get(int(round), 1) if isinstance(k, dict) else k


def clipped(rows: np.ndarray) -> np.ndarray:
    """``rows`` longer than their median length shortened to it, directions kept."""
    length = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows * np.minimum(1.0, np.median(length) / np.maximum(length, 1e-12))


def orthonormal(rows: np.ndarray) -> np.ndarray:
    """An orthonormal basis (as rows) of the span of ``rows``."""
    if len(rows) == 0:
        return rows
    basis, strength, _ = np.linalg.svd(rows.T, full_matrices=False)
    return basis[:, strength > 1e-6 * strength.max()].T


HOLD = 0.9  # erase: hold adds directions until this share of the spurious edits keeps its source label
# erase: verdicts passes over a rank at which the true edits lose more than a third of their reach
KEEP = 2 / 3


def per_round(config: DistilConfig, classes: int) -> int:
    """Principal directions erased per round: ``distil.erase``, or with auto one fewer than the classes (a shortcut
    that tells K classes apart, a tag of K colours, spans K - 1 directions of the features), or with hold and
    verdicts at least one (``holding_directions`` adds more; with verdicts only in a round that fine-tunes
    nothing); none after a fine-tune when ``erase_finetuned`` is off."""
    if config.layers != "none" and not config.erase_finetuned:
        return 0
    return {"auto": max(classes - 1, 1), "hold": 1, "verdicts": 1}.get(config.erase, config.erase)


def spurious_directions(
    model: nn.Module,
    card,
    table: pd.DataFrame,
    folder: Path,
    k: int | dict[int, int],
    evidence: pd.DataFrame | None = None,
    vote: bool = False,
    clip: bool = False,
    whole: tuple[int, ...] = (),
) -> np.ndarray:
    """Orthonormal directions (n, d) of what the spurious counterfactuals of ``table`` changed in the head's
    features: the k principal ones of each round's edits, so each round adds what the classifier it explained
    still used. With ``evidence`` (counterfactuals judged true) each direction loses its part in the subspace of
    what the true edits changed, and one that lay mostly there (less than half left) is not erased at all, unless
    ``vote`` and the spurious edits move along it more than the true ones (then it is erased whole). ``clip``:
    the principal directions are those of the spurious changes shortened to their median length. The rounds
    ``whole`` are erased whole, not spared: their rank search already kept their true edits reaching the target."""
    spurious = table[table["verdict"] == "spurious"]
    change = feature_change(model, card, spurious, folder)
    rounds = spurious["round"] if "round" in spurious else pd.Series(0, index=spurious.index)
    searched = rounds.isin(whole).to_numpy()
    top = principal(change[~searched], spurious[~searched], k, clip)
    if evidence is not None and not evidence.empty:
        true_change = feature_change(model, card, evidence, folder)
        real = evidence_directions(true_change)
        spared = without(top, real)
        kept = np.linalg.norm(spared, axis=1) >= 0.5
        outvoted = vote & (((change @ top.T) ** 2).sum(0) > ((true_change @ top.T) ** 2).sum(0))
        top = np.concatenate([spared[kept], top[~kept & outvoted]])
    return orthonormal(np.concatenate([top, principal(change[searched], spurious[searched], k, clip)]))


def evidence_directions(change: np.ndarray, energy: float = 0.9) -> np.ndarray:
    """The principal directions holding ``energy`` of what the true edits changed: the real evidence's subspace."""
    _, strength, vt = np.linalg.svd(change, full_matrices=False)
    share = np.cumsum(strength**2) / max(float(np.sum(strength**2)), 1e-12)
    return vt[: int(np.searchsorted(share, energy)) + 1]


def training_features(model: nn.Module, card, data: FolderData) -> tuple[np.ndarray, np.ndarray]:
    train = ImageDataset(data, "train", card.classes, models.input_transform(card))
    return features(model, train), np.asarray(train.targets)


def refit(x: np.ndarray, y: np.ndarray, directions: np.ndarray, seed: int = 0) -> LogisticRegression:
    """Class-balanced logistic regression on features with ``directions`` projected out."""
    return LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced", random_state=seed).fit(
        without(x, directions), y
    )


def holding_directions(
    model: nn.Module,
    card,
    data: FolderData,
    table: pd.DataFrame,
    folder: Path,
    directions_for,
    hold: float = HOLD,
    seed: int = 0,
    true_edits: pd.DataFrame | None = None,
    keep: float = KEEP,
) -> tuple[np.ndarray, int]:
    """``directions_for(k)`` for the smallest k per round whose refitted head keeps the source label on ``hold`` of
    the spurious counterfactuals (the verdicts hold on the very edits they were given on), at most the k that
    holds 99 % of what those edits changed: a direction they hardly moved is no part of the shortcut, and with no
    such k, the cap. With ``true_edits`` (counterfactuals judged true) the verdicts hold both ways: a k is passed
    over where fewer of those reach their target than ``keep`` x the share they reach with one direction (the
    extra directions are the evidence's), and with no k that holds both, one direction. Returns the directions and
    the k they were taken with."""
    spurious = table[table["verdict"] == "spurious"]
    x, y = training_features(model, card, data)
    x_edited, x_original = edited_and_original(model, card, spurious, folder)
    source = class_indices(spurious, card)
    guard = true_edits is not None and not true_edits.empty
    if guard:
        transform = models.input_transform(card)
        x_true = features(model, Counterfactuals(true_edits, folder, card.classes, transform))
        target, reached_with_one = class_indices(true_edits, card), None
    for k in range(1, most_directions(x_edited - x_original) + 1):
        directions = directions_for(k)
        if not len(directions):
            continue
        head = refit(x, y, directions, seed)
        held = (head.predict(without(x_edited, directions)) == source).mean() >= hold
        if guard:
            reached = (head.predict(without(x_true, directions)) == target).mean()
            reached_with_one = reached if reached_with_one is None else reached_with_one
        if held and (not guard or reached >= keep * reached_with_one):
            return directions, k
    return (directions_for(1), 1) if guard else (directions, k)


def searched_ranks(run_dir: Path, rounds: list[int]) -> dict[int, int]:
    """{round: the rank its own erase searched} of those of ``rounds`` whose distil card records one."""
    cards = {r: run_dir / f"distil_r{r}" for r in rounds}
    metrics = {r: models.load_card(card).metrics for r, card in cards.items() if card.is_dir()}
    return {r: int(m["erased_rank"]) for r, m in metrics.items() if "erased_rank" in m}


def class_indices(table: pd.DataFrame, card) -> np.ndarray:
    """Each row's training label as a class index: the source class of a spurious edit, the target of a true one."""
    return np.array([card.classes.index(str(label)) for label in table["label"]])


def without(x: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """``x`` with the orthonormal ``directions`` (rows) projected out."""
    return x - (x @ directions.T) @ directions


def most_directions(change: np.ndarray, energy: float = 0.99) -> int:
    """The number of principal directions holding ``energy`` of the changes: more would erase what they hardly
    moved."""
    strength = np.linalg.svd(change, compute_uv=False) ** 2
    return int(np.searchsorted(np.cumsum(strength) / max(strength.sum(), 1e-12), energy)) + 1


def project_out(model: nn.Module, card, data: FolderData, directions: np.ndarray, seed: int = 0) -> None:
    """Project ``directions`` out of the head and refit it, in place: class-balanced logistic regression on the
    training images' projected features, folded back as W (I - V^T V) so the architecture stays as it was."""
    fit = refit(*training_features(model, card, data), directions, seed)
    weight, bias = as_head(fit.coef_, fit.intercept_)
    projection = torch.eye(directions.shape[1]) - torch.from_numpy(directions.T @ directions).float()
    head = model.get_submodule(models.last_linear(model))
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight).float().to(head.weight) @ projection.to(head.weight))
        head.bias.copy_(torch.from_numpy(bias).float().to(head.bias))
