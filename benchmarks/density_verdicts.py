"""Round 1's judged edits per attempt as the mask teacher's density rule calls them (``teach.mask_verdicts``, with
each run's own ``feedback.band``, ``partial`` and resize policy), read from each suite run's explain folder: what a
search setting hands the teacher, without a fine-tune. Where the run's store holds the teacher's round-1 verdicts,
the edits the density rule is unsure of are also counted by the verdict the run gave them (``unsure_judged``: what
``feedback.oracle: density+intervention`` settled by intervention). With ``--intervention`` those edits are also
judged by intervention here, with the classifier round 1 explained (``unsure_by_intervention``), whatever teacher
the run had: where ``feedback.intervention_true`` acts.

    .venv/bin/python benchmarks/density_verdicts.py ex-leave dattempt-all --only square stamp

Writes benchmarks/results/density-verdicts-TAG1-TAG2....json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import suite
import yaml

from pipeline import config as cfg
from pipeline import manifest, teach
from pipeline.store import FeedbackStore

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def data_root(configured: str) -> Path:
    """The run's dataset folder; a suite run from a snapshot names it under the snapshot's link to ``runs/``."""
    path = Path(configured)
    return path if path.exists() else ROOT / "runs" / configured.split("/runs/", 1)[1]


def given(run_dir: Path, teacher: str) -> pd.Series:
    """The teacher's round-1 verdict per counterfactual id, as the run's store holds it (empty without a store)."""
    if not (run_dir / "feedback.sqlite").exists():
        return pd.Series(dtype=str)
    labels = FeedbackStore(run_dir / "feedback.sqlite").labels(1)
    return labels[labels["annotator"] == f"teacher:{teacher}"].set_index("cf_id")["label"]


def counts(run_dir: Path, teacher: str = "mask", intervention: bool = False) -> dict:
    """Per attempt: judged edits (flips and near-flips past ``partial``), flips, and the teacher's verdicts."""
    config = cfg.from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    explain_dir = run_dir / manifest.folder(1)
    table = manifest.read(explain_dir)
    judged = manifest.judged(table, config.feedback.partial)
    verdicts = teach.mask_verdicts(
        judged, explain_dir, data_root(config.data.root), config.feedback.band, config.data.resize
    )
    judged = judged.assign(
        verdict=judged["id"].map(verdicts), given=judged["id"].map(given(run_dir, teacher))
    )
    if intervention:
        unsure = judged[judged["verdict"] == "unsure"]
        settled = teach.intervention_verdicts(
            unsure,
            explain_dir,
            data_root(config.data.root),
            teach.explained(run_dir, 1),
            config.feedback.band,
            config.data.resize,
        )
        judged["by_intervention"] = judged["id"].map(settled)
    out = {"evaluations_per_counterfactual": round(float(table["evaluations"].mean()), 1)}
    for attempt, rows in judged.groupby("attempt"):
        out[str(attempt)] = {
            "judged": len(rows),
            "flips": int(rows["success"].sum()),
            **{v: int((rows["verdict"] == v).sum()) for v in ("true", "spurious", "unsure")},
        }
        unsure = rows.loc[(rows["verdict"] == "unsure") & rows["given"].notna(), "given"]
        if len(unsure):
            out[str(attempt)]["unsure_judged"] = unsure.value_counts().to_dict()
        if intervention:
            settled = rows["by_intervention"].dropna().value_counts().to_dict()
            out[str(attempt)]["unsure_by_intervention"] = settled
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tags", nargs="+")
    p.add_argument("--only", nargs="*", choices=list(suite.CASES))
    p.add_argument("--teacher", default="mask", choices=["mask", "model"])
    p.add_argument("--intervention", action="store_true", help="judge the unsure edits by intervention too")
    args = p.parse_args()
    result = {}
    for tag in args.tags:
        for name, run_dir in suite.tagged_runs(tag, args.only):
            if name.endswith(f"-{args.teacher}"):
                result.setdefault(name.removesuffix(f"-{args.teacher}"), {})[tag] = counts(
                    run_dir, args.teacher, args.intervention
                )
    suffix = f"-{args.teacher}" if args.teacher != "mask" else ""
    out = HERE / "results" / f"density-verdicts-{'-'.join(args.tags)}{suffix}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
