"""Everything the annotation app knows, as plain functions (no Streamlit): rounds, the manifest with safe paths,
the labelling queue, clusters of similar changes with the cluster-first review order, and agreement between
annotators."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import cohen_kappa_score, silhouette_score

from pipeline import manifest as manifest_files
from pipeline.errors import UserError
from pipeline.store import CLUSTER_COMMENT, LABELS, current

REQUIRED = ("id", "original", "counterfactual", "difference", "source_class", "target_class", "attempt")
PARTIAL = 0.5  # feedback.partial of a run without a readable config: the pipeline's default (tested equal)


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
    manifest: pd.DataFrame  # the counterfactuals to judge (manifest.judged), paths resolved; one row each
    refused: int  # rows whose paths resolve outside the run directory
    missing: int  # rows whose image files are missing
    not_flipped: int = 0  # counterfactuals short of their target (and of feedback.partial): never shown


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
    if "success" in manifest:  # the cards a verdict is for: flips, and near-flips with feedback.partial < 1
        manifest = manifest_files.judged(manifest, feedback_setting(run_dir, "partial", PARTIAL))
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


def among(values: pd.Series, ids) -> np.ndarray:
    """values.isin(ids) for unique ids, by a hash lookup: Series.isin on Arrow strings converts every id one by
    one, which costs a tenth of a second per call at 10,000 cards."""
    return pd.Index(ids).get_indexer(values) >= 0


def round_counts(rnd: Round, labels: pd.DataFrame) -> dict[str, int]:
    """The round as the metrics count it: consensus-free counts of every annotator's current verdicts on the
    shown cards, the cards nobody has judged yet, and the counterfactuals that did not flip."""
    shown = labels[among(labels["cf_id"], rnd.manifest["id"])]
    counts = {label: int((shown["label"] == label).sum()) for label in LABELS}
    return {
        **counts,
        "not judged yet": int((~among(rnd.manifest["id"], shown["cf_id"].unique())).sum()),
        "not flipped": rnd.not_flipped,
    }


def current_labels(store, round: int, memo: dict) -> pd.DataFrame:
    """The round's current labels (``FeedbackStore.labels``), reading only the events appended since the last
    call; ``memo`` keeps the events read so far (one per session and round)."""
    new = store.events_since(memo.get("seq", 0), round)
    if not new.empty or "labels" not in memo:
        events = (
            new if memo.get("events") is None or memo["events"].empty else pd.concat([memo["events"], new])
        )
        memo["events"] = events.sort_values(["created_at", "event_id"], kind="stable")
        memo["seq"] = int(events["seq"].max()) if len(events) else 0
        memo["labels"] = current(memo["events"])
    return memo["labels"]


def feedback_setting(run_dir: Path, key: str, default: float) -> float:
    """One number of the run's feedback settings (``default`` when the run has no readable config). Read as YAML,
    so the app never imports the pipeline's torch modules."""
    try:
        config = yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}
        return float((config.get("feedback") or {}).get(key, default))
    except (OSError, yaml.YAMLError, TypeError, ValueError, AttributeError):
        return default


def min_labels(run_dir: Path) -> int:
    """The run's feedback.min_labels: the verdicts a round needs before ``cfkd run`` continues."""
    return max(1, int(feedback_setting(run_dir, "min_labels", 1)))


def header(rnd: Round, labels: pd.DataFrame, consensus: pd.DataFrame, annotator: str, needed: int) -> dict:
    """The round as the expert sees it: cards they have left, the round's verdicts so far (consensus over every
    annotator), its feedback accuracy true / (true + spurious), and how many more verdicts ``cfkd run`` waits for."""
    shown = rnd.manifest["id"]
    mine = labels[(labels["annotator"] == annotator) & among(labels["cf_id"], rnd.manifest["id"])]
    verdicts = consensus[among(consensus["cf_id"], rnd.manifest["id"])]
    counts = verdicts["label"].value_counts()
    judged = int(counts.get("true", 0) + counts.get("spurious", 0))
    return {
        "left": len(shown) - mine["cf_id"].nunique(),
        "verdicts": {label: int(counts.get(label, 0)) for label in LABELS},
        "feedback_accuracy": int(counts.get("true", 0)) / judged if judged else None,
        "more_needed": max(0, min(needed, len(shown)) - len(verdicts)),
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


def change_features(manifest: pd.DataFrame, side: int = 16) -> np.ndarray:
    """(n, side * side * 3) changes counterfactual - original, area-downsampled: hue changes count as much as
    brightness changes, whatever the image size. An unreadable image gives a zero change."""
    features = []
    for original, counterfactual in zip(manifest["original"], manifest["counterfactual"]):
        try:
            pair = [_small(p, side) for p in (original, counterfactual)]
            features.append((pair[1] - pair[0]).ravel() / 255)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):  # shown as such on its card
            features.append(np.zeros(side * side * 3))
    return np.stack(features)


