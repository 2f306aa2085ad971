"""Does a search setting change what the teachers see? Round 1's explain of two suite runs, counterfactual by
counterfactual: the ones a teacher judges (flips, and near-flips that covered ``feedback.partial`` of the way) and
whether their edits are the same, with each run's network evaluations per counterfactual, and steps and flips
per attempt.

For a setting meant to save evaluations only (``explain.search.pace`` at or below ``feedback.partial``):

    .venv/bin/python benchmarks/suite.py --explain-only --teachers mask --set explain.search.pace=0.5 --tag ex-pace05
    .venv/bin/python benchmarks/judged_same.py ex-pace05              # against the default runs (no tag)

Or any two tags, teacher and round, e.g. round 2 of two full suite runs (``--base passes-shift --round 2``): whether
the later rounds' teachers saw the same edits.

Writes benchmarks/results/judged-TAG.json (judged-TAG-vs-BASE-TEACHER-rROUND.json for other runs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import suite

from pipeline import manifest

HERE = Path(__file__).resolve().parent
WORK = HERE.parent / "runs" / "suite"
KEY = ["sample", "target_class", "attempt"]  # one counterfactual


def compare(base: Path, other: Path, partial: float, cfkd_round: int = 1, tolerance: float = 1e-3) -> dict:
    """Counts of judged counterfactuals in each run, judged in one only, and judged in both with the same edit."""
    folder = manifest.folder(cfkd_round)
    a, b = (manifest.read(run / folder / manifest.NAME).set_index(KEY) for run in (base, other))
    if set(a.index) != set(b.index):
        # a later round's classifiers differ, and each explains the images it classifies correctly
        return {"same_images": False, "judged": [int(manifest.is_judged(t, partial).sum()) for t in (a, b)]}
    b = b.loc[a.index]
    judged_a, judged_b = (manifest.is_judged(t, partial) for t in (a, b))
    same = ((a.l1.astype(float) - b.l1.astype(float)).abs() < tolerance) & (
        (a.p_target_after.astype(float) - b.p_target_after.astype(float)).abs() < tolerance
    )
    both = judged_a & judged_b
    return {
        "judged": [int(judged_a.sum()), int(judged_b.sum())],
        "judged_in_one_only": int((judged_a ^ judged_b).sum()),
        "judged_same_edit": int((both & same).sum()),
        "evaluations_per_counterfactual": [
            round(float(t.evaluations.astype(float).mean()), 1) for t in (a, b)
        ],
        "steps_by_attempt": [by_attempt(t.steps) for t in (a, b)],
        "flips_by_attempt": [by_attempt(t.success) for t in (a, b)],
        "l1_ratio_by_attempt": l1_ratios(a, b),
        "p_target_after_by_attempt": [medians(t.p_target_after, a.success & b.success) for t in (a, b)],
    }


def medians(column: pd.Series, rows: pd.Series) -> dict:
    """A column's median per attempt over ``rows`` (the edits that flipped in both runs)."""
    values = column.astype(float)[rows.astype(bool)].groupby(level="attempt").median()
    return {str(k): round(float(v), 4) for k, v in values.items()}


def l1_ratios(a: pd.DataFrame, b: pd.DataFrame) -> dict:
    """Per attempt, the second run's edit size over the first's (L1), median and 90th percentile over the
    counterfactuals that flipped in both: how much larger or smaller the same image's edit became."""
    flipped = a.success.astype(bool) & b.success.astype(bool)
    ratio = (b.l1.astype(float) / a.l1.astype(float).clip(lower=1e-12))[flipped]
    out = {}
    for attempt, values in ratio.groupby(level="attempt"):
        out[str(attempt)] = [round(float(values.median()), 3), round(float(values.quantile(0.9)), 3)]
    return out


def by_attempt(column: pd.Series) -> dict:
    """A column's mean per attempt (the index's last level)."""
    means = column.astype(float).groupby(level="attempt").mean()
    return {str(k): round(float(v), 2) for k, v in means.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tag", help="the suite tag of the runs to compare with the default runs")
    parser.add_argument("--partial", type=float, default=0.5, help="feedback.partial of the teachers")
    parser.add_argument("--base", default="", help="the tag of the runs compared with (default: untagged)")
    parser.add_argument("--teacher", default="mask", choices=["mask", "model"])
    # a later round's edits were searched on classifiers distilled from each run's own verdicts
    parser.add_argument("--round", type=int, default=1, help="whose explain: round 1 (default), 2, 3 or 4")
    parser.add_argument("--only", nargs="*", choices=list(suite.CASES), help="datasets (default: all)")
    args = parser.parse_args()
    out = {}
    for name in args.only or suite.CASES:
        base, other = (
            WORK / "-".join(["suite", name, args.teacher, *([t] if t else [])]) for t in (args.base, args.tag)
        )
        for run in (base, other):
            if not (run / manifest.folder(args.round) / manifest.NAME).is_file():
                print(f"error: {run} has no round-{args.round} explain stage", file=sys.stderr)
                sys.exit(2)
        out[name] = compare(base, other, args.partial, args.round)
        print(name, out[name])
    default = not args.base and args.teacher == "mask" and args.round == 1
    suffix = "" if default else f"-vs-{args.base or 'untagged'}-{args.teacher}-r{args.round}"
    (HERE / "results" / f"judged-{args.tag}{suffix}.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
