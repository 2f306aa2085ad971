"""The teacher's verdicts on the colour-cast attempt (``explain.search.cast``) of suite runs, round by round and
added up over the rounds so far, and what ``distil.cast_vote`` does with them (teaches the casts while most of those
judged were judged spurious).

    .venv/bin/python benchmarks/cast_votes.py cast-vote [cast-unanimous ...]

Writes benchmarks/results/cast-votes-TAG.json per tag.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import yaml
from suite import tagged_runs

from pipeline import config as cfg
from pipeline import distil, feedback

HERE = Path(__file__).resolve().parent
LABELS = ("true", "spurious", "unsure")


def votes(run_dir: Path) -> list[dict]:
    """Per finished feedback round: the cast verdicts of that round and of all rounds so far."""
    # the explain section alone: runs of a switch since renamed still name it under distil
    explain = yaml.safe_load((run_dir / "config.yaml").read_text())["explain"]
    attempt, judged, rows = cfg.from_dict({"explain": explain}).explain.search.cast_attempt, [], []
    for r in range(1, 4):
        if not feedback.verdicts_path(run_dir, r).exists():
            break
        judged.append(distil.cast_verdicts(run_dir, r, attempt))
        so_far = pd.concat(judged)
        rows.append(
            {
                "round": r,
                "casts": {k: int(judged[-1].eq(k).sum()) for k in LABELS},
                "so_far": {k: int(so_far.eq(k).sum()) for k in LABELS},
                "cast_vote_teaches": distil.mostly_spurious(so_far),
            }
        )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tags", nargs="+")
    args = p.parse_args()
    for tag in args.tags:
        result = {name: votes(run_dir) for name, run_dir in tagged_runs(tag)}
        (HERE / "results" / f"cast-votes-{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
        for name, rows in result.items():
            print(tag, name, [(r["round"], r["so_far"], r["cast_vote_teaches"]) for r in rows])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