def _small(path: Path, side: int) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize((side, side), Image.BOX), float)


def change_clusters(manifest: pd.DataFrame, seed: int = 0, max_k: int = 12) -> pd.DataFrame:
    """Groups of similar changes, indexed by counterfactual id: KMeans on the changes (PCA-reduced), the number of
    groups the one with the best silhouette score (2 to max_k; one group below 4 cards). Columns: cluster, size,
    distance (to the group's centre) and representative (the member nearest the centre)."""
    features = change_features(manifest)
    n = len(features)
    assignment, distance = np.zeros(n, int), np.linalg.norm(features - features.mean(0), axis=1)
    if n >= 4 and np.ptp(features, axis=0).max() > 0:
        reduced = PCA(n_components=min(32, n, features.shape[1]), random_state=seed).fit_transform(features)
        best = -2.0
        for k in range(2, min(max_k, n - 1) + 1):
            fit = KMeans(n_clusters=k, n_init=2, random_state=seed).fit(reduced)
            if len(set(fit.labels_)) < 2:
                continue
            score = silhouette_score(reduced, fit.labels_, sample_size=min(n, 2000), random_state=seed)
            if score > best:
                best, assignment = score, fit.labels_
                distance = np.linalg.norm(reduced - fit.cluster_centers_[fit.labels_], axis=1)
    table = pd.DataFrame({"cluster": assignment, "distance": distance}, index=manifest["id"].tolist())
    table["size"] = table.groupby("cluster")["cluster"].transform("size")
    table["counterfactual"] = manifest["counterfactual"].to_numpy()
    nearest = table.groupby("cluster")["distance"].idxmin()
    table["representative"] = table.index.isin(nearest.values)
    return table


def verdict_uncertainty(groups: pd.DataFrame, labels: pd.DataFrame) -> pd.Series:
    """Per cluster, the entropy (bits) of its next verdict, true against spurious, from every annotator's verdicts
    in it with one pseudo-count each: 1 for a cluster nobody has judged or one judged half and half, near 0 for a
    cluster judged alike many times. The queue shows the most uncertain clusters first."""
    clusters, code = np.unique(groups["cluster"].to_numpy(), return_inverse=True)
    where = pd.Index(groups.index).get_indexer(labels["cf_id"])
    label = labels["label"].to_numpy(object)
    true, spurious = ((where >= 0) & (label == name) for name in ("true", "spurious"))
    n_true = np.bincount(code[where[true]], minlength=len(clusters))
    n_spurious = np.bincount(code[where[spurious]], minlength=len(clusters))
    p = (n_true + 1) / (n_true + n_spurious + 2)
    return pd.Series(-(p * np.log2(p) + (1 - p) * np.log2(1 - p)), index=clusters)


def review_order(
    manifest: pd.DataFrame, groups: pd.DataFrame, labels: pd.DataFrame, annotator: str
) -> list[str]:
    """Cluster-first review: the representatives the annotator has not judged (largest cluster first), then their
    other unjudged cards, most uncertain cluster first (``verdict_uncertainty``) and within a cluster the most
    atypical change first (farthest from its centre); the cards they have judged last, in manifest order."""
    ids = manifest["id"].to_numpy()
    if not np.array_equal(groups.index.to_numpy(), ids):  # groups are made from this manifest, in its order
        groups = groups.reindex(ids)
    judged = among(manifest["id"], labels.loc[labels["annotator"] == annotator, "cf_id"].unique())
    cluster = groups["cluster"].to_numpy()
    uncertainty = verdict_uncertainty(groups, labels).reindex(cluster).to_numpy()
    open_ = np.flatnonzero(~judged)
    representative = groups["representative"].to_numpy(bool)[open_]
    first, rest = open_[representative], open_[~representative]
    first = first[np.argsort(-groups["size"].to_numpy()[first], kind="stable")]
    rest = rest[np.lexsort((-groups["distance"].to_numpy()[rest], -uncertainty[rest]))]
    return ids[np.concatenate([first, rest, np.flatnonzero(judged)])].tolist()


def apply_to_cluster(store, groups: pd.DataFrame, cf_id: str, annotator: str, label: str, round: int) -> int:
    """Give the annotator's verdict on ``cf_id`` to every other member of its cluster, except those the annotator
    judged one by one (an individual verdict always wins); a verdict applied from another card is replaced."""
    members = groups.index[groups["cluster"] == groups.at[cf_id, "cluster"]]
    latest = store.labels(round)
    latest = latest[latest["annotator"] == annotator].set_index("cf_id")["comment"]
    own = {i for i, comment in latest.items() if not str(comment).startswith(CLUSTER_COMMENT)}
    events = [
        {
            "cf_id": i,
            "annotator": annotator,
            "label": label,
            "round": round,
            "comment": CLUSTER_COMMENT + cf_id,
        }
        for i in members
        if i != cf_id and i not in own
    ]
    return store.add_many(events)


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
