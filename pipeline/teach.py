"""Simulated teachers: label counterfactuals automatically, writing to the same feedback store as experts.

- mask oracle: the change weighted by the centred feature mask (positive on the true feature, negative
  elsewhere); a positive mean means the edit sits on the real evidence -> true, else spurious.
- model oracle: the unbiased reference classifier; it flips too -> true, else spurious; it abstains where it
  gets the original image wrong itself.
Only counterfactuals that flipped the classifier get a verdict. Each oracle reduces an edit to a score whose
boundary is 1 (the feature's change per pixel against the image's; the reference's odds of the target class
against the strongest other class); with ``band`` > 1 it says unsure between 1 / band and band, as an expert does
before an edit that moves square and background alike (band 1: the authors' oracles exactly). An optional noise
rate flips verdicts at random to simulate imperfect experts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from pipeline import manifest, models
from pipeline.data import load_mask, read_rgb
from pipeline.errors import UserError
from pipeline.store import FeedbackStore

TEACHERS = ("mask", "model")


def _image(path: Path, transform) -> torch.Tensor:
    with Image.open(path) as image:
        return transform(image)


def banded(score: float, band: float) -> str:
    """true above band, spurious at or below 1 / band, unsure between."""
    return "true" if score > band else "spurious" if score <= 1 / band else "unsure"


def mask_verdicts(
    table: pd.DataFrame, explain_dir: Path, data_root: Path, band: float = 1.0, resize: str = "pad"
) -> pd.Series:
    masks = feature_masks(data_root)
    verdicts = {}
    for row in table.itertuples():
        if not masks.get(row.source_path):
            continue  # no feature mask for this image: the oracle abstains
        cf, original = (read_rgb(explain_dir / p, float) for p in (row.counterfactual, row.original))
        delta = np.abs(cf - original).sum(-1)
        # the mask fitted like its image was (same size, same resize policy)
        mask = load_mask(data_root / masks[row.source_path], list(delta.shape), resize).astype(float)
        # change per pixel on the feature / per pixel overall: > 1 <=> the centred-mask mean is positive
        density = (delta * mask).mean() / max(delta.mean() * mask.mean(), 1e-12)
        verdicts[row.id] = banded(density, band)
    return pd.Series(verdicts, dtype=object)


@torch.no_grad()
def model_verdicts(table: pd.DataFrame, explain_dir: Path, reference: Path, band: float = 1.0) -> pd.Series:
    model, card = models.load(reference)
    model, transform = models.OnPixels(model, card), models.pixel_transform(card)
    verdicts = {}
    for row in table.itertuples():
        x = _image(explain_dir / row.original, transform)[None]
        x_cf = _image(explain_dir / row.counterfactual, transform)[None]
        if card.classes[int(model(x).argmax())] != row.source_class:
            continue  # the oracle gets the original wrong: it abstains
        p = torch.softmax(model(x_cf), -1)[0]
        target = card.classes.index(row.target_class)
        # odds of the target against the strongest other class: > 1 <=> the reference flips too
        verdicts[row.id] = banded(float(p[target] / torch.cat([p[:target], p[target + 1 :]]).max()), band)
    return pd.Series(verdicts, dtype=object)


def feature_masks(data_root: Path) -> dict[str, str]:
    """Image path -> feature-mask path, for the images that have one."""
    table = pd.read_csv(Path(data_root) / "metadata.csv", dtype=str, keep_default_na=False)
    if "feature_mask" not in table:
        return {}
    return {p.strip(): m.strip() for p, m in zip(table["path"], table["feature_mask"]) if m.strip()}


def run(
    run_dir: Path,
    teacher: str,
    data_root: Path,
    reference: Path | None = None,
    noise: float = 0.0,
    round: int = 1,
    seed: int = 0,
    band: float = 1.0,
    resize: str = "pad",
) -> dict:
    """Label every successful counterfactual of the round's explain folder and write the verdicts to the store."""
    if teacher not in TEACHERS:
        raise UserError(f"unknown teacher '{teacher}' (choose {', '.join(TEACHERS)})")
    explain_dir = run_dir / manifest.folder(round)
    everything = manifest.read(explain_dir)
    table = manifest.flipped(everything)
    if teacher == "mask":
        verdicts = mask_verdicts(table, explain_dir, data_root, band, resize)
    else:
        if reference is None or not (reference / "card.json").exists():
            raise UserError(
                "the model oracle needs the reference classifier (reference stage or --reference)"
            )
        verdicts = model_verdicts(table, explain_dir, reference, band)
    if noise > 0:
        flip = np.random.default_rng(seed).random(len(verdicts)) < noise
        # an imperfect expert swaps true and spurious; an unsure verdict stays unsure
        verdicts[flip] = verdicts[flip].replace({"true": "spurious", "spurious": "true"})
    annotator = f"teacher:{teacher}"
    store = FeedbackStore(run_dir / "feedback.sqlite")
    # a rerun gives the same verdicts: only a verdict that differs from the teacher's current one is appended
    current = store.labels(round)
    current = current[current["annotator"] == annotator].set_index("cf_id")["label"]
    store.add_many(
        {"cf_id": cf_id, "annotator": annotator, "label": label, "round": round}
        for cf_id, label in verdicts.items()
        if current.get(cf_id) != label
    )
    counts = verdicts.value_counts().to_dict()
    return {
        "annotator": annotator,
        "labelled": int(len(verdicts)),
        "not_flipped": int(len(everything) - len(table)),
        "abstained": int(len(table) - len(verdicts)),
        **counts,
    }
