"""Does a search setting change what the teachers see? Round 1's explain of two suite runs, counterfactual by
counterfactual: the ones a teacher judges (flips, and near-flips that covered ``feedback.partial`` of the way) and
whether their edits are the same, with each run's network evaluations per counterfactual, and steps and flips
per attempt.

For a setting meant to save evaluations only (``explain.search.pace`` at or below ``feedback.partial``):

    .venv/bin/python benchmarks/suite.py --explain-only --teachers mask --set explain.search.pace=0.5 --tag ex-pace05
    .venv/bin/python benchmarks/judged_same.py ex-pace05              # against the default runs (no tag)

Writes benchmarks/results/judged-TAG.json.
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


def compare(base: Path, other: Path, partial: float, tolerance: float = 1e-3) -> dict:
    """Counts of judged counterfactuals in each run, judged in one only, and judged in both with the same edit."""
    a, b = (manifest.read(run / "explain" / manifest.NAME).set_index(KEY) for run in (base, other))
    if set(a.index) != set(b.index):
        raise SystemExit(f"error: {base.name} and {other.name} explain different images")
    b = b.loc[a.index]
    judged_a, judged_b = (t.success.astype(bool) | (t.progress.astype(float) >= partial) for t in (a, b))
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
    }


def by_attempt(column: pd.Series) -> dict:
    """A column's mean per attempt (the index's last level)."""
    means = column.astype(float).groupby(level="attempt").mean()
    return {str(k): round(float(v), 2) for k, v in means.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tag", help="the suite tag of the runs to compare with the default runs")
    parser.add_argument("--partial", type=float, default=0.5, help="feedback.partial of the teachers")
    args = parser.parse_args()
    out = {}
    for name in suite.CASES:
        base, other = WORK / f"suite-{name}-mask", WORK / f"suite-{name}-mask-{args.tag}"
        if not (other / "explain" / manifest.NAME).is_file():
            print(
                f"error: {other} has no explain stage; run suite.py --explain-only --tag {args.tag}",
                file=sys.stderr,
            )
            sys.exit(2)
        out[name] = compare(base, other, args.partial)
        print(name, out[name])
    (HERE / "results" / f"judged-{args.tag}.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
