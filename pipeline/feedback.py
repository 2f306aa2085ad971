"""The feedback stage: one round's verdicts as a snapshot, ``feedback_r<N>/verdicts.csv`` and ``summary.json``.

A simulated teacher (pipeline.teach) labels the round first; experts label in the app. Either way the verdicts
come from the store's consensus for exactly this round's counterfactual ids (an id names one image, so a verdict
never moves to another). Counts keep apart what the teacher said (true / spurious / unsure / unrealistic) from what it never
judged: counterfactuals that did not flip the classifier, and flipped ones it abstained on (no mask for the
image, a reference that gets the original wrong, an expert who has not got to it yet). Verdicts on images the
round no longer shows (explain ran again) are counted as stale and never used.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline import manifest, teach
from pipeline.config import FeedbackConfig
from pipeline.errors import UserError
from pipeline.rundir import write_json
from pipeline.store import CLUSTER_COMMENT, LABELS, FeedbackStore

STORE = "feedback.sqlite"
VERDICTS = "verdicts.csv"  # the round's snapshot, in its feedback_r<N>/ folder


def verdicts_path(run_dir: Path, round: int) -> Path:
    """Where the feedback stage of ``round`` writes its snapshot of the verdicts distil learns from."""
    return Path(run_dir) / f"feedback_r{round}" / VERDICTS


def read_verdicts(run_dir: Path, round: int) -> pd.DataFrame:
    """The snapshot the feedback stage of ``round`` wrote (``verdicts_path``), every field as text."""
    return pd.read_csv(verdicts_path(run_dir, round), dtype=str, keep_default_na=False)


def open_store(run_dir: Path) -> FeedbackStore:
    return FeedbackStore(Path(run_dir) / STORE)


def verdicts(
    store: FeedbackStore, table: pd.DataFrame, round: int, min_votes: int = 1, partial: float = 1.0
) -> pd.DataFrame:
    """Consensus labels (true, spurious or unsure) of this round's judged counterfactuals (``manifest.judged``)."""
    consensus = store.consensus(round, min_votes)
    ids = set(manifest.judged(table, partial)["id"])
    return consensus[consensus["cf_id"].isin(ids)].reset_index(drop=True)


def stale(store: FeedbackStore, table: pd.DataFrame, round: int) -> int:
    """Counterfactuals of this round with a verdict in the store that the round's manifest no longer shows (the
    explain stage ran again and made other images): their verdicts stay in the store and are never used."""
    labelled = set(store.labels(round)["cf_id"])
    return len(labelled - set(table["id"]))


def summary(given: pd.DataFrame, table: pd.DataFrame, stale: int = 0, partial: float = 1.0) -> dict:
    """Counts per verdict, not flipped (and not judged: short of ``partial`` too), abstained, and feedback
    accuracy = true / (true + spurious): a score of the explained classifier that needs no test labels."""
    counts = given["label"].value_counts()
    labels = {label: int(counts.get(label, 0)) for label in LABELS}
    flipped = int(table["success"].sum())
    shown = len(manifest.judged(table, partial))
    judged = labels["true"] + labels["spurious"]
    return {
        "counterfactuals": int(len(table)),
        "flipped": flipped,
        "partial": shown - flipped,  # judged although short of the goal
        "labels": labels,
        "not_flipped": int(len(table) - shown),
        "abstained": shown - int(len(given)),
        "stale": stale,
        "feedback_accuracy": labels["true"] / judged if judged else None,
        # the experts' own realism measure: the share of verdicts that reject the image as unrealistic
        "unrealistic_share": labels["unrealistic"] / len(given) if len(given) else None,
    }


def expert_actions(events: pd.DataFrame) -> int:
    """Key presses that set a verdict: one per expert label event, one per verdict given to a whole cluster (its
    events share one comment); undo and the simulated teachers' verdicts are not counted."""
    human = events[~events["annotator"].str.startswith("teacher:") & events["label"].isin(LABELS)]
    cluster = human["comment"].str.startswith(CLUSTER_COMMENT)
    return int((~cluster).sum() + human[cluster].groupby(["annotator", "comment"]).ngroups)


def why_empty(info: dict, teacher: str) -> str:
    """The reason a round has no verdict at all, and what to change."""
    shown = info["flipped"] + info.get("partial", 0)
    if shown == 0:
        return (
            f"none of the {info['counterfactuals']} counterfactuals flipped the classifier (explain.search: more "
            "steps, a higher lr, or a lower goal)"
        )
    if teacher == "mask":
        return f"the mask teacher abstained on all {shown}: their images have no feature_mask"
    if teacher == "model":
        return f"the model teacher abstained on all {shown}: the reference gets every original wrong"
    return f"no expert has labelled any of the {shown} counterfactuals yet"


def progress(run_dir: Path, round: int, config: FeedbackConfig) -> tuple[pd.DataFrame, int, int]:
    """The round's verdicts in the store right now, how many expert labels it waits for (min_labels, or every
    flipped counterfactual when there are fewer: a round with nothing to show waits for nothing), and how many
    stale verdicts the store holds for it."""
    table, store = manifest.read_round(run_dir, round), open_store(run_dir)
    given = verdicts(store, table, round, config.min_votes, config.partial)
    return (
        given,
        min(config.min_labels, len(manifest.judged(table, config.partial))),
        stale(store, table, round),
    )


def run(
    run_dir: Path,
    round: int,
    config: FeedbackConfig,
    out: Path,
    data_root: Path | None = None,
    reference: Path | None = None,
    seed: int = 0,
    resize: str = "pad",
    require: bool = True,
) -> dict:
    """Label the round with the simulated teacher (unless experts label it), snapshot the verdicts into ``out``.
    With ``require``, a round without a single verdict stops the run with the reason."""
    if config.teacher != "human":
        teach.run(
            run_dir,
            config.teacher,
            data_root,
            reference,
            config.noise,
            round,
            seed,
            config.band,
            resize,
            config.oracle,
            config.unrealistic,
            config.partial,
            config.moved_unsure,
            config.other_class_unsure,
            config.intervention_true,
        )
    table, store = manifest.read_round(run_dir, round), open_store(run_dir)
    given = verdicts(store, table, round, config.min_votes, config.partial)
    info = summary(given, table, stale(store, table, round), config.partial)
    info["expert_actions"] = expert_actions(store.events(round))
    if require and given.empty:
        raise UserError(f"round {round}: no verdict to learn from: {why_empty(info, config.teacher)}")
    given.to_csv(out / VERDICTS, index=False)
    write_json(out / "summary.json", info)
    return info
