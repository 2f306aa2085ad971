"""Round 1's judged edits per attempt as the mask teacher's density rule calls them (true: more change per pixel on
the feature mask than off it), read from each suite run's manifest: what a search setting hands the teacher,
without a fine-tune.

    .venv/bin/python benchmarks/density_verdicts.py ex-leave dattempt-all --only square stamp

Writes benchmarks/results/density-verdicts-TAG1-TAG2....json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import suite

from pipeline import manifest

HERE = Path(__file__).resolve().parent


def counts(run_dir: Path, partial: float = 0.5) -> dict:
    """Per attempt: judged edits (flips and near-flips past ``partial``), flips, true and spurious by density."""
    table = manifest.read_round(run_dir, 1)
    judged = table[manifest.is_judged(table, partial)]
    out = {"evaluations_per_counterfactual": round(float(table["evaluations"].mean()), 1)}
    for attempt, rows in judged.groupby("attempt"):
        true = int((rows["feature_density"] > 1).sum())
        out[str(attempt)] = {
            "judged": len(rows),
            "flips": int(rows["success"].sum()),
            "true": true,
            "spurious": len(rows) - true,
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tags", nargs="+")
    p.add_argument("--only", nargs="*", choices=list(suite.CASES))
    p.add_argument("--teacher", default="mask", choices=["mask", "model"])
    args = p.parse_args()
    result = {}
    for tag in args.tags:
        for name, run_dir in suite.tagged_runs(tag, args.only):
            if name.endswith(f"-{args.teacher}"):
                result.setdefault(name.removesuffix(f"-{args.teacher}"), {})[tag] = counts(run_dir)
    out = HERE / "results" / f"density-verdicts-{'-'.join(args.tags)}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
