"""The explain stage's artefact: ``manifest.csv`` in a round's explain folder, one row per counterfactual attempt.

Every later step (teachers, the feedback stage, distil, the report, the app) reads counterfactuals through this
module. A counterfactual's identity is structured in columns (``sample``: the explained image, ``source_class``,
``target_class``, ``attempt``); its ``id`` is an opaque string that is never parsed. The id ends in a hash of the
original's and the counterfactual's pixels, so a verdict given on one image can never attach to another: when an
explain setting changes the counterfactual, its id changes too.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import UserError

NAME = "manifest.csv"
# class names, ids and paths stay strings (a class called "0" must not become the number 0)
TEXT = ("id", "sample", "label", "source_class", "target_class", "source_path", "split")
COLUMNS = (
    "id",
    "sample",  # the explained image: <split>-<row in the split>
    "source_path",  # the explained image's path in the dataset
    "original",
    "counterfactual",
    "difference",
    "split",
    "label",
    "source_class",
    "target_class",
    "attempt",
    "p_source_before",  # the classifier's probability of the source class, original -> counterfactual
    "p_source_after",
    "p_target_before",
    "p_target_after",
    "success",
    "progress",  # share of the way from the original's target log-odds to the goal's (1 = reached it)
    "l1",
    "l2",
    "changed_area",
    "feature_share",
    "feature_density",
    "realism",
    "steps",
    "no_room",
    "evaluations",
    "seconds",
)


def folder(round: int) -> str:
    """The explain folder of a CFKD round: explain/ for round 1 (also a run without rounds), explain_r<N>/."""
    return "explain" if round == 1 else f"explain_r{round}"


def rounds(run_dir: Path) -> dict[int, Path]:
    """Explain folders by round."""
    found = {}
    for path in sorted(Path(run_dir).glob("explain*")):
        match = re.fullmatch(r"explain(?:_r(\d+))?", path.name)
        if match and path.is_dir():
            found[int(match.group(1) or 1)] = path
    return found


def sample_id(split: str, row: int) -> str:
    return f"{split}-{row:05d}"


def counterfactual_id(
    sample: str, target: int, attempt: int, original: np.ndarray, counterfactual: np.ndarray
) -> str:
    """Opaque and file-name safe: the sample, the target's class index, the attempt and a hash of both images'
    pixels (uint8 arrays as written to PNG)."""
    digest = hashlib.sha256()
    for pixels in (original, counterfactual):
        digest.update(str(pixels.shape).encode())
        digest.update(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
    return f"{sample}-t{target}-a{attempt}-{digest.hexdigest()[:12]}"


def read(path: Path) -> pd.DataFrame:
    """A manifest.csv (a folder is taken to hold one)."""
    path = Path(path)
    path = path / NAME if path.is_dir() else path
    try:
        table = pd.read_csv(
            path, dtype={c: str for c in TEXT}, keep_default_na=False, na_values={"feature_share": [""]}
        )
    except FileNotFoundError:
        raise UserError(f"no counterfactuals in {path.parent}: run the explain stage first") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a readable manifest ({str(exc).strip().splitlines()[0]})") from None
    if "success" in table:
        table["success"] = table["success"].astype(str).str.lower().eq("true")
    return table


def read_round(run_dir: Path, round: int) -> pd.DataFrame:
    return read(Path(run_dir) / folder(round) / NAME)


def write(records: list[dict], path: Path) -> pd.DataFrame:
    table = pd.DataFrame.from_records(records, columns=list(COLUMNS))
    table.to_csv(path, index=False)
    return table


def flipped(table: pd.DataFrame) -> pd.DataFrame:
    """The counterfactuals that reached their target."""
    return table[table["success"]].reset_index(drop=True)


def progress(p_before, p_after, goal: float) -> np.ndarray:
    """Share of the way from the target log-odds before the edit to the goal's that the edit covered, in [0, 1]."""
    p = np.clip(np.stack([np.asarray(p_before, float), np.asarray(p_after, float)]), 1e-7, 1 - 1e-7)
    start, now = np.log(p) - np.log1p(-p)
    way = np.log(goal) - np.log1p(-goal) - start
    # an original already at the goal (no way to go) counts as there
    return np.clip(np.divide(now - start, way, out=np.ones_like(way), where=way > 0), 0.0, 1.0)


def judged(table: pd.DataFrame, partial: float = 1.0) -> pd.DataFrame:
    """The counterfactuals a teacher judges: those that reached their target and, with ``partial`` < 1, those that
    fell short but covered at least that share of the way there: a change that moves the decision that far is
    either evidence of the target class or a shortcut the classifier must not follow, flip or not."""
    return table[is_judged(table, partial)].reset_index(drop=True)


def is_judged(table: pd.DataFrame, partial: float = 1.0) -> pd.Series:
    """Per row of a manifest table, whether a teacher judges it (``judged``)."""
    if partial >= 1 or "progress" not in table:
        return table["success"].astype(bool)
    return table["success"].astype(bool) | (table["progress"].astype(float) >= partial)
