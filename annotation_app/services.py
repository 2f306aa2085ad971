"""Everything the annotation app knows, as plain functions (no Streamlit): rounds, the manifest with safe paths,
the labelling queue, clusters of difference maps and agreement between annotators."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.cluster import KMeans
from sklearn.metrics import cohen_kappa_score

from pipeline import manifest as manifest_files
from pipeline.errors import UserError
from pipeline.store import LABELS

REQUIRED = ("id", "original", "counterfactual", "difference", "source_class", "target_class", "attempt")


class AppError(Exception):
    """A problem the app shows as a message (empty round, corrupt manifest, missing images)."""


def rounds(run_dir: Path) -> dict[int, Path]:
    """Explain folders by round: explain/ is round 1, explain_r<N>/ round N."""
    return manifest_files.rounds(run_dir)


def safe_path(run_dir: Path, folder: Path, rel: str) -> Path | None:
    """The file for a manifest path, only if it resolves inside the run directory."""
    path = (folder / str(rel)).resolve()
    return path if path.is_relative_to(Path(run_dir).resolve()) else None


@dataclass
class Round:
    number: int
    folder: Path
    manifest: pd.DataFrame  # successful counterfactuals, paths resolved; one row per counterfactual
    refused: int  # rows whose paths resolve outside the run directory
    missing: int  # rows whose image files are missing
    not_flipped: int = 0  # counterfactuals that did not reach their target: never shown, never judged


def load_round(run_dir: Path, number: int) -> Round:
    folder = rounds(run_dir).get(number)
    if folder is None or not (folder / "manifest.csv").exists():
        raise AppError(f"round {number} has no counterfactuals yet (no manifest.csv in {run_dir})")
    try:
        manifest = manifest_files.read(folder / manifest_files.NAME)
    except (UserError, ValueError) as exc:
        raise AppError(f"the manifest of round {number} is corrupt: {str(exc).splitlines()[0]}") from None
    absent = [c for c in REQUIRED if c not in manifest.columns]
    if absent:
        raise AppError(f"the manifest of round {number} is corrupt: missing column(s) {', '.join(absent)}")
    total = len(manifest)
    if "success" in manifest:
        manifest = manifest[manifest["success"]]
    not_flipped = total - len(manifest)
    if manifest.empty:
        raise AppError(f"round {number} is empty: no counterfactual flipped the classifier")
    refused = missing = 0
    keep = []
    for row in manifest.to_dict("records"):
        paths = [safe_path(run_dir, folder, row[c]) for c in ("original", "counterfactual", "difference")]
        if any(p is None for p in paths):
            refused += 1
        elif not all(p.is_file() for p in paths):
            missing += 1
        else:
            row["original"], row["counterfactual"], row["difference"] = paths
            keep.append(row)
    if not keep:
        raise AppError(
            f"round {number}: none of {len(manifest)} counterfactuals can be shown "
            f"({refused} outside the run directory, {missing} with missing images)"
        )
    return Round(number, folder, pd.DataFrame(keep).reset_index(drop=True), refused, missing, not_flipped)


def image_problem(path: Path) -> str | None:
    """Why an image file cannot be shown (not an image, truncated, a decompression bomb), or None."""
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return f"{Path(path).name} cannot be shown: not a readable image ({type(exc).__name__})"
    return None


def round_counts(rnd: Round, labels: pd.DataFrame) -> dict[str, int]:
    """The round as the metrics count it: consensus-free counts of every annotator's current verdicts on the
    shown cards, the cards nobody has judged yet, and the counterfactuals that did not flip."""
    shown = labels[labels["cf_id"].isin(rnd.manifest["id"])]
    counts = {label: int((shown["label"] == label).sum()) for label in LABELS}
    return {
        **counts,
        "not judged yet": int((~rnd.manifest["id"].isin(shown["cf_id"])).sum()),
        "not flipped": rnd.not_flipped,
    }


def queue(
    manifest: pd.DataFrame,
    labels: pd.DataFrame,
    annotator: str,
    unlabelled_only: bool = False,
    pair: str | None = None,
    attempt: int | None = None,
    disagreement: bool = False,
) -> list[str]:
    """Counterfactual ids to show, in manifest order, after the filters."""
    rows = manifest
    if pair:
        rows = rows[(rows["source_class"] + " -> " + rows["target_class"]) == pair]
    if attempt:
        rows = rows[rows["attempt"] == attempt]
    if unlabelled_only:
        mine = set(labels.loc[labels["annotator"] == annotator, "cf_id"])
        rows = rows[~rows["id"].isin(mine)]
    if disagreement:
        spread = labels.groupby("cf_id")["label"].nunique()
        rows = rows[rows["id"].isin(spread[spread > 1].index)]
    return rows["id"].tolist()


def clusters(manifest: pd.DataFrame, k: int, seed: int = 0, side: int = 16) -> pd.Series:
    """Cluster index per counterfactual id, from KMeans on downsampled signed difference maps."""
    features = []
    for path in manifest["difference"]:
        try:
            with Image.open(path) as image:
                small = image.convert("RGB").resize((side, side), Image.BILINEAR)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):  # shown as such on its card
            small = Image.new("RGB", (side, side), (255, 255, 255))
        features.append(np.asarray(small, float).ravel() / 255)
    k = max(1, min(k, len(features)))
    assignment = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(np.stack(features))
    return pd.Series(assignment, index=manifest["id"].tolist())


def fleiss_kappa(labels: pd.DataFrame) -> float | None:
    """Fleiss' kappa over counterfactuals rated by the most common number of annotators (at least 2)."""
    counts = labels.pivot_table(
        index="cf_id", columns="label", values="annotator", aggfunc="count", fill_value=0
    )
    counts = counts.reindex(columns=list(LABELS), fill_value=0)
    raters = counts.sum(1)
    if raters.max() < 2:
        return None
    n = int(raters[raters >= 2].mode().iloc[0])
    table = counts[raters == n].to_numpy(float)
    p_item = ((table**2).sum(1) - n) / (n * (n - 1))
    p_label = table.sum(0) / table.sum()
    expected = (p_label**2).sum()
    return float((p_item.mean() - expected) / (1 - expected)) if expected < 1 else 1.0


def agreement(labels: pd.DataFrame) -> dict:
    """Cohen's kappa per annotator pair (shared counterfactuals), Fleiss' kappa, counts per label."""
    wide = labels.pivot_table(index="cf_id", columns="annotator", values="label", aggfunc="last")
    pairs = []
    for a, b in itertools.combinations(wide.columns, 2):
        both = wide[[a, b]].dropna()
        if len(both) >= 2:
            kappa = cohen_kappa_score(both[a], both[b], labels=list(LABELS))
            pairs.append(
                {
                    "annotator 1": a,
                    "annotator 2": b,
                    "shared": len(both),
                    "cohen_kappa": float(np.nan_to_num(kappa, nan=1.0)),
                }
            )
    counts = (
        labels.groupby(["annotator", "label"])
        .size()
        .unstack(fill_value=0)
        .reindex(columns=list(LABELS), fill_value=0)
    )
    return {"pairs": pd.DataFrame(pairs), "fleiss_kappa": fleiss_kappa(labels), "counts": counts}
