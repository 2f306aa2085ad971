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

import yaml
from suite import tagged_runs

from pipeline import feedback, manifest

HERE = Path(__file__).resolve().parent


def votes(run_dir: Path) -> list[dict]:
    """Per finished feedback round: the cast verdicts of that round and of all rounds so far."""
    search = yaml.safe_load((run_dir / "config.yaml").read_text())["explain"]["search"]
    attempt, total, rows = search["attempts"] + 1, {"true": 0, "spurious": 0, "unsure": 0}, []
    for r in range(1, 4):
        if not feedback.verdicts_path(run_dir, r).exists():
            break
        table = manifest.read_round(run_dir, r)
        casts = set(table.loc[table["attempt"].astype(int) == attempt, "id"])
        verdicts = feedback.read_verdicts(run_dir, r)
        counts = verdicts.loc[verdicts["cf_id"].isin(casts), "label"].value_counts()
        this = {k: int(counts.get(k, 0)) for k in total}
        total = {k: total[k] + this[k] for k in total}
        taught = 2 * total["spurious"] > sum(total.values())  # distil.casts_are_shortcuts
        rows.append({"round": r, "casts": this, "so_far": dict(total), "cast_vote_teaches": taught})
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
