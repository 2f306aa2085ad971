"""The teacher's verdicts on the colour-cast attempt (``explain.search.cast``) of suite runs, round by round and
added up over the rounds so far, and what ``distil.cast_vote`` does with them (teaches the casts while most of those
judged were judged spurious).

With ``--parts``, for the mask teacher's runs: round 1's casts taken apart as the intervention rule does (the
explained classifier's gain in target log-odds from the cast's part on the feature mask, from its part off it, and
from the whole cast) and the verdicts intervention alone would give them: can a feature mask tell a cast that is a
shortcut from one that moves the evidence?

    .venv/bin/python benchmarks/cast_votes.py cast-vote [cast-unanimous ...] [--parts]

Writes benchmarks/results/cast-votes-TAG.json (and cast-parts-TAG.json) per tag.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from suite import tagged_runs

from pipeline import config as cfg
from pipeline import distil, feedback, manifest, models, teach
from pipeline.data import load_mask

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


@torch.no_grad()
def parts(run_dir: Path) -> dict:
    """Round 1's judged casts: median gains (log-odds) of the part on the feature mask, the part off it and the
    whole cast, the mask's median area, and intervention's verdicts at the run's band."""
    config = cfg.from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    # the suite's data folder by name (a run's config may name the snapshot it ran from)
    folder, data = run_dir / manifest.folder(1), run_dir.parent / "data" / Path(config.data.root).name
    table = manifest.judged(manifest.read(folder), config.feedback.partial)
    table = table[table["attempt"].astype(int) == config.explain.search.cast_attempt]
    checkpoint, band = teach.explained(run_dir, 1), config.feedback.band
    model, card = models.load(checkpoint)
    model, transform = models.OnPixels(model, card), models.pixel_transform(card)
    masks, gains = teach.feature_masks(data), []
    for row in table.itertuples():
        x, x_cf = (teach._image(folder / p, transform)[None] for p in (row.original, row.counterfactual))
        mask = torch.from_numpy(
            load_mask(data / masks[row.source_path], list(x.shape[-2:]), config.data.resize)
        )
        mask, target = mask.float()[None, None], card.classes.index(row.target_class)
        before, whole = teach._margin(model, torch.cat([x, x_cf]), target).tolist()
        gains.append(
            [*teach.intervention_gains(model, x, x_cf, mask, target), whole - before, float(mask.mean())]
        )
    inside, outside, whole, area = np.median(np.array(gains), 0).tolist() if gains else [None] * 4
    verdicts = teach.intervention_verdicts(table, folder, data, checkpoint, band, config.data.resize)
    return {
        "casts": len(table),
        "feature_area": area,
        "gain_inside": inside,
        "gain_outside": outside,
        "gain_whole": whole,
        "inside_over_whole": float(np.median([g[0] / g[2] for g in gains])) if gains else None,
        "intervention": {k: int(verdicts.eq(k).sum()) for k in LABELS},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tags", nargs="+")
    p.add_argument(
        "--parts", action="store_true", help="also take round 1's casts apart (mask teacher's runs)"
    )
    args = p.parse_args()
    for tag in args.tags:
        if args.parts:
            found = {name: parts(run_dir) for name, run_dir in tagged_runs(tag) if name.endswith("-mask")}
            (HERE / "results" / f"cast-parts-{tag}.json").write_text(json.dumps(found, indent=2) + "\n")
            for name, row in found.items():
                print(tag, name, row)
        result = {name: votes(run_dir) for name, run_dir in tagged_runs(tag)}
        (HERE / "results" / f"cast-votes-{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
        for name, rows in result.items():
            print(tag, name, [(r["round"], r["so_far"], r["cast_vote_teaches"]) for r in rows])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
